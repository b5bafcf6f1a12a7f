"""The fused LoRA path (lora/fused.py) computes what the plain path computes, and saves no more.

The plain path is ``LoRALinear``'s default and peft's operations in peft's order, so it equals
peft bit for bit; the fused one, opted into with ``use_fused_lora(model, True)``, does the same
math in a different order (through W + s B A, or with the add inside the matmul), so it equals
both up to float rounding: tight in float32, loose in bfloat16.

With dropout the two paths draw their masks differently (``nn.Dropout``; ``torch.native_dropout``),
so the comparisons give both the same explicit mask rather than trusting two RNG paths to agree.
"""

import pytest
import torch
from conftest import lora_and_peft, peft_lora, token_batch
from torch import nn
from torch.testing import assert_close

from lora import LoRALinear, NF4Linear, fused_lora, inject_lora, lora_layers, use_fused_lora
from lora.fused import FusedLoRALinear

FP32 = dict(rtol=1e-5, atol=1e-6)  # a few float32 roundings apart
BF16 = dict(rtol=3e-2, atol=3e-2)  # bfloat16 keeps 8 significant bits; sums of 16-64 terms round a few times


def layer_pair(bias: bool, dropout: float = 0.0, seed: int = 0) -> tuple[LoRALinear, LoRALinear]:
    """Two identical LoRALinear layers (non-zero A and B), one plain (the default), one fused."""
    torch.manual_seed(seed)
    plain = LoRALinear(nn.Linear(48, 40, bias=bias), r=4, alpha=8, dropout=dropout)
    nn.init.normal_(plain.lora_B.weight, std=0.1)
    fused = LoRALinear(nn.Linear(48, 40, bias=bias), r=4, alpha=8, dropout=dropout)
    fused.load_state_dict(plain.state_dict())
    use_fused_lora(fused, True)
    return plain, fused


class ExplicitDropout(nn.Module):
    """Dropout with a given mask instead of a drawn one: ``x * mask / (1 - p)``, as ``nn.Dropout`` computes it."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask * (1.0 / (1.0 - self.p))


def use_mask(plain: LoRALinear, mask: torch.Tensor, monkeypatch) -> None:
    """Both paths drop with ``mask`` (bool, the input's shape): the plain one through its dropout
    module, the fused one through the ``torch.native_dropout`` it calls (lora/fused.py), which is
    given the input as ``(tokens, in)``."""
    plain.lora_dropout = ExplicitDropout(mask, plain.dropout)

    def native_dropout(x, p, train):
        flat = mask.reshape(x.shape)
        return x * flat * (1.0 / (1.0 - p)), flat

    monkeypatch.setattr(torch, "native_dropout", native_dropout)


def dropout_mask(shape, p: float, seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= p


def forward_backward(layer: LoRALinear, x: torch.Tensor, bf16: bool = False):
    """Output and the gradients of x, A, B (and the bias when it trains), from one forward and backward."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()  # a gradient that differs per output
    bias = layer.base_layer.bias
    return out, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, bias.grad if bias is not None else None


SHAPES = {"2d": (10, 48), "3d": (2, 5, 48)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_fused_output_and_gradients_equal_the_plain_path_in_float32(shape, bias, dropout, monkeypatch):
    plain, fused = layer_pair(bias, dropout)
    plain.train(), fused.train()
    x = torch.randn(shape)
    if dropout:
        use_mask(plain, dropout_mask(shape, dropout), monkeypatch)
    for expected, actual in zip(forward_backward(plain, x), forward_backward(fused, x)):
        assert_close(actual, expected, **FP32)


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_fused_output_and_gradients_equal_the_plain_path_under_bf16_autocast(dropout, monkeypatch):
    plain, fused = layer_pair(bias=True, dropout=dropout)
    plain.train(), fused.train()
    x = torch.randn(2, 16, 48)
    if dropout:
        use_mask(plain, dropout_mask(x.shape, dropout), monkeypatch)
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
    # Real dropout on both paths: which inputs the masks drop does not change what is saved.
    plain, fused = layer_pair(bias=True, dropout=dropout)
    plain.train(), fused.train()
    x = torch.randn(4, 64, 48, requires_grad=True)
    assert saved_bytes(fused, x) <= saved_bytes(plain, x)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj")], ids=["q_v", "all_linear"])
def test_fused_model_logits_and_gradients_equal_peft(tiny, targets):
    ours, theirs = lora_and_peft(tiny, targets)
    assert use_fused_lora(ours, True) == len(peft_lora(ours, theirs))
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


def test_fused_dropout_drops_each_input_or_scales_it_by_1_over_1_minus_p():
    # W = 0 and B A = I with scaling 1, so the fused layer's output is its dropped input itself.
    p = 0.25
    layer = LoRALinear(nn.Linear(16, 16, bias=False), r=16, alpha=16, dropout=p)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A.weight.copy_(torch.eye(16))
        layer.lora_B.weight.copy_(torch.eye(16))
    use_fused_lora(layer, True)
    x = torch.randn(256, 16).requires_grad_()
    torch.manual_seed(0)
    out = layer.train()(x)
    out.sum().backward()
    kept = out != 0
    assert 0.2 < 1 - kept.float().mean().item() < 0.3  # about p of 4096 inputs dropped
    assert_close(out[kept], x[kept] * (1 / (1 - p)), rtol=0, atol=0)
    assert_close(x.grad, kept * (1 / (1 - p)), rtol=0, atol=0)  # the backward goes through the same mask


def test_default_is_the_plain_path_the_formula_op_for_op():
    layer = LoRALinear(nn.Linear(48, 40), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 48)
    assert type(layer) is LoRALinear  # not a FusedLoRALinear
    expected = layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    assert_close(layer(x), expected, rtol=0, atol=0)


def test_inject_lora_leaves_every_layer_on_the_plain_path(tiny):
    inject_lora(tiny, ["q_proj", "v_proj"], r=2)
    assert all(type(layer) is LoRALinear for _, layer in lora_layers(tiny))


def test_fused_path_is_taken_while_training_and_the_plain_path_under_no_grad(tiny):
    inject_lora(tiny, ["q_proj"], r=2)
    assert use_fused_lora(tiny, True) == 2
    layer = tiny.model.layers[0].self_attn.q_proj
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 64)
    assert layer.use_fused() and type(layer(x).grad_fn).__name__ == "FusedLoRABackward"
    with torch.no_grad():
        # Decoding: forming W + s B A per call would cost more than it saves.
        assert not layer.use_fused()
        assert_close(layer(x), layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling, rtol=0, atol=0)
    assert use_fused_lora(tiny, False) == 2
    assert type(layer) is LoRALinear and type(layer(x).grad_fn).__name__ != "FusedLoRABackward"


def test_fused_path_refuses_a_trained_base_weight_and_names_the_fix():
    layer = LoRALinear(nn.Linear(64, 64), r=2, alpha=4)
    use_fused_lora(layer, True)
    layer.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"keeps the base weight frozen; .*use_fused_lora\(model, False\)"):
        layer(torch.randn(1, 64))


