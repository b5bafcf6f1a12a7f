"""PiSSA (Meng et al., 2024): A and B start as W's principal part, the base keeps the residual.

Against Hugging Face peft's ``init_lora_weights="pissa"`` and its conversion to plain LoRA
(``save_pretrained(..., path_initial_model_for_weight_conversion=...)``): the same SVD and the
same operations in the same order, so A, B, the residual and the converted adapter are equal
bit for bit (rtol=0, atol=0).

Where a PiSSA model is compared with the unmodified base, exactness is impossible: W_res + s B A
equals W only up to float32 rounding (here at most ~4e-9 per weight, one ulp at these weights'
size), which grows through the layers to at most ~3e-7 in logits of size ~1. Those comparisons
use ROUNDOFF, a bound of 1e-6.
"""

import copy
import json

import pytest
import torch
from conftest import token_batch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from lora import NF4Linear, adapter_config, adapter_state_dict, inject_lora, load_adapter, lora_layers, save_adapter
from lora.adapter import adapter_key
from lora.layer import LoRALinear
from lora.pissa import pissa_factors, pissa_init_, pissa_to_lora, pissa_to_lora_config

EXACT = dict(rtol=0, atol=0)
ROUNDOFF = dict(rtol=0, atol=1e-6)  # float32 SVD round-off: W_res + s B A = W only to ~1 ulp (module docstring)
TARGETS = ("q_proj", "v_proj")
R, ALPHA = 4, 8


def pissa_model(base, use_rslora=False):
    """A copy of ``base`` with LoRA on q_proj, v_proj (r=4, alpha=8) initialized by PiSSA."""
    model = copy.deepcopy(base)
    inject_lora(model, TARGETS, r=R, alpha=ALPHA, use_rslora=use_rslora, init="pissa")
    return model


def peft_pissa_model(base, use_rslora=False):
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), init_lora_weights="pissa",
                        use_rslora=use_rslora)
    return get_peft_model(copy.deepcopy(base), config)


def train(model, steps=3):
    """A few AdamW steps on seeded batches, so A and B move away from their PiSSA start."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = token_batch(model, seed=step)
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    return model


def lora_model_with(base, tensors, r, alpha, use_rslora=False):
    """A copy of the unmodified ``base`` with plain LoRA of rank ``r`` holding ``tensors`` (peft's keys)."""
    model = copy.deepcopy(base)
    inject_lora(model, TARGETS, r=r, alpha=alpha, use_rslora=use_rslora)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            layer.lora_A.weight.copy_(tensors[adapter_key(name, "lora_A")])
            layer.lora_B.weight.copy_(tensors[adapter_key(name, "lora_B")])
    return model


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def test_output_at_initialization_equals_the_base_models(tiny):
    ids = token_batch(tiny)
    model = pissa_model(tiny)
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_layers(model))  # B is not zero, unlike LoRA
    assert_close(logits(model, ids), logits(tiny, ids), **ROUNDOFF)


def test_a_b_and_residual_weight_equal_peft_pissa(tiny):
    ours, theirs = pissa_model(tiny), peft_pissa_model(tiny)
    inner = theirs.base_model.model
    for name, layer in lora_layers(ours):
        peft_layer = inner.get_submodule(name)
        assert_close(layer.lora_A.weight, peft_layer.lora_A["default"].weight, **EXACT)
        assert_close(layer.lora_B.weight, peft_layer.lora_B["default"].weight, **EXACT)
        assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, **EXACT)
        if layer.base_layer.bias is not None:  # Qwen2's q and v projections: the bias is not PiSSA's to change
            assert_close(layer.base_layer.bias, tiny.get_submodule(name).bias, **EXACT)
    assert {layer.init_lora_weights for _, layer in lora_layers(ours)} == {"pissa"}


def test_adapter_takes_the_top_r_singular_values_and_the_residual_the_rest():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    S = torch.linalg.svdvals(linear.weight.detach())
    layer = pissa_init_(LoRALinear(linear, r=R, alpha=ALPHA))
    # Singular values are at most ~0.6 here; float32 SVD round-off on them is ~1e-7.
    assert_close(torch.linalg.svdvals(layer.delta_weight())[:R], S[:R], rtol=0, atol=1e-6)
    assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:-R], S[R:], rtol=0, atol=1e-6)
    # sqrt(S_r / s) on each side: A's rows and B's columns start equally long.
    assert_close(layer.lora_A.weight.norm(dim=1), layer.lora_B.weight.norm(dim=0), rtol=0, atol=1e-6)


