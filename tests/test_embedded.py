"""The same equivalences on the real pretrained SmolLM2-135M-Instruct (slow: it loads in about 20 s)."""

import copy

import pytest
import torch
from conftest import logits_before_and_after_unloading, lora_and_peft, peft_lora, randomize_lora, token_batch
from peft import PeftModel
from torch.testing import assert_close

from lora import (
    count_parameters,
    inject_lora,
    load_adapter,
    print_trainable_parameters,
    save_adapter,
)

pytestmark = pytest.mark.slow
EXACT = dict(rtol=0, atol=0)


def test_embedded_logits_and_gradients_equal_peft(embedded_base, capsys):
    ours, theirs = lora_and_peft(embedded_base, r=8, alpha=16)
    ids = token_batch(embedded_base, batch=2, length=16)
    ours_out, theirs_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    assert_close(ours_out.logits, theirs_out.logits, **EXACT)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    pairs = peft_lora(ours, theirs)
    assert len(pairs) == 2 * embedded_base.config.num_hidden_layers
    for mine, peft_layer in pairs:
        assert_close(mine.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, **EXACT)
        assert_close(mine.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, **EXACT)
    print_trainable_parameters(ours)
    theirs.print_trainable_parameters()
    ours_line, theirs_line = capsys.readouterr().out.splitlines()
    assert ours_line == theirs_line


def test_embedded_trainable_count_is_r_times_in_plus_out(embedded):
    names = inject_lora(embedded, r=8)
    expected = sum(8 * (layer.base_layer.in_features + layer.base_layer.out_features)
                   for layer in map(embedded.get_submodule, names))
    assert count_parameters(embedded)[0] == expected


def test_embedded_adapters_cross_load_both_ways(embedded_base, tmp_path):
    ours, theirs = lora_and_peft(embedded_base, r=8, alpha=16)
    ids = token_batch(embedded_base, batch=1, length=16)
    with torch.no_grad():
        expected = ours(ids).logits
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    del ours, theirs
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(embedded_base), tmp_path / "ours")
    with torch.no_grad():
        assert_close(peft_loaded(ids).logits, expected, **EXACT)
    del peft_loaded
    ours_loaded = copy.deepcopy(embedded_base)
    load_adapter(ours_loaded, tmp_path / "peft")
    with torch.no_grad():
        assert_close(ours_loaded(ids).logits, expected, **EXACT)


def test_embedded_merge_and_unload_reloads_in_plain_transformers(embedded, tmp_path):
    inject_lora(embedded)
    randomize_lora(embedded)
    before, after = logits_before_and_after_unloading(embedded, token_batch(embedded, batch=1, length=16), tmp_path)
    assert_close(after, before, rtol=1e-4, atol=1e-4)
