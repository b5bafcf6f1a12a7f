"""NF4 quantization (lora/nf4.py): the code book, blockwise absmax, packing, double quantization, the layer."""

import copy

import pytest
import torch
from conftest import token_batch
from torch import nn
from torch.testing import assert_close

from lora import (
    LoRALinear,
    cast_frozen,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    trainable_parameters_line,
    use_fused_lora,
)
from lora.layer import LinearBase
from lora.nf4 import (
    NF4,
    NF4Linear,
    dequantize_absmax,
    dequantize_model,
    dequantize_nf4,
    quantize_absmax,
    quantize_blocks,
    quantize_model,
    quantize_nf4,
)

# Appendix E of the QLoRA paper (Dettmers et al., 2023), as printed there and in bitsandbytes.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def normal_weight(rows=256, cols=192, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_code_book_equals_the_qlora_papers_values():
    assert_close(NF4, torch.tensor(PUBLISHED_NF4), rtol=0, atol=1e-6)  # float64 quantiles against float32's


def test_code_book_is_ascending_from_minus_one_to_one_with_an_exact_zero():
    assert (NF4[1:] > NF4[:-1]).all()
    assert NF4[0] == -1 and NF4[-1] == 1 and NF4[7] == 0


def test_each_weight_is_within_half_a_code_gap_of_its_block_absmax():
    weight = normal_weight()
    codes, absmax = quantize_nf4(weight)
    error = (dequantize_nf4(codes, absmax, weight.shape) - weight).view(-1, 64).abs()
    half_widest_gap = (NF4[1:] - NF4[:-1]).max() / 2
    assert (error <= absmax[:, None] * half_widest_gap * (1 + 1e-6)).all()


def test_block_absmax_is_stored_exactly():
    # The largest |w| of each block maps to the code -1 or 1, so it comes back exactly.
    weight = normal_weight()
    codes, absmax = quantize_nf4(weight)
    blocks, _ = quantize_blocks(weight, 64)
    largest = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    assert_close(dequantize_nf4(codes, absmax, weight.shape).view(-1, 64).gather(
        1, blocks.abs().argmax(dim=1, keepdim=True)), largest, rtol=0, atol=0)


def test_nf4_beats_uniform_4bit_on_normal_weights():
    weight = normal_weight()
    blocks, absmax = quantize_blocks(weight, 64)
    uniform = torch.linspace(-1, 1, 16)  # 16 evenly spaced levels, the same absmax blocks
    scaled = blocks / absmax[:, None]
    uniform_error = ((uniform[(scaled[..., None] - uniform).abs().argmin(-1)] - scaled) * absmax[:, None]).square()
    nf4_error = (dequantize_nf4(*quantize_nf4(weight), weight.shape) - weight).square()
    assert nf4_error.mean() < uniform_error.mean()


def test_two_codes_per_byte_high_nibble_first():
    weight = torch.zeros(64)
    weight[:3] = torch.tensor([-1.0, 1.0, 0.0])  # codes 0, 15, 7
    codes, absmax = quantize_nf4(weight)
    assert codes.dtype == torch.uint8 and codes.numel() == 32
    assert codes[:2].tolist() == [0 << 4 | 15, 7 << 4 | 7]
    assert_close(dequantize_nf4(codes, absmax, weight.shape), weight, rtol=0, atol=0)


def test_weight_not_a_multiple_of_the_block_is_padded_and_cut_back():
    weight = normal_weight(5, 7)  # 35 weights: one block of 64, 29 of them padding
    codes, absmax = quantize_nf4(weight)
    assert codes.numel() == 32 and absmax.numel() == 1
    restored = dequantize_nf4(codes, absmax, weight.shape)
    assert restored.shape == weight.shape
    assert (restored - weight).abs().max() <= absmax * (NF4[1:] - NF4[:-1]).max() / 2


def test_all_zero_block_stays_zero():
    codes, absmax = quantize_nf4(torch.zeros(128))
    assert_close(dequantize_nf4(codes, absmax, torch.Size((128,))), torch.zeros(128), rtol=0, atol=0)


