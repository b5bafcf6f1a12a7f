"""Instruction tuning data in Alpaca's format: load, template, tokenize with a masked prompt, split.

An instruction record is a JSON object with three strings, as in Stanford Alpaca's
``alpaca_data_cleaned.json``::

    {"instruction": "Reverse the letters of the word.", "input": "planet", "output": "tenalp"}

The model is trained on one text per record, the prompt followed by the answer and EOS::

    ### Instruction:
    Reverse the letters of the word.

    ### Input:
    planet

    ### Response:
    tenalp<eos>

When ``input`` is empty the ``### Input:`` block is left out, as Alpaca does. (Alpaca also
starts every prompt with a one-sentence preamble, "Below is an instruction that describes a
task..."; it carries no information about the task, so this project leaves it out.)

The loss counts only the answer: every prompt token gets the label -100, which PyTorch's
cross-entropy ignores. The model is then taught p(response | prompt), not to reproduce the
instruction, and the loss and perplexity it reports are conditional on the prompt.

``generate_tasks(n)`` makes an offline instruction set whose answers can be checked exactly
(arithmetic, unit conversion, sorting, ...), so a fine-tuning run can be scored without a
download and without a judge.
"""

import json
import os
import random
import warnings
from pathlib import Path

from lora.adapter import write_atomically
from training.sequences import IGNORE_INDEX

FIELDS = ("instruction", "input", "output")

TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATE_WITHOUT_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


# --- Loading and saving --------------------------------------------------------------------------------------------


def check_record(record, where: str) -> dict:
    """Return ``record`` if it is an object with the three string fields; ``where`` prefixes the error.

    Raises:
        ValueError: ``record`` is not a dict, or a field is missing or not a string.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with fields {', '.join(FIELDS)}, got {type(record).__name__}")
    for field in FIELDS:
        if field not in record:
            raise ValueError(f"{where}: field {field!r} is missing")
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
    return record


def load_instructions(path: str | os.PathLike) -> list[dict]:
    """Read instruction records from a JSON list (``.json``, Alpaca's format) or JSON Lines (``.jsonl``).

    The format is chosen by suffix: ``.jsonl`` is one object per line (blank lines are
    skipped), anything else is one JSON list of objects. Fields beyond the three (such as
    ``kind``) are kept. Records in a JSON list are counted from 1 in errors, as lines are.

    Returns:
        The records, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not UTF-8 text, malformed JSON, a record that is not an object, or a missing or
            non-string field; the message names the file and the line (JSONL) or record (JSON).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; write one with save_instructions(generate_tasks(n), path)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; instruction data is Alpaca .json or .jsonl "
                         "(a .npz of series is for the llmtime task)") from None

    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
            records.append(check_record(record, f"{path}: line {number}"))
        return records

    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}; "
                         "for one object per line name the file .jsonl")
    return [check_record(record, f"{path}: record {number}") for number, record in enumerate(records, start=1)]


def save_instructions(records: list[dict], path: str | os.PathLike) -> Path:
    """Write ``records`` as JSON Lines (``.jsonl``) or a JSON list (any other suffix); return the path.

    The records are checked first, so what is saved always loads again with
    ``load_instructions``. The file is replaced atomically: a crash leaves the old file or the
    new one, never half of one.

    Raises:
        ValueError: a record is not an object with the three string fields (named by number, from 1).
    """
    path = Path(path)
    for number, record in enumerate(records, start=1):
        check_record(record, f"record {number}")
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    else:
        text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return path


# --- Template and tokenization -------------------------------------------------------------------------------------


def format_prompt(example: dict) -> str:
    """The prompt of ``example``: the Alpaca template up to and including ``### Response:\\n``.

    The Input block is left out when ``example["input"]`` is the empty string.
    """
    template = TEMPLATE_WITH_INPUT if example["input"] else TEMPLATE_WITHOUT_INPUT
    return template.format(instruction=example["instruction"], input=example["input"])


