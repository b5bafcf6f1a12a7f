"""Weighted combinations of adapters: peft's "svd" and "linear", equal to peft's, and what each computes."""

import pytest
import torch
from conftest import peft_factors, peft_with_named_adapters, token_batch, with_named_adapters
from torch.testing import assert_close

from lora import add_adapter, add_weighted_adapter, adapter_names, set_adapter
from lora.named import adapter_layers, factors

ADAPTERS = {
    "default": dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8),
    "french": dict(target_modules=["q_proj", "k_proj"], r=8, alpha=4),
    "same_r": dict(target_modules=["q_proj", "up_proj"], r=4, alpha=16),
    "words": dict(target_modules=["embed_tokens", "q_proj"], r=4, alpha=8),
    "stable": dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True),
}


def with_adapters(base, names):
    return with_named_adapters(base, ADAPTERS, names)


def peft_twin(base, model):
    return peft_with_named_adapters(base, model, ADAPTERS)


def update(layer):
    """ΔW = s B A, (out, in), of one LoRA layer."""
    A, B = factors(layer)
    return B @ A * layer.scaling


def make_contiguous(peft_model, name):
    """Store peft's factors of adapter ``name`` contiguously, as ours are: the same values in another layout.

    peft keeps A as it comes out of the SVD, a transposed view (strides (1, in)); a matmul over
    another memory layout may add in another order, and did on an AMD EPYC (logits 2e-7 apart).
    """
    with torch.no_grad():
        for module in peft_model.modules():
            for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                if name in getattr(module, part, {}):
                    factor = getattr(module, part)[name]
                    factor = factor.weight if isinstance(factor, torch.nn.Module) else factor
                    factor.data = factor.data.contiguous()


@pytest.mark.parametrize("names, weights, combination_type, svd_rank", [
    (["default", "french"], [0.7, -0.3], "svd", None),
    (["default", "french"], [1.0, 0.5], "svd", 3),
    (["default", "words"], [0.5, 0.5], "svd", 6),
    (["default", "same_r"], [0.7, -0.3], "linear", None),
    (["default", "words"], [2.0, -1.0], "linear", None),
    (["french"], [0.25], "svd", None),  # one adapter: linear, as peft takes it
])
def test_weighted_adapter_equals_peft(tiny, names, weights, combination_type, svd_rank):
    model = with_adapters(tiny, names)
    theirs = peft_twin(tiny, model)
    paths = add_weighted_adapter(model, names, weights, "mixed", combination_type, svd_rank)
    theirs.add_weighted_adapter(names, weights, "mixed", combination_type, svd_rank)
    make_contiguous(theirs, "mixed")
    for path in paths:
        layer = adapter_layers(model, "mixed")[path]
        their_layer = theirs.base_model.model.get_submodule(path)
        assert layer.scaling == their_layer.scaling["mixed"] == 1.0
        for mine, their in zip(factors(layer), peft_factors(their_layer, "mixed")):
            assert_close(mine, their, rtol=0, atol=0)
    set_adapter(model, "mixed")
    theirs.set_adapter("mixed")
    ids = token_batch(tiny)
    with torch.no_grad():
        assert_close(model(ids).logits, theirs(ids).logits, rtol=0, atol=0)


def test_svd_combination_of_enough_rank_is_the_weighted_sum_of_the_updates(tiny):
    model = with_adapters(tiny, ["default", "french"])
    add_weighted_adapter(model, ["default", "french"], [0.7, -0.3], "mixed", "svd", svd_rank=4 + 8)
    default, french = adapter_layers(model, "default"), adapter_layers(model, "french")
    for path, layer in adapter_layers(model, "mixed").items():
        expected = sum(weight * update(source[path]) for weight, source in ((0.7, default), (-0.3, french))
                       if path in source)
        assert_close(update(layer), expected, rtol=1e-5, atol=1e-6)


def test_svd_combination_below_full_rank_is_the_best_approximation(tiny):
    model = with_adapters(tiny, ["default", "french"])
    add_weighted_adapter(model, ["default", "french"], [1.0, 1.0], "mixed", "svd", svd_rank=3)
    default, french = adapter_layers(model, "default"), adapter_layers(model, "french")
    path = next(path for path in adapter_layers(model, "mixed") if path.endswith("q_proj"))
    target = update(default[path]) + update(french[path])
    S = torch.linalg.svdvals(target)
    error = torch.linalg.matrix_norm(update(adapter_layers(model, "mixed")[path]) - target)
    assert_close(error, S[3:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)  # Eckart-Young: the tail's norm


def test_linear_combination_of_one_adapter_is_its_update_times_the_weight(tiny):
    model = with_adapters(tiny, ["french"])
    add_weighted_adapter(model, ["french"], [-0.25], "mixed", "linear")
    for path, layer in adapter_layers(model, "mixed").items():
        assert_close(update(layer), -0.25 * update(adapter_layers(model, "french")[path]), rtol=1e-5, atol=1e-7)


def test_linear_combination_of_two_is_not_the_weighted_sum(tiny):
    model = with_adapters(tiny, ["default", "same_r"])
    add_weighted_adapter(model, ["default", "same_r"], [0.5, 0.5], "mixed", "linear")
    path = next(path for path in adapter_layers(model, "mixed") if path.endswith("q_proj"))
    weighted_sum = 0.5 * update(adapter_layers(model, "default")[path]) + 0.5 * update(
        adapter_layers(model, "same_r")[path])
    assert not torch.allclose(update(adapter_layers(model, "mixed")[path]), weighted_sum, atol=1e-4)


def test_the_combined_adapter_waits_beside_the_active_one(tiny):
    model = with_adapters(tiny, ["default", "french"])
    paths = add_weighted_adapter(model, ["default", "french"], [0.5, 0.5], "mixed")
    assert adapter_names(model)[-1] == "mixed"
    assert set(paths) == set(adapter_layers(model, "default")) | set(adapter_layers(model, "french"))


@pytest.mark.parametrize("arguments, message", [
    (dict(adapters=["default", "french"], weights=[1, 1], combination_type="linear"), "linear combination needs"),
    (dict(adapters=["default", "french"], weights=[1], combination_type="svd"), "one weight per adapter"),
    (dict(adapters=["default"], weights=[1], combination_type="ties"), "combination_type must be one of"),
    (dict(adapters=["default", "french"], weights=[1, 1], combination_type="svd", svd_rank=100),
     "svd_rank=100 is larger than"),
])
def test_bad_combinations_are_one_line_errors(tiny, arguments, message):
    model = with_adapters(tiny, ["default", "french"])
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(model, adapter_name="mixed", **arguments)
    assert adapter_names(model) == ["default", "french"]


def test_dora_adapters_do_not_combine(tiny):
    model = with_adapters(tiny, ["default"])
    add_adapter(model, "dora", r=4, use_dora=True)
    with pytest.raises(ValueError, match="dora is a DoRA adapter"):
        add_weighted_adapter(model, ["default", "dora"], [1, 1], "mixed")


def test_an_rslora_adapter_combined_alone_keeps_its_update(tiny):
    # peft 0.21.2 copies use_rslora into the new adapter, whose alpha = r then scales by sqrt(r), not 1:
    # its combination of one rsLoRA adapter at weight 1 doubles the update at r = 4. Here the scaling is 1.
    model = with_adapters(tiny, ["stable"])
    add_weighted_adapter(model, ["stable"], [1.0], "same", "linear")
    for path, layer in adapter_layers(model, "same").items():
        assert layer.scaling == 1.0
        assert_close(update(layer), update(adapter_layers(model, "stable")[path]), rtol=1e-5, atol=1e-7)
