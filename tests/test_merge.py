"""Merging whole models: W + ΔW in place, undone exactly, and unloaded to plain transformers."""

import pytest
import torch
from conftest import logits_before_and_after_unloading, randomize_lora, token_batch
from torch import nn
from torch.testing import assert_close

from lora import LoRALinear, inject_lora, lora_layers, merge_and_unload, merge_lora, unmerge_lora


@pytest.fixture
def adapted(tiny):
    inject_lora(tiny, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    return randomize_lora(tiny)


def base_weights(model):
    return {name: layer.base_layer.weight.detach().clone() for name, layer in lora_layers(model)}


def test_merge_lora_adds_each_delta_weight(adapted):
    before = base_weights(adapted)
    merge_lora(adapted)
    for name, layer in lora_layers(adapted):
        expected = before[name] + layer.lora_B.weight @ layer.lora_A.weight * layer.scaling
        assert_close(layer.base_layer.weight, expected)


def test_merge_then_unmerge_restores_the_weights(adapted):
    before = base_weights(adapted)
    unmerge_lora(merge_lora(adapted))
    for name, weight in base_weights(adapted).items():
        assert_close(weight, before[name])


def test_merging_a_merged_model_is_a_no_op(adapted):
    merged_once = base_weights(merge_lora(adapted))
    merged_twice = base_weights(merge_lora(adapted))
    for name, weight in merged_twice.items():
        assert_close(weight, merged_once[name], rtol=0, atol=0)


def test_merged_logits_equal_unmerged_logits(adapted):
    ids = token_batch(adapted)
    with torch.no_grad():
        unmerged = adapted(ids).logits
        merged = merge_lora(adapted)(ids).logits
    assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_leaves_plain_linear_layers(adapted):
    names = [name for name, _ in lora_layers(adapted)]
    model = merge_and_unload(adapted)
    assert not any(isinstance(module, LoRALinear) for module in model.modules())
    assert all(type(model.get_submodule(name)) is nn.Linear for name in names)


def test_merge_and_unload_saves_a_plain_transformers_model_with_the_same_logits(adapted, tmp_path):
    before, after = logits_before_and_after_unloading(adapted, token_batch(adapted), tmp_path)
    assert_close(after, before, rtol=1e-5, atol=1e-5)
