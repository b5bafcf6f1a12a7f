"""Instruction data: Alpaca's template, the prompt mask, truncation, loading errors, the split, the task set."""

import json
import random
import re

import pytest

from data.generated_tasks import TASK_KINDS, generate_tasks
from data.instructions import load_instructions, save_instructions
from data.split import clamp_sizes, split
from data.template import format_prompt
from data.tokenization import tokenize_example, tokenize_examples
from models.loader import char_tokenizer

WITH_INPUT = {"instruction": "Reverse the word.", "input": "planet", "output": "tenalp"}
WITHOUT_INPUT = {"instruction": "Which is larger, 3 or 7?", "input": "", "output": "7"}


@pytest.fixture(scope="module")
def chars():
    """One token per character, so a string of n characters is n tokens and the boundary is plain to see."""
    return char_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- Template --------------------------------------------------------------------------------------------------------


def test_prompt_template_with_input():
    assert format_prompt(WITH_INPUT) == "### Instruction:\nReverse the word.\n\n### Input:\nplanet\n\n### Response:\n"


def test_prompt_template_without_input_leaves_out_the_input_block():
    assert format_prompt(WITHOUT_INPUT) == "### Instruction:\nWhich is larger, 3 or 7?\n\n### Response:\n"


# --- Tokenization and the prompt mask --------------------------------------------------------------------------------


@pytest.mark.parametrize("example", [WITH_INPUT, WITHOUT_INPUT], ids=["with_input", "without_input"])
def test_labels_are_minus_100_exactly_on_the_prompt_and_the_ids_after_it(chars, example):
    prompt = format_prompt(example)
    item = tokenize_example(example, chars)
    assert item["input_ids"] == ids(chars, prompt) + ids(chars, example["output"]) + [chars.eos_token_id]
    assert item["labels"] == [-100] * len(prompt) + item["input_ids"][len(prompt):]
    assert item["attention_mask"] == [1] * len(item["input_ids"])


def test_sequence_ends_with_eos_and_eos_is_a_label(chars):
    item = tokenize_example(WITH_INPUT, chars)
    assert item["input_ids"][-1] == chars.eos_token_id
    assert item["labels"][-1] == chars.eos_token_id


def test_tokenized_fields_are_plain_python_int_lists(chars):
    item = tokenize_example(WITH_INPUT, chars)
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    for values in item.values():
        assert type(values) is list and all(type(value) is int for value in values)


def test_truncation_keeps_the_prompt_and_cuts_the_response(chars):
    prompt = format_prompt(WITH_INPUT)
    item = tokenize_example(WITH_INPUT, chars, max_length=len(prompt) + 3)
    assert item["input_ids"] == ids(chars, prompt) + ids(chars, "ten")  # no EOS: the answer was cut
    assert item["labels"] == [-100] * len(prompt) + ids(chars, "ten")


def test_eos_is_kept_only_when_the_whole_output_fits(chars):
    prompt, output = format_prompt(WITH_INPUT), WITH_INPUT["output"]
    fits = tokenize_example(WITH_INPUT, chars, max_length=len(prompt) + len(output) + 1)
    one_short = tokenize_example(WITH_INPUT, chars, max_length=len(prompt) + len(output))
    assert fits["input_ids"][-1] == chars.eos_token_id
    assert one_short["input_ids"] == ids(chars, prompt) + ids(chars, output)


def test_prompt_that_leaves_no_room_for_a_response_token_gives_none(chars):
    prompt = format_prompt(WITH_INPUT)
    assert tokenize_example(WITH_INPUT, chars, max_length=len(prompt)) is None
    shortest = tokenize_example(WITH_INPUT, chars, max_length=len(prompt) + 1)
    assert shortest["labels"] == [-100] * len(prompt) + ids(chars, "t")


def test_tokenize_examples_counts_the_skipped_ones(chars):
    long_prompt = dict(WITH_INPUT, input="x" * 100)
    max_length = len(format_prompt(WITH_INPUT)) + 10
    kept, skipped = tokenize_examples([WITH_INPUT, long_prompt, WITHOUT_INPUT, long_prompt], chars, max_length)
    assert skipped == 2
    assert kept == [tokenize_example(WITH_INPUT, chars, max_length), tokenize_example(WITHOUT_INPUT, chars, max_length)]


def test_tokenize_examples_equals_tokenize_example_on_each(chars):
    """Two batched tokenizer calls give what one example at a time gives, cut and skipped ones included."""
    examples = generate_tasks(300, seed=2)
    median_prompt = sorted(len(chars(format_prompt(example))["input_ids"]) for example in examples)[150]
    for max_length in (median_prompt + 3, 4096):  # about half skipped and some cut; then every one whole
        one_by_one = [tokenize_example(example, chars, max_length) for example in examples]
        kept, skipped = tokenize_examples(examples, chars, max_length)
        assert kept == [item for item in one_by_one if item is not None]
        assert skipped == one_by_one.count(None)
    assert skipped == 0


