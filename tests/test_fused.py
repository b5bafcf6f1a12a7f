"""The fused LoRA path (lora/fused.py) computes what the plain path computes, and saves no more.

The plain path is peft's operations in peft's order, so it equals peft bit for bit; the fused
one does the same math in a different order (through W + s B A, or with the add inside the
matmul), so it equals both up to float rounding: tight in float32, loose in bfloat16.
"""

import pytest
import torch
from conftest import lora_and_peft, peft_lora, token_batch
from torch import nn
from torch.testing import assert_close

from lora import LoRALinear, fused_lora, inject_lora, use_fused_lora

FP32 = dict(rtol=1e-5, atol=1e-6)  # a few float32 roundings apart
BF16 = dict(rtol=3e-2, atol=3e-2)  # bfloat16 keeps 8 significant bits; sums of 16-64 terms round a few times


def layer_pair(bias: bool, dropout: float = 0.0, seed: int = 0) -> tuple[LoRALinear, LoRALinear]:
    """Two identical LoRALinear layers (non-zero A and B), one plain, one fused."""
    torch.manual_seed(seed)
    plain = LoRALinear(nn.Linear(48, 40, bias=bias), r=4, alpha=8, dropout=dropout)
    nn.init.normal_(plain.lora_B.weight, std=0.1)
    fused = LoRALinear(nn.Linear(48, 40, bias=bias), r=4, alpha=8, dropout=dropout)
    fused.load_state_dict(plain.state_dict())
    plain.fused, fused.fused = False, True
    return plain, fused


def forward_backward(layer: LoRALinear, x: torch.Tensor, seed: int = 1, bf16: bool = False):
    """Output and the gradients of x, A, B (and the bias when it trains), from one seeded forward and backward."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout mask for both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()  # a gradient that differs per output
    bias = layer.base_layer.bias
    return out, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, bias.grad if bias is not None else None


SHAPES = {"2d": (10, 48), "3d": (2, 5, 48)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_fused_output_and_gradients_equal_the_plain_path_in_float32(shape, bias, dropout):
    plain, fused = layer_pair(bias, dropout)
    plain.train(), fused.train()
    x = torch.randn(shape)
    for expected, actual in zip(forward_backward(plain, x), forward_backward(fused, x)):
        assert_close(actual, expected, **FP32)


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_fused_output_and_gradients_equal_the_plain_path_under_bf16_autocast(dropout):
    plain, fused = layer_pair(bias=True, dropout=dropout)
    plain.train(), fused.train()
    x = torch.randn(2, 16, 48)
    expected, actual = forward_backward(plain, x, bf16=True), forward_backward(fused, x, bf16=True)
    assert actual[0].dtype == expected[0].dtype == torch.bfloat16
    assert actual[2].dtype == torch.float32  # A's gradient in A's own dtype
    assert actual[4] is expected[4] is None  # the bias is frozen
    for e, a in zip(expected[:4], actual[:4]):
        assert_close(a.float(), e.float(), **BF16)


def test_trainable_bias_gets_the_plain_paths_gradient():
    plain, fused = layer_pair(bias=True)
    for layer in (plain, fused):
        layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 7, 48)
    assert_close(forward_backward(fused, x)[4], forward_backward(plain, x)[4], **FP32)


def test_input_without_grad_still_trains_a_and_b():
    plain, fused = layer_pair(bias=False)
    x = torch.randn(6, 48)  # like the first layer's input, below the frozen embeddings
    outputs = []
    for layer in (plain, fused):
        layer(x).square().sum().backward()
        outputs.append((layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    for expected, actual in zip(*outputs):
        assert_close(actual, expected, **FP32)


def saved_bytes(layer: LoRALinear, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``layer(x)``, parameters not counted."""
    parameters = {p.data_ptr() for p in layer.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    return sum(storages.values())


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_fused_path_saves_no_more_for_backward_than_the_plain_path(dropout):
    plain, fused = layer_pair(bias=True, dropout=dropout)
    plain.train(), fused.train()
    x = torch.randn(4, 64, 48, requires_grad=True)
    assert saved_bytes(fused, x) <= saved_bytes(plain, x)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj")], ids=["q_v", "all_linear"])
def test_fused_model_logits_and_gradients_equal_peft(tiny, targets):
    ours, theirs = lora_and_peft(tiny, targets)
    assert use_fused_lora(ours) == len(peft_lora(ours, theirs))
    ids = token_batch(tiny)
    ours_out, theirs_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    assert_close(ours_out.logits, theirs_out.logits, **FP32)
    for mine, peft_layer in peft_lora(ours, theirs):
        assert_close(mine.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, **FP32)
        assert_close(mine.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, **FP32)


def test_fused_function_is_the_formula():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 12), torch.randn(9, 12), torch.randn(9)
    lora_A, lora_B = torch.randn(3, 12), torch.randn(9, 3)
    expected = x @ weight.T + bias + 2.5 * (x @ lora_A.T @ lora_B.T)
    assert_close(fused_lora(x, weight, bias, lora_A, lora_B, 2.5), expected, **FP32)


def test_automatic_choice_is_fused_when_training_and_plain_without_grad(tiny):
    inject_lora(tiny, ["q_proj"], r=2)
    use_fused_lora(tiny, None)
    layer = tiny.model.layers[0].self_attn.q_proj
    assert layer.use_fused()
    with torch.no_grad():
        assert not layer.use_fused()  # decoding: forming W + s B A per token would cost more than it saves
    layer.base_layer.weight.requires_grad_(True)
    assert not layer.use_fused()  # the fused path keeps the base frozen
    layer.fused = True
    with pytest.raises(ValueError, match="keeps the base weight frozen; set layer.fused = False"):
        layer(torch.randn(1, 64))


def test_automatic_choice_is_the_default():
    layer = LoRALinear(nn.Linear(4, 4), r=2, alpha=4)
    assert layer.fused is None
    assert layer.use_fused()