def test_odd_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size must be a positive even number"):
        quantize_nf4(torch.zeros(10), block_size=5)


def test_double_quantized_absmax_is_within_half_an_8bit_step():
    absmax = normal_weight(64, 64).abs().view(-1, 64).amax(dim=1).repeat(20) * torch.linspace(0.5, 2, 1280)
    codes, scales, mean = quantize_absmax(absmax)
    restored = dequantize_absmax(codes, scales, mean, absmax.numel())
    # float8 e4m3 keeps 3 mantissa bits: in its top binade [256, 448] the step is 32, so 16 at most.
    block_max = (absmax - mean).abs().view(-1, 256).amax(dim=1)
    bound = block_max * 16 / 448
    assert ((restored - absmax).abs().view(-1, 256) <= bound[:, None] * (1 + 1e-5)).all()


@pytest.mark.parametrize("double_quant, bits", [(False, 4.5), (True, 4.127)], ids=["nf4", "double_quant"])
def test_storage_bits_per_weight(double_quant, bits):
    layer = NF4Linear(nn.Linear(1024, 1024), double_quant=double_quant)
    measured = layer.storage_bits() / (1024 * 1024)
    assert measured == pytest.approx(bits, abs=5e-4)


@pytest.mark.parametrize("double_quant, stored", [(False, ["codes", "absmax"]),
                                                  (True, ["codes", "absmax_codes", "absmax_scales"])],
                         ids=["nf4", "double_quant"])
def test_nf4_storage_is_frozen_parameters_and_scalar_mean_a_buffer(double_quant, stored):
    # FSDP2 shards parameters and replicates buffers: only the 0-d mean, which cannot be sharded, is a buffer.
    layer = NF4Linear(nn.Linear(96, 80), double_quant=double_quant)
    mean = ["absmax_mean"] if double_quant else []
    with pytest.warns(UserWarning, match="rounds W \\+ ΔW to NF4 again"):
        stored_again = NF4Linear(nn.Linear(96, 80), double_quant=double_quant).add_(torch.zeros(80, 96))
    for each in (layer, stored_again):  # add_ quantizes and stores anew
        parameters, buffers = dict(each.named_parameters()), dict(each.named_buffers())
        assert list(parameters) == stored + ["bias"] and list(buffers) == mean
        assert not any(parameter.requires_grad for parameter in parameters.values())
        assert all(buffer.dim() == 0 for buffer in buffers.values())
        assert [id(tensor) for tensor in each.storage()] == [id(parameters[name]) for name in stored] + [
            id(buffers[name]) for name in mean]
        assert set(each.state_dict()) == {*stored, *mean, "bias"}


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "double_quant"])
def test_state_dict_loads_into_a_layer_quantized_from_other_weights(double_quant):
    torch.manual_seed(0)
    layer, other = (NF4Linear(nn.Linear(96, 80), double_quant=double_quant) for _ in range(2))
    other.load_state_dict(layer.state_dict())
    assert_close(other.dequantize(), layer.dequantize(), rtol=0, atol=0)


