"""Instruction records in Alpaca's format, on disk: check, load (JSON or JSON Lines), save.

An instruction record is a JSON object with three strings, as in Stanford Alpaca's
``alpaca_data_cleaned.json``::

    {"instruction": "Reverse the letters of the word.", "input": "planet", "output": "tenalp"}

Many instruction files leave ``input`` out when it is empty (or write ``null``); such a record
reads as ``"input": ""``, as Stanford Alpaca's own ``train.py`` reads it
(``example.get("input", "")``). ``instruction`` and ``output`` must be there.

The rest of instruction tuning lives beside this file, one concept each: ``data/template.py``
(the prompt a record becomes), ``data/tokenization.py`` (tokens, with the prompt masked out of
the loss), ``data/split.py`` (train / validation / test) and ``data/generated_tasks.py`` (an
offline instruction set with exact answers).
"""

import json
import os
from pathlib import Path

from lora.atomic import write_atomically

FIELDS = ("instruction", "input", "output")


def check_record(record, where: str) -> dict:
    """``record`` with its three string fields, a missing or null ``input`` read as ``""``; ``where`` prefixes errors.

    The one place that decides what a record is: loading and saving both call it. A record
    whose ``input`` is missing or null comes back as a new dict with ``"input": ""`` (other
    fields kept); any other record comes back as it is.

    Raises:
        ValueError: ``record`` is not a dict, ``instruction`` or ``output`` is missing, or a field
            is not a string.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with fields {', '.join(FIELDS)}, got {type(record).__name__}")
    if record.get("input") is None:
        record = {**record, "input": ""}
    for field in FIELDS:
        if field not in record:
            raise ValueError(f"{where}: field {field!r} is missing")
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
    return record


def read_json(text: str, where: str, name_the_line: bool = False):
    """``json.loads(text)``; any failure a one-line ValueError starting with ``where`` (and the line, if asked).

    Besides malformed JSON, Python refuses an integer of more than 4300 digits (ValueError) and
    nesting deeper than its stack (RecursionError); those are named as the file's too.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = f": line {error.lineno}" if name_the_line else ""
        raise ValueError(f"{where}{line}: not valid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{where}: JSON that Python cannot read ({error})") from None


def load_instructions(path: str | os.PathLike) -> list[dict]:
    """Read instruction records from a JSON list (``.json``, Alpaca's format) or JSON Lines (``.jsonl``).

    The format is chosen by suffix: ``.jsonl`` is one object per line (blank lines are
    skipped), anything else is one JSON list of objects. Fields beyond the three (such as
    ``kind``) are kept; a missing or null ``input`` is read as ``""`` (``check_record``).
    Records in a JSON list are counted from 1 in errors, as lines are.

    Returns:
        The records, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not UTF-8 text, malformed JSON, a record that is not an object, a missing
            ``instruction`` or ``output``, or a non-string field; the message names the file and
            the line (JSONL) or record (JSON).
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
        # Lines end at "\n" alone, as JSON Lines says: str.splitlines() would also cut at U+2028,
        # U+0085 and others, which JSON allows unescaped inside a string (save_instructions writes them so).
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            records.append(check_record(read_json(line, where), where))
        return records

    records = read_json(text, str(path), name_the_line=True)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}; "
                         "for one object per line name the file .jsonl")
    return [check_record(record, f"{path}: record {number}") for number, record in enumerate(records, start=1)]


def save_instructions(records: list[dict], path: str | os.PathLike) -> Path:
    """Write ``records`` as JSON Lines (``.jsonl``) or a JSON list (any other suffix); return the path.

    The records are checked first, so what is saved always loads again with
    ``load_instructions``; a record without ``input`` is written with ``"input": ""``, Alpaca's
    three fields in full. The file is replaced atomically: a crash leaves the old file or the
    new one, never half of one.

    Raises:
        ValueError: a record is not an object with the string fields ``instruction`` and
            ``output`` and an ``input`` that is a string, null or missing (named by number, from 1).
    """
    path = Path(path)
    records = [check_record(record, f"record {number}") for number, record in enumerate(records, start=1)]
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    else:
        text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return path