def test_fused_path_on_a_4bit_base_is_refused_naming_the_layer_and_nothing_changes(tiny):
    inject_lora(tiny, ["q_proj", "v_proj"], r=2)
    layers = [layer for _, layer in lora_layers(tiny)]
    layers[1].base_layer = NF4Linear(layers[1].base_layer)  # the second of four: the first is set, then undone
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.v_proj: the fused LoRA path needs an "
                                         r"nn\.Linear base; .*use_fused_lora\(model, False\)$"):
        use_fused_lora(tiny, True)
    assert all(type(layer) is LoRALinear for layer in layers)


def test_fused_path_refuses_a_base_quantized_after_it_was_chosen():
    layer = LoRALinear(nn.Linear(64, 64), r=2, alpha=4)
    use_fused_lora(layer, True)
    layer.base_layer = NF4Linear(layer.base_layer)
    with pytest.raises(ValueError, match="the fused LoRA path needs an nn.Linear base"):
        layer(torch.randn(1, 64))


def test_use_fused_lora_changes_each_layers_class_in_place_keeping_its_parameters(tiny):
    inject_lora(tiny, ["q_proj", "v_proj"], r=2)
    layers = [layer for _, layer in lora_layers(tiny)]
    parameters = [[id(p) for p in layer.parameters()] for layer in layers]
    keys = set(tiny.state_dict())
    use_fused_lora(tiny, True)
    assert [layer for _, layer in lora_layers(tiny)] == layers  # the same modules, now of the fused class
    assert all(type(layer) is FusedLoRALinear for layer in layers)
    assert [[id(p) for p in layer.parameters()] for layer in layers] == parameters  # those an optimizer holds
    assert set(tiny.state_dict()) == keys
    use_fused_lora(tiny, False)
    assert all(type(layer) is LoRALinear for layer in layers)


def test_use_fused_lora_takes_true_or_false_only(tiny):
    inject_lora(tiny, ["q_proj"], r=2)
    with pytest.raises(TypeError, match="fused must be True or False, got None"):
        use_fused_lora(tiny, None)
