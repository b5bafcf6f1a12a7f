"""Perplexity: exp of the mean token NLL, by hand; batch size does not matter; padding and prompts excluded."""

import copy
import math

import pytest
import torch
from conftest import randomize_lora
from torch.testing import assert_close

from data.collate import PadCollator
from data.generated_tasks import generate_tasks
from data.instructions import save_instructions
from data.tokenization import tokenize_example
from eval.perplexity import main, perplexity
from lora import disable_lora, inject_lora, save_adapter
from models.loader import char_tokenizer

TOKENIZER = char_tokenizer()


def examples(n=10, seed=0):
    """Instruction examples of different lengths, with the prompt labelled -100."""
    return [tokenize_example(task, TOKENIZER) for task in generate_tasks(n, seed=seed)]


@torch.no_grad()
def nll_by_hand(model, examples, conditional=True):
    """-log p of each scored token, one example at a time, written out from the logits."""
    losses = []
    for example in examples:
        ids = torch.tensor(example["input_ids"])
        labels = torch.tensor(example["labels"]) if conditional else ids
        log_probs = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
        for t in range(len(ids) - 1):
            if labels[t + 1] != -100:
                losses.append(-log_probs[t, labels[t + 1]].item())
    return losses


@pytest.mark.parametrize("conditional", [True, False])
def test_perplexity_is_exp_of_the_mean_token_nll_by_hand(tiny, conditional):
    data = examples()
    expected = nll_by_hand(tiny, data, conditional)
    result = perplexity(tiny, data, TOKENIZER.pad_token_id, batch_size=4, conditional=conditional)
    assert result["tokens"] == len(expected)
    assert_close(result["loss"], sum(expected) / len(expected), rtol=1e-5, atol=0)
    assert_close(result["perplexity"], math.exp(sum(expected) / len(expected)), rtol=1e-5, atol=0)


def test_conditional_scores_fewer_tokens_than_unconditional(tiny):
    data = examples()
    conditional = perplexity(tiny, data, TOKENIZER.pad_token_id)
    unconditional = perplexity(tiny, data, TOKENIZER.pad_token_id, conditional=False)
    answer_tokens = sum(sum(label != -100 for label in example["labels"]) for example in data)
    assert conditional["tokens"] == answer_tokens
    assert unconditional["tokens"] == sum(len(example["input_ids"]) - 1 for example in data)


def test_batch_size_1_and_8_give_the_same_perplexity(tiny):
    data = examples(12)
    one = perplexity(tiny, data, TOKENIZER.pad_token_id, batch_size=1)
    eight = perplexity(tiny, data, TOKENIZER.pad_token_id, batch_size=8)
    assert one["tokens"] == eight["tokens"]
    assert_close(eight["loss"], one["loss"], rtol=1e-5, atol=0)


def test_adapter_changes_perplexity_and_disabling_it_restores_the_base(tiny):
    data = examples()
    base = perplexity(copy.deepcopy(tiny), data, TOKENIZER.pad_token_id)
    inject_lora(tiny)
    assert_close(perplexity(tiny, data, TOKENIZER.pad_token_id)["loss"], base["loss"])  # B = 0: no change yet
    randomize_lora(tiny)
    adapted = perplexity(tiny, data, TOKENIZER.pad_token_id)
    assert adapted["loss"] != pytest.approx(base["loss"])
    with disable_lora(tiny):
        assert_close(perplexity(tiny, data, TOKENIZER.pad_token_id)["loss"], base["loss"])


def test_command_scores_the_base_and_an_adapter(tmp_path, capsys, tiny):
    data = save_instructions(generate_tasks(60, seed=1), tmp_path / "tasks.jsonl")
    model_name = "tiny-llama" if tiny.config.model_type == "llama" else "tiny-qwen2"
    inject_lora(tiny)
    randomize_lora(tiny)
    adapter = save_adapter(tiny, tmp_path / "adapter")
    common = ["--model", model_name, "--task", "instruct", "--data", str(data), "--max-length", "128"]
    assert main(common) == 0
    assert main([*common, "--adapter", str(adapter)]) == 0
    base_line, adapter_line = capsys.readouterr().out.splitlines()
    assert base_line.startswith("instruct test,") and "perplexity" in base_line
    assert base_line != adapter_line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter", "no-such-folder"], "no-such-folder/adapter_config.json: no such file"),
        (["--task", "llmtime", "--data", "tasks.jsonl"], "not a readable .npz file"),
    ],
)
def test_bad_adapter_or_data_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    save_instructions(generate_tasks(10), tmp_path / "tasks.jsonl")
    assert main(["--model", "tiny-llama", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("training", [True, False])
def test_perplexity_leaves_the_callers_train_or_eval_mode(tiny, training):
    tiny.train(training)
    perplexity(tiny, examples(2), pad_id=0)
    assert tiny.training is training and all(module.training is training for module in tiny.modules())
