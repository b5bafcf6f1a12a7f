"""rsLoRA (Kalajdzievski, 2023): the update scaled by alpha / sqrt(r) instead of alpha / r, equal to
peft's ``use_rslora`` bit for bit, and adapters that say so in their config, loading both ways."""

import copy
import json
import math

import pytest
import torch
from conftest import lora_and_peft, peft_lora, token_batch
from peft import PeftModel
from torch import nn
from torch.testing import assert_close

from lora import LoRALinear, inject_lora, load_adapter, save_adapter

EXACT = dict(rtol=0, atol=0)


@pytest.mark.parametrize("r", [1, 4, 16])
def test_rslora_scaling_is_alpha_over_the_square_root_of_r(r):
    layer = LoRALinear(nn.Linear(8, 8), r=r, alpha=16, use_rslora=True)
    assert layer.scaling == 16 / math.sqrt(r)
    assert LoRALinear(nn.Linear(8, 8), r=r, alpha=16).scaling == 16 / r


def test_rslora_adapter_saved_here_says_so_and_loads_in_peft_with_the_same_logits(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    ours, _ = lora_and_peft(tiny, use_rslora=True)
    save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(theirs(ids).logits, ours(ids).logits, **EXACT)


def test_rslora_adapter_saved_by_peft_loads_here_with_rslora_scaling(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    _, theirs = lora_and_peft(tiny, r=4, alpha=8, use_rslora=True)
    theirs.save_pretrained(tmp_path)
    load_adapter(base, tmp_path)
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(base(ids).logits, theirs(ids).logits, **EXACT)
    assert base.model.layers[0].self_attn.q_proj.scaling == 8 / 2


def test_loading_an_rslora_adapter_into_plain_lora_layers_is_refused_by_name(tiny, tmp_path):
    ours, _ = lora_and_peft(tiny, use_rslora=True)
    save_adapter(ours, tmp_path / "adapter")
    plain = copy.deepcopy(tiny)
    inject_lora(plain, r=4, alpha=8)
    with pytest.raises(ValueError, match="use_rslora is True but model.layers.0.self_attn.q_proj has use_rslora False"):
        load_adapter(plain, tmp_path / "adapter")