def check_max_length(max_length: int) -> None:
    """Raise ValueError unless ``max_length`` leaves room for one prompt token and one response token."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt token and one response token), got {max_length}")


def tokenize_example(example: dict, tokenizer, max_length: int = 512) -> dict | None:
    """Token ids of prompt + output + EOS, with labels -100 on the prompt; None if the prompt alone is too long.

    Truncation keeps the whole prompt and cuts the response from the end. The EOS goes last,
    so it survives only when the whole output fits: a cut answer never teaches the model to
    stop in mid-sentence.

    Args:
        example: a record with ``instruction``, ``input`` and ``output``.
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
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so the model learns where to stop")
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

    Raises:
        ValueError: ``max_length < 2``, or the tokenizer has no EOS token.
    """
    check_max_length(max_length)
    tokenized = [tokenize_example(example, tokenizer, max_length) for example in examples]
    kept = [item for item in tokenized if item is not None]
    return kept, len(tokenized) - len(kept)


# --- Train / validation / test split -------------------------------------------------------------------------------


def clamp_sizes(sizes: tuple[int, ...], n: int) -> tuple[int, ...]:
    """``sizes`` when they fit in ``n`` records, else ``n`` shared out in proportion to them.

    The proportional shares are rounded down, the records left over go to the parts with the
    largest remainders (the first part wins a tie), and then a part that asked for records
    but got none takes one from the largest part, as long as that part keeps at least one.
    So every asked-for part is non-empty whenever ``n`` allows it.

    Raises:
        ValueError: a size is not a non-negative integer.
    """
    if any(not isinstance(size, int) or isinstance(size, bool) or size < 0 for size in sizes):
        raise ValueError(f"sizes must be non-negative integers, got {tuple(sizes)}")
    total = sum(sizes)
    if total <= n:
        return tuple(sizes)
    shares = [size * n // total for size in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(sizes[i] * n % total), i))
    for i in by_remainder[: n - sum(shares)]:
        shares[i] += 1
    for i, size in enumerate(sizes):
        largest = max(range(len(shares)), key=lambda j: shares[j])
        if size > 0 and shares[i] == 0 and shares[largest] > 1:
            shares[largest] -= 1
            shares[i] = 1
    return tuple(shares)


def split(
    records: list, sizes: tuple[int, int, int] = (10_000, 2_000, 2_000), seed: int = 42
) -> tuple[list, list, list]:
    """A seeded shuffle of ``records`` cut into (train, validation, test) of ``sizes``: disjoint and repeatable.

    ``random.Random(seed)`` shuffles the record positions; train is the first ``sizes[0]``,
    validation the next ``sizes[1]``, test the next ``sizes[2]``. Records beyond the sum are
    not used. With fewer records than the sum, the sizes are clamped by ``clamp_sizes`` and a
    warning says what was asked and what was given.

    Raises:
        ValueError: ``sizes`` is not three non-negative integers.
    """
    if len(sizes) != 3:
        raise ValueError(f"sizes must be three numbers (train, validation, test), got {tuple(sizes)}")
    used = clamp_sizes(sizes, len(records))
    if used != tuple(sizes):
        warnings.warn(
            f"split: asked for {' + '.join(map(str, sizes))} = {sum(sizes)} records but {len(records)} were given; "
            f"using {' + '.join(map(str, used))} (in proportion)",
            stacklevel=2,
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    train_end, validation_end = used[0], used[0] + used[1]
    return (
        [records[i] for i in order[:train_end]],
        [records[i] for i in order[train_end:validation_end]],
        [records[i] for i in order[validation_end:validation_end + used[2]]],
    )


# --- An embedded instruction set with checkable answers ------------------------------------------------------------

WORDS = (
    "apple", "banana", "river", "planet", "garden", "window", "purple", "rocket", "silver", "forest",
    "pencil", "mirror", "castle", "dragon", "bottle", "candle", "butter", "winter", "summer", "letter",
    "orange", "monkey", "button", "ladder", "marble", "pepper", "rabbit", "saddle", "tunnel", "violin",
    "yellow", "zipper", "anchor", "basket", "cotton", "desert", "engine", "falcon", "guitar", "harbor",
)

# (from, to, how many "to" in one "from"): exact integer factors only, so answers are exact.
CONVERSIONS = (
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b, operator = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-*")
    if operator == "*":
        b = rng.randint(0, 12)  # times tables: multiplication a small model can learn
    result = a + b if operator == "+" else a - b if operator == "-" else a * b
    return "Calculate the result.", f"{a} {operator} {b}", str(result)


def _unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    source, target, factor = rng.choice(CONVERSIONS)
    amount = rng.randint(1, 20)
    return f"Convert {amount} {source} to {target}. Answer with the number only.", "", str(amount * factor)


def _sort(rng: random.Random) -> tuple[str, str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return "Sort the numbers in ascending order.", ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return "Reverse the letters of the word.", word, word[::-1]


def _count_letter(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")  # sometimes 0
    return f"How many times does the letter '{letter}' appear in the word?", word, str(word.count(letter))


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    return "Write the text in capital letters.", text, text.upper()


def _larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1000), 2)  # two different numbers, so there is one answer
    return f"Which is larger, {a} or {b}? Answer with the number only.", "", str(max(a, b))


def _next_number(rng: random.Random) -> tuple[str, str, str]:
    start, step, length = rng.randint(0, 50), rng.randint(1, 12), rng.randint(3, 5)
    sequence = [start + step * i for i in range(length)]
    return "What number comes next in the sequence?", ", ".join(map(str, sequence)), str(start + step * length)


# Two kinds (unit_conversion, larger) put everything in the instruction and leave input
# empty, so both branches of the template are trained and tested.
TASKS = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "sort": _sort,
    "reverse": _reverse,
    "count_letter": _count_letter,
    "uppercase": _uppercase,
    "larger": _larger,
    "next_number": _next_number,
}
TASK_KINDS = tuple(TASKS)


def generate_tasks(n: int, seed: int = 0) -> list[dict]:
    """``n`` instruction records with exact answers, the kinds taken in turn; the same for the same seed.

    Each record has ``instruction``, ``input``, ``output`` (the answer as a string) and
    ``kind`` (one of ``TASK_KINDS``). Taking the kinds in turn makes their counts differ by at
    most one. Every character is printable ASCII, so the character-level tokenizer of the tiny
    models covers them.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be a non-negative number of tasks, got {n}")
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = TASK_KINDS[i % len(TASK_KINDS)]
        instruction, input_, output = TASKS[kind](rng)
        records.append({"instruction": instruction, "input": input_, "output": output, "kind": kind})
    return records
