"""DoRA (Liu et al., 2024): equal to peft's ``use_dora=True`` bit for bit, and the properties the paper states.

``DoRALinear.forward`` runs peft's operations in peft's order on the same values, so logits and
gradients are compared exactly (rtol=0, atol=0). Where the two sides of a comparison are
different formulas for the same number (merged against unmerged, a hand-written formula against
the layer), the tolerance is tight and the comment says why it cannot be exact.
"""

import copy
import json

import pytest
import torch
from conftest import lora_and_peft, peft_lora, token_batch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.testing import assert_close

from lora import (NF4Linear, adapter_state_dict, disable_lora, inject_lora, load_adapter, lora_layers, save_adapter,
                  use_fused_lora)
from lora.adapter import KEY_PREFIX
from lora.dora import DoRALinear, column_norm, magnitude_key
from lora.fused import FusedLoRALinear
from lora.targets import find_targets

EXACT = dict(rtol=0, atol=0)
TARGETS = ("q_proj", "v_proj")
# Weights by two formulas for one number in float32 (merge's B @ A * s against s * B @ A, or
# W' * norm / m - s B A against W): measured differences ~3e-7 of the largest entry, a few ulps.
ROUNDING = dict(rtol=1e-6, atol=1e-7)


def dora_layers(model):
    """``(name, layer)`` for every ``DoRALinear`` of ``model``: the ``lora_layers`` that are DoRA."""
    return [(name, layer) for name, layer in lora_layers(model) if isinstance(layer, DoRALinear)]


def magnitude_state_dict(model):
    """m of every DoRA layer of ``model`` under ``magnitude_key``: peft's file keys without their prefix."""
    return {magnitude_key(name): layer.lora_magnitude_vector.detach() for name, layer in dora_layers(model)}


def inject_dora(model, target_modules=TARGETS, r=4, alpha=8, dropout=0.0):
    """Replace the targeted ``nn.Linear`` modules with ``DoRALinear``; only A, B and m train.

    By hand, not ``inject_lora(..., use_dora=True)``, so that the layer is tested apart from injection.
    """
    for name in find_targets(model, target_modules):
        model.set_submodule(name, DoRALinear(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout),
                            strict=True)
    model.requires_grad_(False)
    for _, layer in dora_layers(model):
        for parameter in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector):
            parameter.requires_grad_(True)
    return model


def randomize_dora(model, seed=0):
    """Seeded non-zero A and B, and m moved off ``||W||_c``, so each of the three changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            for parameter in (layer.lora_A.weight, layer.lora_B.weight):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.1 * torch.randn(m.shape, generator=generator))
    return model


def peft_dora(model, peft_model):
    """Pairs ``(ours, peft's)`` of DoRA layers at the same module path."""
    inner = peft_model.base_model.model
    return [(layer, inner.get_submodule(name)) for name, layer in dora_layers(model)]


def peft_dora_model(base, r=4, alpha=8, dropout=0.0):
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGETS), use_dora=True)
    # A, B and m in the base's dtype, as ``inject_dora`` makes them (peft's default would make them float32
    # on a bf16 base; on a float32 base the flag changes nothing).
    return get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)


def dora_and_peft(base, r=4, alpha=8, dropout=0.0, seed=0):
    """``(ours, peft_model)``: two copies of ``base`` with DoRA on q_proj and v_proj and identical A, B and m."""
    ours = randomize_dora(inject_dora(copy.deepcopy(base), r=r, alpha=alpha, dropout=dropout), seed)
    theirs = peft_dora_model(base, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        for mine, peft_layer in peft_dora(ours, theirs):
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B.weight)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(mine.lora_magnitude_vector)
    return ours, theirs


def test_logits_and_gradients_of_a_b_and_m_equal_peft(tiny):
    ours, theirs = dora_and_peft(tiny)
    ids = token_batch(tiny)
    ours_out, theirs_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    assert_close(ours_out.logits, theirs_out.logits, **EXACT)
    for mine, peft_layer in peft_dora(ours, theirs):
        assert_close(mine.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, **EXACT)
        assert_close(mine.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, **EXACT)
        assert_close(mine.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad,
                     **EXACT)


