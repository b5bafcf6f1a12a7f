"""Batching: padding to the longest example, and length grouping that measurably cuts padding."""

import random

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader

from data.collate import (
    PadCollator,
    length_grouped_batches,
    padding_fraction,
    random_batches,
)
from data.sequences import IGNORE_INDEX

EXAMPLES = [
    {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
    {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    {"input_ids": torch.tensor([9, 10]), "labels": torch.tensor([-100, -100])},
]


def test_collator_pads_to_the_longest_example():
    batch = PadCollator(pad_token_id=0)(EXAMPLES)
    assert_close(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]]), rtol=0, atol=0)
    assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]), rtol=0, atol=0)
    assert_close(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100], [-100, -100, -100]]), rtol=0, atol=0)


def test_collator_labels_default_to_input_ids():
    batch = PadCollator(pad_token_id=3)([{"input_ids": [1, 2]}, {"input_ids": [4]}])
    assert_close(batch["labels"], torch.tensor([[1, 2], [4, IGNORE_INDEX]]), rtol=0, atol=0)


def test_collator_works_as_a_dataloader_collate_fn():
    batches = list(DataLoader(EXAMPLES, batch_size=2, collate_fn=PadCollator(pad_token_id=0)))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 3), (1, 2)]


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        PadCollator(pad_token_id=0)([])


def test_padding_fraction_counts_padded_slots():
    # One batch of lengths 2 and 4: 2 x 4 = 8 slots, 6 real tokens, 2 of padding.
    assert padding_fraction([2, 4], [[0, 1]]) == 2 / 8
    assert padding_fraction([3, 3, 5], [[0, 1], [2]]) == 0.0


@pytest.mark.parametrize("plan", ["random", "grouped"])
def test_batch_plans_use_every_example_once(plan):
    lengths = [random.Random(1).randint(1, 500) for _ in range(1003)]
    if plan == "random":
        batches = random_batches(len(lengths), 8, seed=3)
    else:
        batches = length_grouped_batches(lengths, 8, seed=3)
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(len(batch) <= 8 for batch in batches)
    assert len(batches) == -(-len(lengths) // 8)


def test_length_grouping_is_seeded():
    lengths = list(range(100))
    assert length_grouped_batches(lengths, 4, seed=5) == length_grouped_batches(lengths, 4, seed=5)
    assert length_grouped_batches(lengths, 4, seed=5) != length_grouped_batches(lengths, 4, seed=6)


def test_length_grouping_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 512) for _ in range(2000)]
    grouped = padding_fraction(lengths, length_grouped_batches(lengths, 8, seed=0))
    plain = padding_fraction(lengths, random_batches(len(lengths), 8, seed=0))
    assert grouped < plain / 5


def test_batch_size_zero_is_rejected():
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        length_grouped_batches([1, 2], 0)