@pytest.mark.parametrize("max_length", [1, 0, -5])
def test_max_length_below_two_is_an_error(chars, max_length):
    with pytest.raises(ValueError, match=f"max_length must be at least 2.*got {max_length}"):
        tokenize_example(WITH_INPUT, chars, max_length)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenize_examples([], chars, max_length)


def test_tokenizer_without_eos_is_an_error():
    tokenizer = char_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no eos_token"):
        tokenize_example(WITH_INPUT, tokenizer)


@pytest.mark.slow
def test_bpe_mask_boundary_is_exactly_the_prompt():
    from models.loader import load_tokenizer

    tokenizer = load_tokenizer()  # SmolLM2's byte-level BPE
    # An answer that starts with spaces: tokenized joined to the prompt, "\n" and " " merge into one token.
    spaced = dict(WITHOUT_INPUT, output="  7")
    joined = tokenizer(format_prompt(spaced) + spaced["output"])["input_ids"]
    assert joined != tokenize_example(spaced, tokenizer)["input_ids"][:-1]  # so a joined mask could not be exact
    examples = [WITH_INPUT, WITHOUT_INPUT, spaced, *generate_tasks(16)]
    assert tokenize_examples(examples, tokenizer)[0] == [tokenize_example(example, tokenizer) for example in examples]
    for example in examples:
        item = tokenize_example(example, tokenizer)
        prompt_ids = [t for t, label in zip(item["input_ids"], item["labels"]) if label == -100]
        response_ids = [label for label in item["labels"] if label != -100]
        assert prompt_ids == item["input_ids"][: len(prompt_ids)]  # the mask is one prefix
        assert tokenizer.decode(prompt_ids) == format_prompt(example)
        assert tokenizer.decode(response_ids) == example["output"] + tokenizer.eos_token


# --- Loading and saving ----------------------------------------------------------------------------------------------

RECORDS = [dict(WITH_INPUT, kind="reverse"), dict(WITHOUT_INPUT, kind="larger")]


def test_json_list_loads_with_extra_fields_kept(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    assert load_instructions(path) == RECORDS


def test_jsonl_loads_one_record_per_line_skipping_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n  \n" + json.dumps(RECORDS[1]) + "\n")
    assert load_instructions(path) == RECORDS


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json: no such file"):
        load_instructions(tmp_path / "nowhere.json")


GOOD_LINE = json.dumps(WITH_INPUT)


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"instruction": "x", ', r"line 3: not valid JSON"),
        ('["x", "", "y"]', r"line 3: expected an object with fields instruction, input, output, got list"),
        ('{"instruction": "x", "input": ""}', r"line 3: field 'output' is missing"),
        ('{"instruction": "x", "input": 5, "output": "y"}', r"line 3: field 'input' must be a string, got int"),
    ],
    ids=["malformed", "not_an_object", "missing_field", "wrong_type"],
)
def test_bad_jsonl_line_names_the_file_and_line(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD_LINE}\n{GOOD_LINE}\n{bad}\n{GOOD_LINE}\n")
    with pytest.raises(ValueError, match=r"data\.jsonl: " + message):
        load_instructions(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("null", r"record 2: expected an object with fields instruction, input, output, got NoneType"),
        ('{"input": "x", "output": "y"}', r"record 2: field 'instruction' is missing"),
        ('{"instruction": ["x"], "input": "", "output": "y"}', r"record 2: field 'instruction' must be a string"),
    ],
    ids=["not_an_object", "missing_field", "wrong_type"],
)
def test_bad_json_record_names_the_file_and_record(tmp_path, bad, message):
    path = tmp_path / "data.json"
    path.write_text(f"[\n{GOOD_LINE},\n{bad},\n{GOOD_LINE}\n]\n")
    with pytest.raises(ValueError, match=r"data\.json: " + message):
        load_instructions(path)


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
@pytest.mark.parametrize("absent", [{}, {"input": None}], ids=["missing", "null"])
def test_missing_or_null_input_loads_as_empty(tmp_path, name, absent):
    record = {"instruction": "Which is larger, 3 or 7?", **absent, "output": "7", "kind": "larger"}
    path = tmp_path / name
    path.write_text(json.dumps(record) + "\n" if name.endswith(".jsonl") else json.dumps([record]))
    assert load_instructions(path) == [dict(WITHOUT_INPUT, kind="larger")]


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
@pytest.mark.parametrize("field", ["instruction", "output"])
@pytest.mark.parametrize("absent", ["missing", "null"])
def test_missing_or_null_instruction_or_output_is_still_an_error(tmp_path, name, field, absent):
    record = dict(WITH_INPUT)
    if absent == "missing":
        del record[field]
    else:
        record[field] = None
    path = tmp_path / name
    path.write_text(json.dumps(record) + "\n" if name.endswith(".jsonl") else json.dumps([record]))
    where = "line 1" if name.endswith(".jsonl") else "record 1"
    message = f"field {field!r} " + ("is missing" if absent == "missing" else "must be a string, got NoneType")
    with pytest.raises(ValueError, match=re.escape(f"{path}: {where}: {message}")):
        load_instructions(path)


