"""Each task's parts: one function decides what is train, validation and test, and every user asks it."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from data.generated_tasks import generate_tasks
from data.instructions import save_instructions
from data.lotka_volterra import create_dataset, save_dataset
from data.split import split
from data.tasks import DATASET_SEED, GENERATED_TASKS, PARTS, series_texts, task_parts, task_split, windows
from eval.perplexity import held_out_examples
from models.loader import char_tokenizer


def test_llmtime_parts_are_the_datasets_split_by_system(tmp_path):
    dataset = create_dataset(n_systems=30, n_steps=20, seed=3)
    parts = task_parts("llmtime", str(save_dataset(dataset, tmp_path / "lv.npz")))
    assert list(parts) == list(PARTS)
    for part in PARTS:
        np.testing.assert_array_equal(parts[part], dataset.split(part))
    assert sum(len(parts[part]) for part in PARTS) == 30


def test_instruct_parts_are_disjoint_and_the_default_is_the_embedded_split():
    parts = task_parts("instruct")
    expected = split(generate_tasks(GENERATED_TASKS, seed=DATASET_SEED))
    for part, records in zip(PARTS, expected):
        assert parts[part] == records
    keys = [{(r["instruction"], r["input"], r["output"], id(r)) for r in parts[part]} for part in PARTS]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert [len(parts[part]) for part in PARTS] == [10_000, 2_000, 2_000]


def test_task_split_is_one_part_of_task_parts(tmp_path):
    data = str(save_instructions(generate_tasks(50, seed=1), tmp_path / "tasks.jsonl"))
    with pytest.warns(UserWarning, match="asked for"):
        parts = task_parts("instruct", data)
    with pytest.warns(UserWarning, match="asked for"):
        assert task_split("instruct", "validation", data) == parts["validation"]


def test_perplexity_scores_the_test_part(tmp_path):
    tokenizer = char_tokenizer()
    data = str(save_dataset(create_dataset(n_systems=20, n_steps=12, seed=0), tmp_path / "lv.npz"))
    examples = held_out_examples("llmtime", tokenizer, data, max_length=64)
    expected = windows(series_texts(task_split("llmtime", "test", data)), tokenizer, 64, 32)
    assert len(examples) == len(expected)
    for ours, theirs in zip(examples, expected):
        assert_close(torch.as_tensor(ours["input_ids"]), torch.as_tensor(theirs["input_ids"]), rtol=0, atol=0)


@pytest.mark.parametrize("task, kind", [("llmtime", "a .npz written by save_dataset"),
                                        ("instruct", "Alpaca .json or .jsonl")])
def test_a_missing_data_file_names_what_the_task_takes(task, kind):
    with pytest.raises(FileNotFoundError, match=f"nowhere.dat: no such data file; the {task} task takes {kind}"):
        task_parts(task, "nowhere.dat")


@pytest.mark.parametrize("task, part", [("translate", "train"), ("llmtime", "holdout")])
def test_an_unknown_task_or_part_is_named(task, part):
    with pytest.raises(ValueError, match="must be one of"):
        task_split(task, part)


def test_llmtime_parts_with_noise_are_the_noisy_observations_of_the_same_systems():
    noisy = task_parts("llmtime", noise=0.05)
    dataset = create_dataset(seed=DATASET_SEED, noise=0.05)
    for part in PARTS:
        np.testing.assert_array_equal(noisy[part], dataset.split(part))


@pytest.mark.parametrize("task, data, message", [
    ("llmtime", "lv.npz", "--noise 0.05 applies to the simulated series; lv.npz holds its own observations"),
    ("instruct", None, "--noise is for the llmtime task's series"),
])
def test_noise_where_it_does_not_apply_is_refused(task, data, message):
    with pytest.raises(ValueError, match=message):
        task_parts(task, data, noise=0.05)
