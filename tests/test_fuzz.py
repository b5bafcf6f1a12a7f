"""The parsers users feed by hand, fed what hypothesis generates: LLMTIME text, instruction files, adapter configs.

Each test states a property that must hold for every input: the parser returns what its
docstring promises, or raises the one error it documents, on one line, naming the file and the
record. An inline rule (``is_record``, ``usable``) says which inputs are good, so the test also
checks that good ones are never refused.

``derandomize=True``: the examples come from a fixed seed, the same on every run, so CI is
repeatable (a failure found once is found again), so ``database=None`` keeps no examples between
runs; ``deadline=None``: a slow example on a busy machine is not a failure.
``max_examples`` is modest, so the file runs in seconds.
"""

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from data.instructions import FIELDS, load_instructions, save_instructions
from data.llmtime import Scaler, decode
from lora.adapter import CONFIG_NAME, LOADABLE_INITS, PLAIN_LORA, read_adapter_config

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Any JSON value Python's json module writes and reads back (NaN and Infinity included, as it allows).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder for the module: each example overwrites its file (hypothesis runs examples one after another)."""
    return tmp_path_factory.mktemp("fuzz")


# --- LLMTIME decode ----------------------------------------------------------------------------------------------

# Text a model might write: mostly the characters of encoded numbers, sometimes anything at all.
NUMBER_TEXT = st.text(alphabet="0123456789.,;- \n", max_size=400)
SCALERS = st.integers(1, 3).flatmap(lambda n: st.builds(
    Scaler,
    offset=st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n).map(np.array),
    scale=st.lists(st.floats(1e-6, 1e12), min_size=n, max_size=n).map(np.array),
))


@FUZZ
@given(text=NUMBER_TEXT | st.text(), scaler=SCALERS, n_vars=st.none() | st.integers(0, 4))
@example(text="9" * 400 + ",1", scaler=Scaler(np.zeros(2), np.ones(2)), n_vars=None)  # once read as inf
def test_decode_of_any_text_is_finite_steps_no_more_than_written_or_the_n_vars_error(text, scaler, n_vars):
    if n_vars is not None and n_vars != scaler.n_vars:
        with pytest.raises(ValueError, match=f"^n_vars is {n_vars} but the scaler was fitted to {scaler.n_vars} "):
            decode(text, scaler, n_vars)
        return
    decoded = decode(text, scaler, n_vars)
    assert decoded.dtype == np.float64
    assert decoded.shape[1] == scaler.n_vars
    assert decoded.shape[0] <= text.count(";") + 1
    assert np.isfinite(decoded).all()


# --- Instruction files -------------------------------------------------------------------------------------------

@st.composite
def near_records(draw) -> dict:
    """A good record with up to two of its fields removed or replaced by any JSON value, and maybe a field more."""
    record = {field: draw(st.text(max_size=20)) for field in FIELDS}
    for field in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=2)):
        if draw(st.booleans()):
            del record[field]
        else:
            record[field] = draw(JSON)
    record.update(draw(st.dictionaries(st.sampled_from(["kind", "id"]), JSON, max_size=1)))
    return record


# Records near the rule as well as far from it (any JSON value at all).
RECORDS = near_records() | near_records() | JSON


def is_record(value) -> bool:
    """The rule, written out: an object, string instruction and output, and a string, null or missing input."""
    return (isinstance(value, dict) and isinstance(value.get("instruction"), str)
            and isinstance(value.get("output"), str) and isinstance(value.get("input", ""), (str, type(None))))


def as_loaded(record: dict) -> dict:
    return {**record, "input": record.get("input") or ""}


def write_records(path, records) -> None:
    if path.suffix == ".jsonl":  # ensure_ascii=False, as save_instructions writes: U+2028 and the like unescaped
        path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


@FUZZ
@given(records=st.lists(RECORDS, max_size=4), suffix=st.sampled_from([".json", ".jsonl"]))
@example(records=[{"instruction": "a\u2028b", "output": "c\x85d"}], suffix=".jsonl")  # not line ends in JSON Lines
def test_any_json_records_load_by_the_rule_or_are_a_value_error_naming_the_first_bad_one(folder, records, suffix):
    path = folder / f"data{suffix}"
    write_records(path, records)
    bad = next((number for number, record in enumerate(records, start=1) if not is_record(record)), None)
    if bad is None:
        assert load_instructions(path) == [as_loaded(record) for record in records]
        return
    with pytest.raises(ValueError) as raised:
        load_instructions(path)
    where = f"line {bad}" if suffix == ".jsonl" else f"record {bad}"
    assert str(raised.value).startswith(f"{path}: {where}: ")
    assert "\n" not in str(raised.value)


@FUZZ
@given(value=JSON)
def test_a_json_file_that_is_not_a_list_is_a_value_error_naming_the_file(folder, value):
    path = folder / "data.json"
    path.write_text(json.dumps(value), encoding="utf-8")
    if isinstance(value, list):
        return  # the records test above covers lists
    message = f"{path}: expected a JSON list of records, got {type(value).__name__}; "
    with pytest.raises(ValueError, match=re.escape(message)):
        load_instructions(path)


@FUZZ
@given(records=st.lists(st.fixed_dictionaries({"instruction": st.text(), "output": st.text()},
                                              optional={"input": st.none() | st.text()}), max_size=4),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_saved_records_of_any_text_load_back_as_saved(folder, records, suffix):
    path = save_instructions(records, folder / f"saved{suffix}")
    assert load_instructions(path) == [as_loaded(record) for record in records]


# --- Adapter configs ---------------------------------------------------------------------------------------------

GOOD_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
               "target_modules": ["q_proj", "v_proj"], "use_rslora": False, "use_dora": False,
               "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False}
READ_FIELDS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
               "init_lora_weights", *PLAIN_LORA]


@st.composite
def adapter_configs(draw) -> dict:
    """A good config with up to three of the fields it is checked on removed or replaced, and others added."""
    config = dict(GOOD_CONFIG)
    for field in draw(st.lists(st.sampled_from(READ_FIELDS), unique=True, max_size=3)):
        if draw(st.booleans()):
            config.pop(field, None)
        else:
            config[field] = draw(JSON | st.text(max_size=6) | st.integers(-2, 2) | st.floats(-1, 2))
    config.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda key: key not in READ_FIELDS), JSON,
                                       max_size=2)))
    return config


def usable(config: dict) -> bool:
    """What ``load_adapter`` needs of an accepted config, in types and ranges."""
    r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
    targets = config["target_modules"]
    return (config["peft_type"] == "LORA"
            and type(r) is int and r > 0
            and type(alpha) in (int, float) and alpha > 0
            and type(dropout) in (int, float) and 0 <= dropout < 1
            and (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets)))
            and all(type(config.get(field)) in (bool, type(None)) for field in ("use_rslora", "use_dora")))


@FUZZ
@given(config=adapter_configs() | st.dictionaries(st.text(max_size=8), JSON, max_size=6))
def test_any_json_object_is_a_usable_adapter_config_or_a_value_error_naming_the_file(folder, config):
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(config), encoding="utf-8")
    try:
        read = read_adapter_config(path)
    except ValueError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        return
    assert usable(read)
    assert read.get("init_lora_weights") in LOADABLE_INITS


@FUZZ
@given(data=st.binary(max_size=200) | JSON.map(lambda value: json.dumps(value).encode()))
def test_any_bytes_are_an_adapter_config_or_a_value_error_naming_the_file(folder, data):
    path = folder / CONFIG_NAME
    path.write_bytes(data)
    try:
        read_adapter_config(path)
    except ValueError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