def test_double_quant_codes_are_float8_bytes():
    linear = nn.Linear(1024, 96)  # 1536 blocks of 64: 6 blocks of 256 absmax constants
    layer = NF4Linear(linear, double_quant=True)
    _, absmax = quantize_nf4(linear.weight)
    codes, scales, mean = quantize_absmax(absmax)
    assert layer.absmax_codes.dtype == torch.uint8
    assert torch.equal(layer.absmax_codes, codes.view(torch.uint8))  # the float8 bit patterns, byte for byte
    assert_close(layer.block_absmax(), dequantize_absmax(codes, scales, mean, absmax.numel()), rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("cast, dtype", [(lambda model: model.to(torch.bfloat16), torch.bfloat16),
                                         (lambda model: model.half(), torch.float16)], ids=["to_bfloat16", "half"])
def test_casting_a_4bit_model_leaves_its_constants_and_dequantized_weights_unchanged(tiny, double_quant, cast, dtype):
    quantize_model(tiny.requires_grad_(False), double_quant=double_quant)
    layers = [module for module in tiny.modules() if isinstance(module, NF4Linear)]
    stored = [[tensor.clone() for tensor in layer.storage()] for layer in layers]
    weights = [layer.dequantize(torch.float32) for layer in layers]
    cast(tiny)
    for layer, tensors, weight in zip(layers, stored, weights):
        for tensor, before in zip(layer.storage(), tensors):
            assert tensor.dtype == before.dtype
            assert_close(tensor, before, rtol=0, atol=0)
        assert_close(layer.dequantize(torch.float32), weight, rtol=0, atol=0)
        assert_close(layer.dequantize(), weight.to(dtype), rtol=0, atol=0)  # as cast_frozen: computes in dtype
        assert layer.bias is None or layer.bias.dtype == dtype
    assert tiny.lm_head.weight.dtype == dtype  # not quantized: cast


def test_moving_a_4bit_layer_moves_its_storage_in_its_own_dtype():
    layer = NF4Linear(nn.Linear(96, 80), double_quant=True).to("meta", torch.bfloat16)
    assert {tensor.device.type for tensor in layer.storage()} == {"meta"}
    assert [tensor.dtype for tensor in layer.storage()] == [torch.uint8, torch.uint8, torch.float32, torch.float32]
    assert layer.bias.device.type == "meta" and layer.bias.dtype == torch.bfloat16


def test_integer_casts_leave_the_codes_as_stored():
    layer = NF4Linear(nn.Linear(96, 80), double_quant=True)
    codes, absmax_codes = layer.codes.clone(), layer.absmax_codes.clone()
    layer.type(torch.int8)  # casts every tensor, integers included
    assert torch.equal(layer.codes, codes) and torch.equal(layer.absmax_codes, absmax_codes)
    assert layer.dtype == torch.float32  # not a float: still dequantizes to float32


def test_layer_output_is_the_dequantized_weights_output():
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    layer = NF4Linear(linear)
    x = torch.randn(3, 5, 96)
    assert_close(layer(x), x @ layer.dequantize().T + linear.bias, rtol=1e-6, atol=1e-6)


def test_input_gradient_flows_and_codes_and_bias_never_change():
    torch.manual_seed(0)
    layer = NF4Linear(nn.Linear(96, 80), double_quant=True)
    codes, bias = layer.codes.clone(), layer.bias.detach().clone()
    x = torch.randn(4, 96, requires_grad=True)
    grad_out = torch.randn(4, 80)
    layer(x).backward(grad_out)
    assert_close(x.grad, grad_out @ layer.dequantize(), rtol=1e-6, atol=1e-6)
    assert layer.bias.grad is None
    assert torch.equal(layer.codes, codes) and torch.equal(layer.bias, bias)


def test_no_dequantized_weight_is_kept_for_the_backward():
    layer = NF4Linear(nn.Linear(96, 80))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(torch.randn(4, 96, requires_grad=True)).sum().backward()
    assert torch.Size((80, 96)) not in saved


def test_bf16_autocast_computes_in_bf16():
    layer = NF4Linear(nn.Linear(96, 80))
    x = torch.randn(4, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_quantize_model_replaces_every_linear_but_the_head(tiny):
    linears = [name for name, module in tiny.named_modules() if isinstance(module, nn.Linear)]
    quantized = quantize_model(tiny)
    assert quantized == [name for name in linears if name != "lm_head"]
    assert all(isinstance(tiny.get_submodule(name), NF4Linear) for name in quantized)
    assert isinstance(tiny.lm_head, nn.Linear)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "double_quant"])