def test_a_record_without_input_tokenizes_as_one_with_empty_input(chars):
    without = {"instruction": WITHOUT_INPUT["instruction"], "output": WITHOUT_INPUT["output"]}
    assert format_prompt(without) == format_prompt(WITHOUT_INPUT)
    assert tokenize_example(without, chars) == tokenize_example(WITHOUT_INPUT, chars)


def test_a_record_without_input_is_saved_with_empty_input(tmp_path):
    path = save_instructions([{"instruction": "x", "output": "y"}], tmp_path / "data.jsonl")
    assert json.loads(path.read_text()) == {"instruction": "x", "output": "y", "input": ""}


@pytest.mark.parametrize("name, where", [("data.json", ""), ("data.jsonl", " line 2:")])
@pytest.mark.parametrize("value, why", [("1" * 5000, "Exceeds the limit"), ("[" * 100_000, "maximum recursion depth")],
                         ids=["integer_of_5000_digits", "nested_100000_deep"])
def test_json_python_cannot_read_is_a_value_error_naming_the_file(tmp_path, name, where, value, why):
    path = tmp_path / name
    record = f'{{"instruction": "x", "output": {value}}}'
    path.write_text(f"{GOOD_LINE}\n{record}\n" if name.endswith(".jsonl") else f"[{GOOD_LINE}, {record}]")
    with pytest.raises(ValueError, match=re.escape(f"{path}:{where} JSON that Python cannot read ({why}")):
        load_instructions(path)


def test_binary_file_is_named_as_not_instruction_data(tmp_path):
    path = tmp_path / "series.npz"
    path.write_bytes(b"PK\x03\x04\x80\xff binary, as a .npz of series is")
    with pytest.raises(ValueError, match=r"series\.npz: not a text file; instruction data is Alpaca \.json or \.jsonl"):
        load_instructions(path)


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(f'[\n{GOOD_LINE},\n{{"instruction": "x",,}}\n]\n')
    with pytest.raises(ValueError, match=r"data\.json: line 3: not valid JSON"):
        load_instructions(path)


def test_json_that_is_not_a_list_is_an_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(GOOD_LINE)
    with pytest.raises(ValueError, match=r"data\.json: expected a JSON list of records, got dict"):
        load_instructions(path)


@pytest.mark.parametrize("name", ["tasks.json", "tasks.jsonl"])
def test_save_then_load_gives_the_same_records(tmp_path, name):
    records = generate_tasks(40)
    path = save_instructions(records, tmp_path / name)
    assert load_instructions(path) == records
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_jsonl_is_saved_one_record_per_line(tmp_path):
    path = save_instructions(RECORDS, tmp_path / "data.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == RECORDS


def test_saving_an_invalid_record_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="record 2: field 'output' is missing"):
        save_instructions([WITH_INPUT, {"instruction": "x", "input": ""}], tmp_path / "data.json")
    assert not (tmp_path / "data.json").exists()


# --- Split ----------------------------------------------------------------------------------------------------------

NUMBERED = [{"id": i} for i in range(100)]


def test_split_has_the_asked_sizes():
    train, validation, test = split(NUMBERED, sizes=(60, 25, 10))
    assert (len(train), len(validation), len(test)) == (60, 25, 10)


def test_split_parts_are_disjoint_records_of_the_input():
    parts = split(NUMBERED, sizes=(60, 25, 15))
    seen = [record["id"] for part in parts for record in part]
    assert sorted(seen) == list(range(100))  # each record once, none twice, none invented


def test_split_is_a_seeded_python_shuffle_cut_in_order():
    order = list(range(100))
    random.Random(7).shuffle(order)
    train, validation, test = split(NUMBERED, sizes=(50, 20, 10), seed=7)
    assert [r["id"] for r in train] == order[:50]
    assert [r["id"] for r in validation] == order[50:70]
    assert [r["id"] for r in test] == order[70:80]


def test_split_is_the_same_for_the_same_seed_and_differs_for_another():
    assert split(NUMBERED, (50, 20, 10), seed=1) == split(NUMBERED, (50, 20, 10), seed=1)
    assert split(NUMBERED, (50, 20, 10), seed=1) != split(NUMBERED, (50, 20, 10), seed=2)