def test_bfloat16_logits_gradients_and_merged_weights_equal_peft(tiny):
    ours, theirs = dora_and_peft(tiny.to(torch.bfloat16))
    ids = token_batch(tiny)
    ours_out, theirs_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    assert_close(ours_out.logits, theirs_out.logits, **EXACT)
    for mine, peft_layer in peft_dora(ours, theirs):
        assert_close(mine.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, **EXACT)
        assert_close(mine.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad,
                     **EXACT)
        mine.merge()
        peft_layer.merge()  # s B A in float32 on both sides (peft: on CPU), rounded once to bf16
        assert_close(mine.base_layer.weight, peft_layer.base_layer.weight, **EXACT)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_float32_adapters_on_a_bf16_base_under_autocast_equal_pefts_default(tiny, dropout):
    # The training loop's setting for a bf16 model (float32 A, B and m, autocast), which is peft's
    # default (autocast_adapter_dtype=True): the same casts in the same places (x to float32 before
    # dropout, the norm in float32, the output back to bf16), so still exact.
    base = tiny.to(torch.bfloat16)
    ours = copy.deepcopy(base)
    for name in find_targets(ours, TARGETS):
        layer = DoRALinear(ours.get_submodule(name), r=4, alpha=8, dropout=dropout, dtype=torch.float32)
        ours.set_submodule(name, layer)
    randomize_dora(ours)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(TARGETS), use_dora=True)
    theirs = get_peft_model(copy.deepcopy(base), config)
    pairs = peft_dora(ours, theirs)
    with torch.no_grad():
        for mine, peft_layer in pairs:
            assert peft_layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B.weight)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(mine.lora_magnitude_vector)
    ids = token_batch(tiny)
    outputs = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(5)  # the same dropout masks on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(model(ids, labels=ids))
    ours_out, theirs_out = outputs
    ours_out.loss.backward()
    theirs_out.loss.backward()
    assert_close(ours_out.logits, theirs_out.logits, **EXACT)
    for mine, peft_layer in pairs:
        assert_close(mine.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad,
                     **EXACT)
        mine.merge()
        peft_layer.merge()  # W + s B A summed in float32, W' rounded to bf16 once
        assert_close(mine.base_layer.weight, peft_layer.base_layer.weight, **EXACT)


def test_magnitude_at_init_is_the_row_norm_of_w_and_equals_pefts(tiny):
    ours, theirs = inject_dora(copy.deepcopy(tiny)), peft_dora_model(tiny)
    for mine, peft_layer in peft_dora(ours, theirs):
        weight = mine.base_layer.weight
        assert mine.lora_magnitude_vector.shape == (weight.shape[0],)  # one per output feature
        assert_close(mine.lora_magnitude_vector.detach(), torch.linalg.norm(weight, dim=1), **EXACT)
        assert_close(mine.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight, **EXACT)


def test_output_at_init_equals_the_base_models(tiny):
    # m = ||W||_c and B = 0: scale is exactly 1, both DoRA terms exactly 0.
    ours = inject_dora(copy.deepcopy(tiny))
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(ours(ids).logits, tiny(ids).logits, **EXACT)


