"""This library against Hugging Face peft: the same numbers, bit for bit, and the same files.

Both sides run the same operations in the same order on the same values, so the
comparisons below are exact (rtol=0, atol=0), not merely close.
"""

import copy

import pytest
import torch
from conftest import lora_and_peft, peft_lora, token_batch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.testing import assert_close

from lora import inject_lora, load_adapter, print_trainable_parameters, save_adapter

EXACT = dict(rtol=0, atol=0)
TARGET_SETS = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]


def logits_and_grads(ours, theirs, ids):
    """Forward and backward both models on ``ids``; return their logits."""
    ours_out, theirs_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    return ours_out.logits, theirs_out.logits


@pytest.mark.parametrize("variant", ["lora", "rslora"])
@pytest.mark.parametrize("targets", TARGET_SETS, ids=["q_v", "all_linear"])
def test_logits_and_gradients_equal_peft(tiny, targets, variant):
    ours, theirs = lora_and_peft(tiny, targets, use_rslora=variant == "rslora")
    ours_logits, theirs_logits = logits_and_grads(ours, theirs, token_batch(tiny))
    assert_close(ours_logits, theirs_logits, **EXACT)
    for mine, peft_layer in peft_lora(ours, theirs):
        assert mine.scaling == peft_layer.scaling["default"]  # alpha / r, or alpha / sqrt(r) with rsLoRA
        assert_close(mine.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, **EXACT)
        assert_close(mine.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, **EXACT)


def test_parameters_equal_peft_after_adamw_steps(tiny):
    ours, theirs = lora_and_peft(tiny)
    optimizers = [
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
        for model in (ours, theirs)
    ]
    for step in range(5):
        ids = token_batch(tiny, seed=step)
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
    for mine, peft_layer in peft_lora(ours, theirs):
        assert_close(mine.lora_A.weight, peft_layer.lora_A["default"].weight, **EXACT)
        assert_close(mine.lora_B.weight, peft_layer.lora_B["default"].weight, **EXACT)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_dropout_in_training_equals_peft_under_the_same_seed(tiny, variant):
    # With DoRA, peft's dropout path: the DoRA terms see dropout(x), and W dropout(x) is computed anew.
    ours, theirs = lora_and_peft(tiny, dropout=0.1, use_dora=variant == "dora")
    ours.train()
    theirs.train()
    ids = token_batch(tiny)
    torch.manual_seed(5)
    ours_logits = ours(ids).logits
    torch.manual_seed(5)
    assert_close(ours_logits, theirs(ids).logits, **EXACT)


def test_trainable_parameters_line_equals_peft(tiny, capsys):
    ours, theirs = lora_and_peft(tiny)
    print_trainable_parameters(ours)
    theirs.print_trainable_parameters()
    ours_line, theirs_line = capsys.readouterr().out.splitlines()
    assert ours_line == theirs_line


def test_initial_a_equals_peft_under_the_same_seed(tiny):
    # Both create nn.Linear A and B, then re-draw A kaiming-uniform: the same random draws in the same order.
    ours = copy.deepcopy(tiny)
    torch.manual_seed(3)
    inject_lora(ours, r=4, alpha=8)
    torch.manual_seed(3)
    theirs = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for mine, peft_layer in peft_lora(ours, theirs):
        assert_close(mine.lora_A.weight, peft_layer.lora_A["default"].weight, **EXACT)
        assert_close(mine.lora_B.weight, peft_layer.lora_B["default"].weight, **EXACT)


def test_adapter_saved_here_loads_in_peft_with_the_same_logits(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    ours, _ = lora_and_peft(tiny)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(theirs(ids).logits, ours(ids).logits, **EXACT)


def test_adapter_saved_by_peft_loads_here_with_the_same_logits(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    _, theirs = lora_and_peft(tiny, ("q_proj", "k_proj", "v_proj"), r=2, alpha=7)
    theirs.save_pretrained(tmp_path)
    names = load_adapter(base, tmp_path)
    assert len(names) == 6
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(base(ids).logits, theirs(ids).logits, **EXACT)


def test_peft_regex_target_adapter_loads_here(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.1\.mlp\.(up|down)_proj", init_lora_weights=False)
    theirs = get_peft_model(copy.deepcopy(tiny), config)
    theirs.save_pretrained(tmp_path)
    assert load_adapter(base, tmp_path) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(base(ids).logits, theirs(ids).logits, **EXACT)