def test_split_of_too_few_records_clamps_in_proportion_with_a_warning():
    message = r"asked for 1000 \+ 200 \+ 200 = 1400 records but 70 were given; using 50 \+ 10 \+ 10"
    with pytest.warns(UserWarning, match=message):
        train, validation, test = split(NUMBERED[:70], sizes=(1000, 200, 200))
    assert (len(train), len(validation), len(test)) == (50, 10, 10)


def test_split_that_fits_does_not_warn(recwarn):
    split(NUMBERED, sizes=(50, 25, 25))
    assert len(recwarn) == 0


@pytest.mark.parametrize("n", [3, 4, 5, 10])
def test_clamped_parts_are_all_non_empty_when_possible_and_use_every_record(n):
    sizes = clamp_sizes((10_000, 2_000, 2_000), n)
    assert sum(sizes) == n
    assert min(sizes) >= 1
    assert sizes[0] >= sizes[1] >= sizes[2]


def test_clamping_rounds_down_then_gives_leftovers_to_the_largest_remainders():
    # 10 records for 1 : 1 : 1 is 3.33 each; the one left over goes to the first part (a tie).
    assert clamp_sizes((5, 5, 5), 10) == (4, 3, 3)
    # 2 records cannot fill three parts; the parts asked for first are filled first.
    assert clamp_sizes((10_000, 2_000, 2_000), 2) == (1, 1, 0)
    assert clamp_sizes((10_000, 2_000, 2_000), 0) == (0, 0, 0)


@pytest.mark.parametrize("sizes", [(10, -1, 5), (10, 2.5, 5), (10, 5)])
def test_bad_split_sizes_are_an_error(sizes):
    with pytest.raises(ValueError, match="sizes must be"):
        split(NUMBERED, sizes=sizes)


# --- The embedded task set ------------------------------------------------------------------------------------------

# Each kind's answer worked out again here from the record, not by calling the generator.
UNITS = {("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000, ("hours", "minutes"): 60,
         ("minutes", "seconds"): 60, ("days", "hours"): 24, ("weeks", "days"): 7}


def numbers(text):
    return [int(number) for number in re.findall(r"-?\d+", text)]


def expected_answer(record):
    kind, instruction, text = record["kind"], record["instruction"], record["input"]
    if kind == "arithmetic":
        a, operator, b = text.split()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[operator])
    if kind == "unit_conversion":
        amount, source, target = re.match(r"Convert (\d+) (\w+) to (\w+)\.", instruction).groups()
        return str(int(amount) * UNITS[source, target])
    if kind == "sort":
        return ", ".join(str(n) for n in sorted(numbers(text)))
    if kind == "reverse":
        return "".join(reversed(text))
    if kind == "count_letter":
        letter = re.search(r"letter '(\w)'", instruction).group(1)
        return str(sum(character == letter for character in text))
    if kind == "uppercase":
        return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in text)
    if kind == "larger":
        return str(max(numbers(instruction)))
    if kind == "next_number":
        sequence = numbers(text)
        steps = {b - a for a, b in zip(sequence, sequence[1:])}
        assert len(steps) == 1, f"{text} is not an arithmetic sequence"
        return str(sequence[-1] + steps.pop())
    raise AssertionError(f"no checker for kind {kind!r}")


def test_generated_answers_are_correct():
    for record in generate_tasks(400):
        assert record["output"] == expected_answer(record), record


def test_generate_tasks_is_the_same_for_the_same_seed_and_differs_for_another():
    assert generate_tasks(50, seed=3) == generate_tasks(50, seed=3)
    assert generate_tasks(50, seed=3) != generate_tasks(50, seed=4)


def test_every_kind_is_present_and_the_counts_differ_by_at_most_one():
    kinds = [record["kind"] for record in generate_tasks(100)]
    counts = [kinds.count(kind) for kind in TASK_KINDS]
    assert len(TASK_KINDS) >= 6 and set(kinds) == set(TASK_KINDS)
    assert max(counts) - min(counts) <= 1


def test_generated_records_have_string_fields_and_use_both_templates():
    records = generate_tasks(len(TASK_KINDS))
    assert all(isinstance(record[field], str) for record in records for field in ("instruction", "input", "output"))
    assert any(record["input"] == "" for record in records)
    assert any(record["input"] != "" for record in records)


def test_generated_text_is_covered_by_the_character_tokenizer(chars):
    unknown = chars.unk_token_id
    for record in generate_tasks(200):
        assert unknown not in tokenize_example(record, chars)["input_ids"], record


def test_negative_task_count_is_an_error():
    with pytest.raises(ValueError, match="n must be a non-negative number of tasks, got -1"):
        generate_tasks(-1)