def test_quantized_tiny_model_logits_move_no_more_than_its_weights(tiny, double_quant):
    ids = token_batch(tiny)
    weights = {name: m.weight.detach().clone() for name, m in tiny.named_modules()
               if isinstance(m, nn.Linear) and name != "lm_head"}
    with torch.no_grad():
        expected = tiny(ids).logits
        quantize_model(tiny, double_quant=double_quant)
        logits = tiny(ids).logits
    error = sum((tiny.get_submodule(name).dequantize() - w).square().sum() for name, w in weights.items())
    weight_error = (error / sum(w.square().sum() for w in weights.values())).sqrt()  # relative, all layers
    logit_error = (logits - expected).norm() / expected.norm()
    # Each layer's output moves by about its weights' relative error, about 9% at 4 bits; through
    # the residual stream the layers' errors partly add up, partly cancel.
    assert weight_error < 0.1
    assert logit_error < 1.5 * weight_error


# --- LoRA on a 4-bit base (QLoRA) -----------------------------------------------------------------------------


def test_lora_on_a_4bit_base_is_the_dequantized_base_plus_the_update():
    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear(nn.Linear(96, 80)), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 96)
    base = layer.base_layer
    expected = x @ base.dequantize().T + base.bias + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.lora_A.weight.dtype == torch.float32 and type(layer) is LoRALinear  # the plain path