def test_converted_adapter_on_the_unmodified_base_gives_the_pissa_models_logits(tiny):
    model = pissa_model(tiny)
    initial = {key: tensor.clone() for key, tensor in adapter_state_dict(model).items()}
    trained = adapter_state_dict(train(model))
    assert all(not torch.equal(trained[key], initial[key]) for key in initial)
    converted = pissa_to_lora(initial, trained)
    plain = lora_model_with(tiny, converted, r=2 * R, alpha=2 * ALPHA)
    ids = token_batch(tiny, seed=9)
    assert_close(logits(plain, ids), logits(model, ids), **ROUNDOFF)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_conversion_equals_peft_save_pretrained_and_loads_in_peft(tiny, tmp_path, use_rslora):
    ours, theirs = pissa_model(tiny, use_rslora), peft_pissa_model(tiny, use_rslora)
    theirs.save_pretrained(tmp_path / "initial")  # peft's recipe: save the adapter once, before training
    initial = {key: tensor.clone() for key, tensor in adapter_state_dict(ours).items()}
    trained = adapter_state_dict(train(ours))
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))

    converted = pissa_to_lora(initial, trained)
    written = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert written.keys() == converted.keys()
    for key in converted:
        assert_close(converted[key], written[key], **EXACT)

    config = pissa_to_lora_config(adapter_config(ours))
    peft_config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "use_rslora", "init_lora_weights"):
        assert config[field] == peft_config[field], field
    assert sorted(config["target_modules"]) == sorted(peft_config["target_modules"])

    ids = token_batch(tiny, seed=9)
    plain = lora_model_with(tiny, converted, config["r"], config["lora_alpha"], use_rslora)
    loaded_in_peft = PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path / "converted")
    assert_close(logits(loaded_in_peft, ids), logits(plain, ids), **EXACT)
    loaded_here = copy.deepcopy(tiny)
    load_adapter(loaded_here, tmp_path / "converted")
    assert_close(logits(loaded_here, ids), logits(plain, ids), **EXACT)
    assert_close(logits(plain, ids), logits(ours, ids), **ROUNDOFF)


def test_converted_config_doubles_r_and_alpha_so_the_scaling_stays():
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 3}}
    converted = pissa_to_lora_config(config)
    assert converted == {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 6},
                         "init_lora_weights": True}
    assert config["r"] == 4  # a new dict; the one given is left as it was
    assert pissa_to_lora_config({"r": 4, "lora_alpha": 8, "use_rslora": True})["lora_alpha"] == 8 * 2**0.5
    with pytest.raises(ValueError, match="use_rslora and a rank_pattern"):
        pissa_to_lora_config({**config, "use_rslora": True})


def test_a_4bit_base_is_refused():
    layer = LoRALinear(NF4Linear(nn.Linear(64, 64)), r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match="NF4Linear; initialize PiSSA before quantizing"):
        pissa_init_(layer)


def test_a_merged_layer_is_refused_and_left_as_it_was():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48), r=R, alpha=ALPHA)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    layer.merge()
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    with pytest.raises(ValueError, match="merged .*unmerge"):
        pissa_init_(layer)
    for name, tensor in layer.state_dict().items():
        assert_close(tensor, before[name], **EXACT)


def test_r_larger_than_the_number_of_singular_values_is_refused():
    with pytest.raises(ValueError, match=r"r=4 is larger than min\(out, in\)=3"):
        pissa_factors(torch.randn(3, 5), r=4, scaling=1.0)


def test_conversion_refuses_adapters_of_different_layers_or_ranks():
    A, B = "base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"
    initial = {A: torch.zeros(2, 5), B: torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="only in the initial adapter"):
        pissa_to_lora(initial, {A: torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="same r"):
        pissa_to_lora(initial, {A: torch.zeros(4, 5), B: torch.zeros(3, 4)})


# --- Through inject_lora, save_adapter and load_adapter --------------------------------------------------------


def test_pissa_adapter_saved_with_its_start_loads_on_the_unmodified_base_here_and_in_peft(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    inject_lora(model, TARGETS, r=R, alpha=ALPHA, init="pissa")
    initial = {key: tensor.clone() for key, tensor in adapter_state_dict(model).items()}
    train(model)
    save_adapter(model, tmp_path / "adapter", initial=initial)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (2 * R, 2 * ALPHA, True)
    ids = token_batch(tiny)
    ours = copy.deepcopy(tiny)
    load_adapter(ours, tmp_path / "adapter")
    assert_close(logits(ours, ids), logits(model, ids), **ROUNDOFF)
    assert_close(logits(PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path / "adapter"), ids), logits(ours, ids),
                 **EXACT)


def test_pissa_adapter_saved_as_it_is_takes_the_svd_again_when_loaded_here_and_in_peft(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    inject_lora(model, TARGETS, r=R, alpha=ALPHA, init="pissa")
    train(model)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ids = token_batch(tiny)
    ours = copy.deepcopy(tiny)
    load_adapter(ours, tmp_path / "adapter")
    assert_close(logits(ours, ids), logits(model, ids), **EXACT)  # the same SVD of the same W: the same W_res
    assert_close(logits(PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path / "adapter"), ids), logits(ours, ids),
                 **EXACT)


def test_a_pissa_adapter_into_a_model_that_has_lora_is_refused(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    inject_lora(model, TARGETS, r=R, alpha=ALPHA, init="pissa")
    save_adapter(model, tmp_path / "adapter")
    has_lora = copy.deepcopy(tiny)
    inject_lora(has_lora, TARGETS, r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match="a PiSSA adapter .* load it into a model without LoRA"):
        load_adapter(has_lora, tmp_path / "adapter")


@pytest.mark.parametrize("init", ["olora", "pissa_niter_16", "loftq"])
def test_an_init_that_changed_the_base_in_a_way_not_redone_here_is_refused_by_name(tiny, tmp_path, init):
    model = copy.deepcopy(tiny)
    inject_lora(model, TARGETS, r=R, alpha=ALPHA)
    save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init}))
    with pytest.raises(ValueError, match=f"init_lora_weights is '{init}', which changed the base weights"):
        load_adapter(copy.deepcopy(tiny), tmp_path / "adapter")
