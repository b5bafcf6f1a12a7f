"""Chunking with stride: every token covered, exact overlaps, no label on padding, bad input."""

import pytest
import torch

from data.sequences import IGNORE_INDEX, process_sequences, window_starts
from models.loader import char_tokenizer

TOKENIZER = char_tokenizer()  # one token per character, so token positions are character positions
TEXTS = ["0.52,1.41;0.53,1.39;0.55,1.36;0.58,1.31;0.62,1.27", "1.0,2.0", "x" * 64]


def windows_of(text, max_length, stride):
    """The real (unpadded) token windows ``process_sequences`` makes of one text."""
    out = process_sequences([text], TOKENIZER, max_length=max_length, stride=stride)
    return [ids[mask.bool()].tolist() for ids, mask in zip(out["input_ids"], out["attention_mask"])]


def test_window_starts_follow_the_docstring_example():
    assert window_starts(10, max_length=4, stride=3) == [0, 3, 6]


@pytest.mark.parametrize("max_length, stride", [(8, 4), (8, 8), (8, 1), (5, 3), (16, 7), (64, 32), (100, 50)])
def test_every_token_of_every_text_is_in_some_window(max_length, stride):
    for text in TEXTS:
        ids = TOKENIZER(text, add_special_tokens=False).input_ids
        covered = set()
        for start, window in zip(window_starts(len(ids), max_length, stride), windows_of(text, max_length, stride)):
            assert window == ids[start : start + max_length]
            covered.update(range(start, start + len(window)))
        assert covered == set(range(len(ids)))


@pytest.mark.parametrize("max_length, stride", [(8, 4), (8, 8), (8, 1), (5, 3), (16, 7)])
def test_consecutive_windows_share_exactly_max_length_minus_stride_tokens(max_length, stride):
    windows = windows_of(TEXTS[0], max_length, stride)
    assert len(windows) > 2
    for first, second in zip(windows, windows[1:]):
        if len(second) == max_length:
            assert first[stride:] == second[: max_length - stride]
        else:  # the last, short window still starts stride tokens after the one before
            assert first[stride:] == second[: len(first) - stride]


def test_windows_are_padded_and_padding_has_no_label():
    out = process_sequences(TEXTS, TOKENIZER, max_length=16, stride=8)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    assert out["input_ids"].shape[1] == 16
    padding = out["attention_mask"] == 0
    assert padding.any()  # "1.0,2.0" is 7 tokens: 9 of padding
    assert (out["labels"][padding] == IGNORE_INDEX).all()
    assert (out["input_ids"][padding] == TOKENIZER.pad_token_id).all()
    torch.testing.assert_close(out["labels"][~padding], out["input_ids"][~padding], rtol=0, atol=0)


def test_windows_never_span_two_texts():
    out = process_sequences(["ab", "cd"], TOKENIZER, max_length=4, stride=2)
    assert TOKENIZER.batch_decode(out["input_ids"], skip_special_tokens=True) == ["ab", "cd"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_length=1, stride=1), "max_length must be at least 2"),
        (dict(max_length=8, stride=0), r"stride must be in \[1, max_length=8\]"),
        (dict(max_length=8, stride=9), r"stride must be in \[1, max_length=8\] or tokens are skipped"),
    ],
)
def test_bad_lengths_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        process_sequences(TEXTS, TOKENIZER, **kwargs)


@pytest.mark.parametrize(
    "texts, message", [([], "non-empty list"), ("a string", "non-empty list"), (["ok", ""], r"texts\[1\] is empty")]
)
def test_empty_input_is_rejected(texts, message):
    with pytest.raises(ValueError, match=message):
        process_sequences(texts, TOKENIZER, max_length=8, stride=4)