def test_qlora_training_moves_a_and_b_and_never_the_codes(tiny):
    quantize_model(tiny, double_quant=True)
    codes = {name: module.codes.clone() for name, module in tiny.named_modules() if isinstance(module, NF4Linear)}
    inject_lora(tiny, ["q_proj", "v_proj"], r=4)
    before = {name: p.detach().clone() for name, p in tiny.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(tiny)
    losses = []
    for _ in range(5):
        loss = tiny(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert set(before) == {n for n, _ in tiny.named_parameters() if "lora_" in n}
    assert all(not torch.equal(p, before[n]) for n, p in tiny.named_parameters() if n in before and "lora_A" in n)
    for name, module in tiny.named_modules():
        if isinstance(module, NF4Linear):
            assert torch.equal(module.codes, codes[name.removesuffix(".base_layer")])


@pytest.mark.parametrize("double_quant", [False, True])
def test_cast_frozen_leaves_4bit_constants_unrounded_and_dequantizes_to_the_new_dtype(tiny, double_quant):
    quantize_model(tiny.requires_grad_(False), double_quant=double_quant)
    layers = [module for module in tiny.modules() if isinstance(module, NF4Linear)]
    stored = [[tensor.clone() for tensor in layer.storage()] for layer in layers]
    weights = [layer.dequantize(torch.float32) for layer in layers]
    cast_frozen(tiny, torch.bfloat16)
    for layer, tensors, weight in zip(layers, stored, weights):
        for tensor, before in zip(layer.storage(), tensors):
            assert tensor.dtype == before.dtype
            assert_close(tensor, before, rtol=0, atol=0)
        assert layer.dequantize().dtype == torch.bfloat16
        assert_close(layer.dequantize(), weight.to(torch.bfloat16), rtol=0, atol=0)
        assert layer.bias is None or layer.bias.dtype == torch.bfloat16
    assert tiny.lm_head.weight.dtype == torch.bfloat16  # not quantized: cast


def test_merging_into_a_4bit_base_warns_and_rounds_the_sum_to_nf4():
    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear(nn.Linear(96, 80)), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    merged_weight = layer.base_layer.dequantize() + layer.delta_weight()
    with pytest.warns(UserWarning, match="rounds W \\+ ΔW to NF4 again"):
        layer.merge()
    codes, absmax = quantize_nf4(merged_weight)
    assert torch.equal(layer.base_layer.codes, codes)
    assert_close(layer.base_layer.absmax, absmax, rtol=0, atol=0)


def test_dequantize_model_then_merge_is_exact(tiny):
    quantize_model(tiny)
    inject_lora(tiny, ["q_proj", "v_proj"], r=4)
    for _, layer in lora_layers(tiny):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    ids = token_batch(tiny)
    with torch.no_grad():
        expected = tiny(ids).logits
        dequantized = dequantize_model(tiny)
        assert dequantized and not any(isinstance(m, NF4Linear) for m in tiny.modules())
        merge_lora(tiny)
        assert_close(tiny(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_choosing_the_fused_path_for_a_4bit_base_is_refused_and_names_the_fix():
    layer = LoRALinear(NF4Linear(nn.Linear(64, 64)), r=2, alpha=4)
    with pytest.raises(ValueError, match=r"needs an nn\.Linear base.*use_fused_lora\(model, False\)"):
        use_fused_lora(layer, True)
    assert type(layer) is LoRALinear  # left on the plain path


def test_4bit_layer_answers_for_its_weight_as_a_tensor_does():
    linear = nn.Linear(96, 80, dtype=torch.bfloat16)
    layer = NF4Linear(linear)
    assert (layer.shape, layer.dtype, layer.device) == (linear.weight.shape, torch.bfloat16, linear.weight.device)
    # LoRALinear asks base_layer.weight, as of an nn.Linear: here the layer itself answers for it.
    assert layer.weight is layer and isinstance(layer, LinearBase)
    lora = LoRALinear(layer, r=4, alpha=8)
    assert lora.lora_A.weight.dtype == lora.delta_weight().dtype == torch.bfloat16


def test_unmerging_a_4bit_base_rounds_again_and_warns():
    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear(nn.Linear(96, 80)), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    with pytest.warns(UserWarning, match="rounds W \\+ ΔW to NF4 again"):
        layer.merge()
    restored = layer.base_layer.dequantize() - layer.delta_weight()
    with pytest.warns(UserWarning, match="rounds W \\+ ΔW to NF4 again"):
        layer.unmerge()
    codes, _ = quantize_nf4(restored)
    assert torch.equal(layer.base_layer.codes, codes) and not layer.merged


def test_adapter_trained_on_a_4bit_base_loads_into_the_full_precision_model(tiny, tmp_path):
    full = copy.deepcopy(tiny)
    quantize_model(tiny)
    inject_lora(tiny, ["q_proj", "v_proj"], r=4)
    for _, layer in lora_layers(tiny):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    save_adapter(tiny, tmp_path / "adapter")
    assert load_adapter(full, tmp_path / "adapter") == [name for name, _ in lora_layers(tiny)]
    for (_, mine), (_, theirs) in zip(lora_layers(full), lora_layers(tiny)):
        assert_close(mine.lora_A.weight, theirs.lora_A.weight, rtol=0, atol=0)
        assert_close(mine.lora_B.weight, theirs.lora_B.weight, rtol=0, atol=0)


# --- Against bitsandbytes, the reference NF4 (the test extras install it; skipped where it does not run) ---------


def test_code_book_codes_and_dequantized_weights_equal_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    weight = normal_weight()
    try:
        packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    except (RuntimeError, NotImplementedError) as error:  # a build without this device's kernels
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {error}")
    assert_close(NF4, bnb.get_4bit_type("nf4", device="cpu"), rtol=0, atol=1e-6)
    codes, absmax = quantize_nf4(weight)
    assert torch.equal(codes, packed.flatten())  # the same nearest codes, packed the same way
    assert_close(absmax, state.absmax, rtol=0, atol=0)
    assert_close(dequantize_nf4(codes, absmax, weight.shape), bnb.dequantize_4bit(packed, state), rtol=1e-6, atol=0)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "double_quant"])
def test_count_parameters_of_quantized_model_is_the_unquantized_count(tiny, double_quant):
    # The 4-bit storage is frozen parameters (for FSDP2), counted as the out x in weights it stands for.
    full = copy.deepcopy(tiny)
    quantize_model(tiny, double_quant=double_quant)
    for model in (full, tiny):
        inject_lora(model, ["q_proj", "v_proj"], r=4)
    assert count_parameters(tiny) == count_parameters(full)
    assert trainable_parameters_line(tiny) == trainable_parameters_line(full)