def test_reset_magnitude_makes_the_output_plain_loras(tiny):
    # What an initialisation that moves A and B (PiSSA) calls afterwards: scale is exactly 1 again.
    ours = randomize_dora(inject_dora(copy.deepcopy(tiny)))
    for _, layer in dora_layers(ours):
        layer.reset_magnitude()
        x = torch.randn(3, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            plain = layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
            assert_close(layer(x), plain, **EXACT)


def test_disabled_dora_equals_the_base_model(tiny):
    ours = randomize_dora(inject_dora(copy.deepcopy(tiny)))
    ids = token_batch(tiny)
    with torch.no_grad(), disable_lora(ours):
        assert_close(ours(ids).logits, tiny(ids).logits, **EXACT)


def test_merged_weight_is_m_times_the_normalized_adapted_weight(tiny):
    ours = randomize_dora(inject_dora(copy.deepcopy(tiny)))
    for _, layer in dora_layers(ours):
        adapted = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        expected = layer.lora_magnitude_vector[:, None] * adapted / torch.linalg.norm(adapted, dim=1, keepdim=True)
        # B @ A * s (peft's merge) and s * B @ A above round differently in the last place.
        assert_close(layer.merged_weight(), expected.detach(), **ROUNDING)
        assert_close(column_norm(layer.merged_weight()), layer.lora_magnitude_vector.detach(), **ROUNDING)


def test_merged_and_unmerged_weights_equal_pefts(tiny):
    ours, theirs = dora_and_peft(tiny)
    pairs = peft_dora(ours, theirs)
    for mine, peft_layer in pairs:
        mine.merge()
        peft_layer.merge()
        assert_close(mine.base_layer.weight, peft_layer.base_layer.weight, **EXACT)
    for mine, peft_layer in pairs:
        mine.unmerge()
        peft_layer.unmerge()
        assert_close(mine.base_layer.weight, peft_layer.base_layer.weight, **EXACT)


def test_delta_weight_is_the_whole_change_merge_makes(tiny):
    ours = randomize_dora(inject_dora(copy.deepcopy(tiny)))
    for _, layer in dora_layers(ours):
        before, delta = layer.base_layer.weight.clone(), layer.delta_weight()
        layer.merge()
        # (W' - W) + W against W' itself: one rounding apart.
        assert_close(before + delta, layer.base_layer.weight, **ROUNDING)
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.delta_weight()


def test_merged_forward_equals_unmerged_forward(tiny):
    ours = randomize_dora(inject_dora(copy.deepcopy(tiny)))
    ids = token_batch(tiny)
    with torch.no_grad():
        unmerged = ours(ids).logits
        for _, layer in dora_layers(ours):
            layer.merge()
        merged = ours(ids).logits
    # W' x against base(x) + (scale - 1) W x + scale s B A x, and B @ A against B(A(I))ᵀ in the norm:
    # one number by two routes, equal up to float32 rounding carried through two layers (measured
    # <= 4e-7 on logits of size ~1).
    assert_close(merged, unmerged, rtol=1e-6, atol=1e-6)


def test_merging_twice_is_a_no_op(tiny):
    ours = randomize_dora(inject_dora(copy.deepcopy(tiny)))
    for _, layer in dora_layers(ours):
        layer.merge()
        once = layer.base_layer.weight.clone()
        layer.merge()
        assert layer.merged
        assert_close(layer.base_layer.weight, once, **EXACT)


def test_unmerge_restores_w(tiny):
    ours = randomize_dora(inject_dora(copy.deepcopy(tiny)))
    for _, layer in dora_layers(ours):
        before = layer.base_layer.weight.clone()
        layer.merge()
        assert not torch.equal(layer.base_layer.weight, before)
        layer.unmerge()
        layer.unmerge()  # a no-op when not merged
        assert not layer.merged
        # W' * norm / m - s B A: a division and a subtraction, each rounding once in float32.
        assert_close(layer.base_layer.weight, before, **ROUNDING)


def test_gradients_equal_the_formula_with_the_norm_detached():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
        layer.lora_magnitude_vector.mul_(1.1)
    x = torch.randn(3, 16)
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    W, b, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling

    def paper(detach):  # W' x + b, the DoRA paper's Eq. (5), norm detached or not
        adapted = W + s * B @ A
        norm = torch.linalg.norm(adapted, dim=1, keepdim=True)
        return nn.functional.linear(x, m[:, None] * adapted / (norm.detach() if detach else norm), b)

    def gradients(output):
        return torch.autograd.grad(output.square().sum(), (A, B, m))

    ours = gradients(layer(x))
    # The layer and Eq. (5) are one number by two routes (see test_merged_forward_equals_unmerged_forward),
    # and each gradient entry sums over the batch and the rows: differences of ~1e-6 on gradients of ~5.
    for mine, expected in zip(ours, gradients(paper(detach=True))):
        assert_close(mine, expected, rtol=1e-5, atol=1e-5)
    # And the detach is what makes them equal: through the norm, A and B get gradients that differ by
    # ~1, not ~1e-6. m's does not change: the norm does not depend on m.
    attached = gradients(paper(detach=False))
    assert (ours[0] - attached[0]).abs().max() > 0.1
    assert (ours[1] - attached[1]).abs().max() > 0.1
    assert_close(ours[2], attached[2], rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_pefts_file_keys(tiny):
    ours, theirs = dora_and_peft(tiny)
    ours_keys = {KEY_PREFIX + key for key in ours.state_dict() if ".lora_" in key}
    assert ours_keys == set(get_peft_model_state_dict(theirs))
    assert set(magnitude_state_dict(ours)) == {magnitude_key(name) for name in find_targets(tiny, TARGETS)}
    assert all(key.endswith(".lora_magnitude_vector") for key in magnitude_state_dict(ours))


def test_state_dict_saved_here_loads_in_peft_with_the_same_logits(tiny):
    ours = randomize_dora(inject_dora(copy.deepcopy(tiny)))
    tensors = {**adapter_state_dict(ours), **{KEY_PREFIX + k: v for k, v in magnitude_state_dict(ours).items()}}
    theirs = peft_dora_model(tiny)
    loaded = set_peft_model_state_dict(theirs, tensors)
    assert not loaded.unexpected_keys
    assert not [key for key in loaded.missing_keys if ".lora_" in key]
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(theirs(ids).logits, ours(ids).logits, **EXACT)


def test_state_dict_saved_by_peft_loads_here_with_the_same_logits(tiny):
    _, theirs = dora_and_peft(tiny, seed=3)
    tensors = get_peft_model_state_dict(theirs)
    ours = inject_dora(copy.deepcopy(tiny))
    with torch.no_grad():
        for name, layer in dora_layers(ours):
            for matrix in ("lora_A", "lora_B"):
                getattr(layer, matrix).weight.copy_(tensors.pop(f"{KEY_PREFIX}{name}.{matrix}.weight"))
            layer.lora_magnitude_vector.copy_(tensors.pop(KEY_PREFIX + magnitude_key(name)))
    assert not tensors  # every tensor peft saved has its place here
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, **EXACT)


def test_a_4_bit_base_is_refused_naming_the_fix():
    with pytest.raises(NotImplementedError, match="dequantize_model"):
        DoRALinear(NF4Linear(nn.Linear(64, 64)), r=4, alpha=8)


def test_the_fused_path_is_refused(tiny):
    ours = inject_dora(copy.deepcopy(tiny))
    with pytest.raises(ValueError, match="plain path"):
        use_fused_lora(ours, True)
    assert not any(isinstance(layer, FusedLoRALinear) for _, layer in lora_layers(ours))


# --- Through inject_lora, save_adapter, load_adapter and the loop ----------------------------------------------


def test_inject_lora_use_dora_trains_a_b_and_m_and_equals_peft(tiny):
    ours, theirs = lora_and_peft(tiny, use_dora=True)
    trainable = {name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
                 for name, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}
    ids = token_batch(tiny)
    ours_out, theirs_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    assert_close(ours_out.logits, theirs_out.logits, rtol=0, atol=0)
    for mine, peft_layer in peft_lora(ours, theirs):
        assert_close(mine.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad,
                     rtol=0, atol=0)


def test_dora_adapter_saved_here_loads_in_peft_and_peft_s_loads_here(tiny, tmp_path):
    ours, theirs = lora_and_peft(tiny, use_dora=True)
    with torch.no_grad():  # a trained-looking m, so that a magnitude lost on the way would show
        for _, layer in lora_layers(ours):
            layer.lora_magnitude_vector.mul_(1.5)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    ids = token_batch(tiny)
    loaded_in_peft = PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path / "ours")
    with torch.no_grad():
        assert_close(loaded_in_peft(ids).logits, ours(ids).logits, rtol=0, atol=0)
    loaded_in_peft.save_pretrained(tmp_path / "theirs")
    loaded_here = copy.deepcopy(tiny)
    load_adapter(loaded_here, tmp_path / "theirs")
    with torch.no_grad():
        assert_close(loaded_here(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_loading_a_dora_adapter_into_plain_lora_layers_is_refused_by_name(tiny, tmp_path):
    ours, _ = lora_and_peft(tiny, use_dora=True)
    save_adapter(ours, tmp_path / "adapter")
    plain = copy.deepcopy(tiny)
    inject_lora(plain, r=4, alpha=8)
    with pytest.raises(ValueError, match="use_dora is True but model.layers.0.self_attn.q_proj is not a DoRA layer"):
        load_adapter(plain, tmp_path / "adapter")
