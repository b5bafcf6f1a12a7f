"""Batching examples of different lengths: pad to the longest, and group similar lengths.

A batch is one rectangular tensor, so shorter examples are padded to the longest one in the
batch. Padding costs compute (the model runs on it) and teaches nothing (it is masked out).
Putting examples of similar length in the same batch cuts it; ``padding_fraction`` measures
how much of a batch plan is padding, so the effect can be seen rather than assumed.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data.sequences import IGNORE_INDEX


@dataclass
class PadCollator:
    """``collate_fn`` for a DataLoader: pads ``input_ids``, ``attention_mask`` and ``labels`` to the longest example.

    Padding goes on the right: ``input_ids`` get ``pad_token_id``, ``attention_mask`` 0 and
    ``labels`` -100, so padded positions are neither attended to nor trained on. An example
    without ``attention_mask`` gets ones; one without ``labels`` gets a copy of its ``input_ids``.
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(example["input_ids"]) for example in examples)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for example in examples:
            ids = list(example["input_ids"])
            mask = list(example.get("attention_mask", [1] * len(ids)))
            labels = list(example.get("labels", ids))
            padding = longest - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * padding)
            batch["attention_mask"].append(mask + [0] * padding)
            batch["labels"].append(labels + [IGNORE_INDEX] * padding)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def random_batches(n_examples: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """The plain plan: shuffle the indices, cut them into batches (the last may be smaller)."""
    _check_batch_size(batch_size)
    order = list(range(n_examples))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int = 0, group_factor: int = 50
) -> list[list[int]]:
    """Batches of similar-length examples, still in random order.

    Shuffle, cut the order into groups of ``group_factor * batch_size`` examples, sort each
    group by length, cut it into batches, then shuffle the batches. Sorting within groups
    rather than over the whole data set keeps some randomness in which examples meet (the
    scheme of Hugging Face's ``LengthGroupedSampler``).
    """
    _check_batch_size(batch_size)
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group_size = group_factor * batch_size
    batches = []
    for start in range(0, len(order), group_size):
        group = sorted(order[start : start + group_size], key=lambda index: lengths[index], reverse=True)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of the token slots of a batch plan that are padding: 1 - real tokens / (batch size x longest)."""
    slots = sum(len(batch) * max(lengths[index] for index in batch) for batch in batches)
    real = sum(lengths[index] for batch in batches for index in batch)
    return 1 - real / slots


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
