"""Chunking long texts into fixed-length training windows that overlap.

A serialized time series is far longer than the context a small model is trained on, so it
is cut into windows of ``max_length`` tokens, a new one starting every ``stride`` tokens::

    tokens:   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        max_length = 4, stride = 3
    window 0: t0 t1 t2 t3
    window 1:          t3 t4 t5 t6                 consecutive windows share max_length - stride = 1 token
    window 2:                   t6 t7 t8 t9

With ``stride < max_length`` every window but the first starts with some context it has
already seen, so no token is predicted from nothing but the window's start. The last window
is padded to ``max_length``; padding gets attention mask 0 and label -100, so it is never
trained on (-100 is the index PyTorch's cross-entropy ignores).
"""

from collections.abc import Sequence

import torch

# Labels with this value add nothing to the loss: the ignore_index of F.cross_entropy and of
# transformers' own loss. models.loss, which scores them, holds its own copy (data and models do
# not import each other); tests/test_loss.py holds the two equal.
IGNORE_INDEX = -100


def window_starts(n_tokens: int, max_length: int, stride: int) -> list[int]:
    """Start offsets of the windows over ``n_tokens`` tokens: 0, stride, 2·stride, ... until one reaches the end."""
    starts = [0]
    while starts[-1] + max_length < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (padding is masked out either way)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")


def process_sequences(
    texts: Sequence[str], tokenizer, max_length: int = 512, stride: int = 256
) -> dict[str, torch.Tensor]:
    """Tokenize each text and cut it into windows of ``max_length`` tokens starting every ``stride`` tokens.

    Args:
        texts: the long strings, e.g. one LLMTIME-serialized series each. Windows never span two texts.
        tokenizer: a Hugging Face tokenizer; no special tokens are added.
        max_length: tokens per window (the model's training context).
        stride: tokens between window starts; ``max_length - stride`` tokens are shared by neighbours.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(n_windows, max_length)`` int64;
        labels equal input_ids except -100 on padding.

    Raises:
        ValueError: no texts, an empty text, ``max_length < 2``, or ``stride`` outside
            ``[1, max_length]`` (a larger stride would skip tokens).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one token to predict from, one to predict), got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}] or tokens are skipped, got {stride}")
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    pad = pad_token_id(tokenizer)

    input_ids, attention_mask = [], []
    for index, text in enumerate(texts):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        if len(ids) == 0:
            raise ValueError(f"texts[{index}] is empty; there is nothing to train on")
        # Pad the text to the end of its last window, then cut every window at once: unfold's windows
        # start at 0, stride, 2·stride, ..., the same starts as window_starts.
        end = window_starts(len(ids), max_length, stride)[-1] + max_length
        real = torch.arange(end) < len(ids)
        input_ids.append(torch.full((end,), pad).masked_scatter(real, ids).unfold(0, max_length, stride))
        attention_mask.append(real.long().unfold(0, max_length, stride))
    input_ids, attention_mask = torch.cat(input_ids), torch.cat(attention_mask)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
    }
