"""The two training tasks: which data each uses, which part is held out, and the tokenized examples.

``task_parts(task)`` is the one place that decides which Lotka-Volterra systems or which
instruction records are train, validation or test; training, perplexity, forecasting and
exact match all ask it. Each tokenized example is a dict of ``input_ids``, ``attention_mask`` and
``labels`` (-100 where nothing is to be learned), ready for ``data.collate.PadCollator``.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.generated_tasks import generate_tasks
from data.instructions import load_instructions
from data.llmtime import encode, fit_scaler
from data.lotka_volterra import LotkaVolterraData, create_dataset, load_dataset
from data.sequences import process_sequences
from data.split import split
from data.tokenization import tokenize_examples

TASKS = ("llmtime", "instruct")
PARTS = ("train", "validation", "test")
DATASET_SEED = 0  # the data are the same for every --seed, so runs are compared on the same held-out systems
GENERATED_TASKS = 14_000  # enough for the source material's split of 10,000 / 2,000 / 2,000
DATA_KINDS = {"llmtime": "a .npz written by save_dataset", "instruct": "Alpaca .json or .jsonl"}


def series_dataset(data: str | None = None, noise: float = 0.0) -> LotkaVolterraData:
    """The llmtime task's systems: the .npz ``data``, or the simulated default observed with ``noise``.

    Raises:
        FileNotFoundError: ``data`` names no file.
        ValueError: a file of the wrong kind, a bad ``noise``, or ``noise`` with ``data`` (a file
            holds its own observations).
    """
    if data is not None and noise:
        raise ValueError(f"--noise {noise} applies to the simulated series; {data} holds its own observations "
                         "(write a noisy file with save_dataset(create_dataset(noise=...)))")
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such data file; the llmtime task takes {DATA_KINDS['llmtime']}")
    return load_dataset(data) if data else create_dataset(seed=DATASET_SEED, noise=noise)


def task_parts(task: str, data: str | None = None, noise: float = 0.0) -> dict:
    """``{"train": ..., "validation": ..., "test": ...}``: ``task``'s data from ``data`` or the embedded default, split.

    The parts are, for llmtime, the series of each part's systems as observed,
    ``(n_systems, n_steps, 2)``, split by system (``LotkaVolterraData.split``), the simulated
    default with observation ``noise``; for instruct, each part's records (``data.split.split``).

    Raises:
        FileNotFoundError: ``data`` names no file (the message says what the task takes).
        ValueError: an unknown task, a file of the wrong kind, or ``noise`` where it does not apply.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "llmtime":
        dataset = series_dataset(data, noise)
        return {part: dataset.split(part) for part in PARTS}
    if noise:
        raise ValueError("--noise is for the llmtime task's series; the instruct task has none")
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such data file; the {task} task takes {DATA_KINDS[task]}")
    records = load_instructions(data) if data else generate_tasks(GENERATED_TASKS, seed=DATASET_SEED)
    return dict(zip(PARTS, split(records)))


def task_split(task: str, part: str, data: str | None = None, noise: float = 0.0):
    """One part ("train", "validation" or "test") of ``task_parts(task, data, noise)``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    return task_parts(task, data, noise)[part]


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
    rows = {key: tensor.unbind() for key, tensor in batch.items()}
    return [dict(zip(rows, example)) for example in zip(*rows.values())]


def build_task(config, tokenizer) -> TaskData:
    """The train and validation examples of ``config.task``.

    Raises:
        FileNotFoundError, ValueError: a bad ``--data`` (as ``task_parts``), or a bad ``max_length``.
    """
    task, data, max_length = config.task, config.data, config.max_length
    parts = task_parts(task, data, config.noise)
    train_part, validation_part = parts["train"], parts["validation"]
    if task == "llmtime":
        train, validation = (windows(series_texts(part), tokenizer, max_length, config.stride)
                             for part in (train_part, validation_part))
        noise = f", {config.noise:g} observation noise" if config.noise else ""
        source = data or f"simulated Lotka-Volterra (seed {DATASET_SEED}{noise})"
        return TaskData(train, validation, f"llmtime: {len(train_part)} train / {len(validation_part)} validation "
                        f"systems from {source}, {len(train)} / {len(validation)} windows of {max_length} tokens")
    train, skipped = tokenize_examples(train_part, tokenizer, max_length)
    validation, _ = tokenize_examples(validation_part, tokenizer, max_length)
    source = data or "the embedded generated tasks"
    skipped = f" ({skipped} skipped: prompt longer than {max_length} tokens)" if skipped else ""
    return TaskData(train, validation,
                    f"instruct: {len(train)} train / {len(validation)} validation examples from {source}{skipped}")
