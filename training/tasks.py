"""The two training tasks as lists of tokenized examples: forecasting series, following instructions.

Each example is a dict of ``input_ids``, ``attention_mask`` and ``labels`` (-100 where nothing
is to be learned), ready for ``training.collate.PadCollator``.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.instructions import generate_tasks, load_instructions, split, tokenize_examples
from training.llmtime import encode, fit_scaler
from training.lotka_volterra import create_dataset, load_dataset
from training.sequences import process_sequences

DATASET_SEED = 0  # the data are the same for every --seed, so runs are compared on the same held-out systems
GENERATED_TASKS = 14_000  # enough for the source material's split of 10,000 / 2,000 / 2,000


@dataclass
class TaskData:
    train: list[dict]
    validation: list[dict]
    description: str


def series_texts(series: np.ndarray, decimals: int = 2) -> list[str]:
    """One LLMTIME text per system of ``series`` ``(n_systems, n_steps, n_vars)``, each scaled on its own."""
    return [encode(system, fit_scaler(system), decimals) for system in series]


def windows(texts: list[str], tokenizer, max_length: int, stride: int) -> list[dict]:
    """``process_sequences`` split into one example per window."""
    batch = process_sequences(texts, tokenizer, max_length=max_length, stride=stride)
    return [{key: batch[key][i] for key in batch} for i in range(len(batch["input_ids"]))]


def llmtime_task(tokenizer, data: str | None, max_length: int, stride: int) -> TaskData:
    """Windows of the LLMTIME texts of the training systems; validation on held-out systems."""
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such data file; --task llmtime takes a .npz written by save_dataset")
    dataset = load_dataset(data) if data else create_dataset(seed=DATASET_SEED)
    train = windows(series_texts(dataset.split("train")), tokenizer, max_length, stride)
    validation = windows(series_texts(dataset.split("validation")), tokenizer, max_length, stride)
    source = data or f"simulated Lotka-Volterra (seed {DATASET_SEED})"
    description = (f"llmtime: {len(dataset.splits['train'])} train / {len(dataset.splits['validation'])} validation "
                   f"systems from {source}, {len(train)} / {len(validation)} windows of {max_length} tokens")
    return TaskData(train, validation, description)


def instruct_task(tokenizer, data: str | None, max_length: int) -> TaskData:
    """Instruction examples with the prompt masked out of the labels; split 10,000 / 2,000 / 2,000 at most."""
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such data file; --task instruct takes Alpaca .json or .jsonl")
    records = load_instructions(data) if data else generate_tasks(GENERATED_TASKS, seed=DATASET_SEED)
    train_records, validation_records, _ = split(records)
    train, skipped = tokenize_examples(train_records, tokenizer, max_length)
    validation, _ = tokenize_examples(validation_records, tokenizer, max_length)
    source = data or "the embedded generated tasks"
    description = (f"instruct: {len(train)} train / {len(validation)} validation examples from {source}"
                   + (f" ({skipped} skipped: prompt longer than {max_length} tokens)" if skipped else ""))
    return TaskData(train, validation, description)


def build_task(config, tokenizer) -> TaskData:
    """The data of ``config.task``; raises ``FileNotFoundError``/``ValueError`` naming a bad ``--data``."""
    if config.task == "llmtime":
        return llmtime_task(tokenizer, config.data, config.max_length, config.stride)
    return instruct_task(tokenizer, config.data, config.max_length)
