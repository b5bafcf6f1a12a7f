"""Tokenizing instruction records with the prompt masked out of the loss.

The loss counts only the answer: every prompt token gets the label -100, which PyTorch's
cross-entropy ignores. The model is then taught p(response | prompt), not to reproduce the
instruction, and the loss and perplexity it reports are conditional on the prompt.
"""

from data.sequences import IGNORE_INDEX
from data.template import format_prompt


def check_max_length(max_length: int) -> None:
    """Raise ValueError unless ``max_length`` leaves room for one prompt token and one response token."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt token and one response token), got {max_length}")


def check_eos(tokenizer) -> None:
    """Raise ValueError unless ``tokenizer`` has the EOS token every tokenized example ends with."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so the model learns where to stop")


def tokenize_example(example: dict, tokenizer, max_length: int = 512) -> dict | None:
    """Token ids of prompt + output + EOS, with labels -100 on the prompt; None if the prompt alone is too long.

    Truncation keeps the whole prompt and cuts the response from the end. The EOS goes last,
    so it survives only when the whole output fits: a cut answer never teaches the model to
    stop in mid-sentence.

    Args:
        example: a record with ``instruction`` and ``output``, and ``input`` (a missing or null one reads as "").
        tokenizer: a Hugging Face tokenizer with an ``eos_token``.
        max_length: the most tokens in the result.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, lists of ints of the same length; labels
        are -100 on each prompt token and equal ``input_ids`` on the response and EOS. None
        when the prompt leaves no room for a response token (``len(prompt) >= max_length``).

    Raises:
        ValueError: ``max_length < 2``, or the tokenizer has no EOS token.
    """
    check_max_length(max_length)
    check_eos(tokenizer)
    # Prompt and response are tokenized apart and concatenated. Tokenizing the joined string
    # can merge characters across the boundary into one token (SmolLM2's BPE makes one token
    # of the prompt's last "\n" and a space that starts the answer), and that token would be
    # half prompt, half answer: no mask could be exact. Apart, the boundary is exact by
    # construction, and it is also what happens at inference, where the prompt is tokenized
    # alone and the model continues it.
    # The prompt keeps the tokenizer's own special tokens (a BOS, if it has that convention);
    # the response gets none, since it continues the same sequence.
    prompt = tokenizer(format_prompt(example))["input_ids"]
    response = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return masked_prompt(prompt, response, max_length)


def masked_prompt(prompt: list[int], response: list[int], max_length: int) -> dict | None:
    """``prompt + response`` cut to ``max_length`` from the response's end, with labels -100 on the prompt;
    None when the prompt leaves no room for a response token."""
    if len(prompt) >= max_length:
        return None
    response = response[: max_length - len(prompt)]
    input_ids = [int(token) for token in prompt + response]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt) + input_ids[len(prompt):],
    }


def tokenize_examples(examples: list[dict], tokenizer, max_length: int = 512) -> tuple[list[dict], int]:
    """``tokenize_example`` on each example; return the tokenized ones and how many were skipped (too long).

    The same results, from two tokenizer calls on the whole list (every prompt, every output)
    rather than two per example: the tokenizer's batch call runs in its Rust core, and for the
    12,000 records of the instruct task's train and validation parts it is many times faster.

    Raises:
        ValueError: ``max_length < 2``, or the tokenizer has no EOS token.
    """
    check_max_length(max_length)
    check_eos(tokenizer)
    if not examples:
        return [], 0
    prompts = tokenizer([format_prompt(example) for example in examples])["input_ids"]
    responses = tokenizer([example["output"] for example in examples], add_special_tokens=False)["input_ids"]
    tokenized = [masked_prompt(prompt, response + [tokenizer.eos_token_id], max_length)
                 for prompt, response in zip(prompts, responses)]
    kept = [item for item in tokenized if item is not None]
    return kept, len(tokenized) - len(kept)
