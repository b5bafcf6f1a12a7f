"""Exact-match evaluation of instruction tasks: scoring per kind, the two prompt templates, and bad input."""

import pytest
import torch

from data.generated_tasks import generate_tasks
from data.instructions import save_instructions
from data.lotka_volterra import create_dataset, save_dataset
from data.template import format_prompt
from eval import instruct
from eval.instruct import answer, answers, exact_match, main, prompt_ids
from models.loader import char_tokenizer, tiny_model

TOKENIZER = char_tokenizer()
TASKS = generate_tasks(16, seed=0)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def answers_with(text_for):
    """A stand-in for ``generate`` that answers each prompt with ``text_for(task)`` and EOS."""
    by_prompt = {format_prompt(task): task for task in TASKS}

    def fake_generate(model, input_ids, max_new_tokens, attention_mask, **settings):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):  # the batch's prompts, left padding left out
            task = by_prompt[TOKENIZER.decode(ids[mask.bool()])]
            rows.append(TOKENIZER(text_for(task)).input_ids + [TOKENIZER.eos_token_id])
        longest = max(len(row) for row in rows)
        return torch.tensor([row + [TOKENIZER.eos_token_id] * (longest - len(row)) for row in rows])

    return fake_generate


def test_right_answers_score_one_in_every_kind(monkeypatch):
    monkeypatch.setattr(instruct, "generate", answers_with(lambda task: " " + task["output"] + "\n"))
    accuracy = exact_match(tiny_model(), TOKENIZER, TASKS)
    assert accuracy["overall"] == 1.0
    assert set(accuracy) == {task["kind"] for task in TASKS} | {"overall"}


def test_wrong_answers_score_zero_and_the_overall_is_the_mean(monkeypatch):
    right_kinds = {"arithmetic", "reverse"}
    monkeypatch.setattr(instruct, "generate", answers_with(
        lambda task: task["output"] if task["kind"] in right_kinds else task["output"] + "0"))
    accuracy = exact_match(tiny_model(), TOKENIZER, TASKS)
    assert accuracy["arithmetic"] == accuracy["reverse"] == 1.0 and accuracy["sort"] == 0.0
    assert accuracy["overall"] == sum(task["kind"] in right_kinds for task in TASKS) / len(TASKS)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_batched_greedy_answers_equal_one_prompt_at_a_time(name):
    model = tiny_model(name)  # untrained: its answers are gibberish, but the same ones batched or not
    batched = answers(model, TOKENIZER, TASKS[:6], max_new_tokens=12)
    assert batched == [answer(model, TOKENIZER, task, max_new_tokens=12) for task in TASKS[:6]]
    assert len({len(format_prompt(task)) for task in TASKS[:6]}) > 1  # the batch was padded


def test_the_default_prompt_is_the_training_template():
    for task in TASKS[:4]:
        assert prompt_ids(TOKENIZER, task) == TOKENIZER(format_prompt(task)).input_ids


def test_the_chat_prompt_is_exactly_the_tokenizers_chat_template_of_one_user_message(monkeypatch):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    with_input = next(task for task in TASKS if task["input"])
    without_input = next(task for task in TASKS if not task["input"])
    for task, content in ((with_input, f"{with_input['instruction']}\n\n{with_input['input']}"),
                          (without_input, without_input["instruction"])):
        expected = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        assert prompt_ids(tokenizer, task, "chat") == expected["input_ids"]
    given = []  # what answers() hands generate, left padding left out

    def fake_generate(model, input_ids, max_new_tokens, attention_mask, **settings):
        given.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return torch.full((len(input_ids), 1), tokenizer.eos_token_id)

    monkeypatch.setattr(instruct, "generate", fake_generate)
    answers(tiny_model(), tokenizer, TASKS[:3], template="chat")
    assert given == [prompt_ids(tokenizer, task, "chat") for task in TASKS[:3]]


def test_a_chat_prompt_needs_a_chat_template_and_a_template_a_known_name():
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(TOKENIZER, TASKS[0], "chat")
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        prompt_ids(TOKENIZER, TASKS[0], "chatml")


def test_command_prints_a_table_per_kind(tmp_path, capsys):
    data = save_instructions(generate_tasks(40, seed=2), tmp_path / "tasks.jsonl")
    assert main(["--model", "tiny-llama", "--data", str(data), "--limit", "4", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exact match on 4 held-out tasks") and "| overall |" in out


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "missing"], "missing/adapter_config.json: no such file"),
    (["--data", "missing.jsonl"], "missing.jsonl: no such data file; the instruct task takes Alpaca .json or .jsonl"),
    (["--data", "series.npz"], "series.npz: not a text file; instruction data is Alpaca .json or .jsonl"),
    (["--template", "chat"], "template chat: the tokenizer has no chat template"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    save_dataset(create_dataset(n_systems=10, seed=0), tmp_path / "series.npz")  # the forecasting task's data
    assert main(["--model", "tiny-llama", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
