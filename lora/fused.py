"""A fused LoRA forward and backward, written by hand: fewer passes over the activations.

The plain path, ``base(x) + B(A(dropout(x))) * s``, is ``LoRALinear``'s default, its
``forward`` as written; this one is opt-in, ``use_fused_lora(model, True)``, which turns each
``LoRALinear`` into a ``FusedLoRALinear``, and tested against it (``tests/test_fused.py``).
The plain path is five kernels forward (three matmuls, a scale, an add) and, backward,
autograd adds the input gradient of the LoRA branch to the base's in yet another pass. LoRA's
own FLOPs are tiny (r << in, out), so what costs time is those extra passes over
``(tokens, out)`` activations. This path does the same math in fewer:

Forward, float32 and dropout 0: one matmul through a merged weight, ``x W'^T + b`` with
``W' = W + s B A`` formed for the call and dropped (``through_merged_weight``; unlike
``LoRALinear.merge``, W itself never changes). Forming ``W'`` costs ``in * out * r`` FLOPs,
small next to the matmul's ``tokens * in * out`` when there are many more tokens than r
(training), large when there are few (decoding one token at a time): so a ``FusedLoRALinear``
takes this path only while gradients are enabled, and the plain one without them.

Backward, with ``g`` the gradient of the output, ``(tokens, out)``::

    dx = g W'                   one matmul through the merged weight
    dA = (s g B)^T x            (r, in): rank-r products only; no (out, in) gradient is ever formed
    dB = g^T (s x A^T)          (out, r), with x A^T saved by the forward, (tokens, r)

In bf16 or fp16 the weights are not merged: early in training s B A is far smaller than the
spacing of 16-bit numbers around W, and rounding W + s B A to 16 bits loses much of it: the
gradients come out further from float32's than the plain path's (checked on SmolLM2).
With dropout p > 0 they cannot be: the LoRA branch sees ``x_d = mask * x / (1 - p)``, not x.
Then the forward is ``x W^T + b`` with ``s (x_d A^T) B^T`` added in place by the kernel that
computes it (``addmm_``), and ``dx = g W + (s g B) A`` likewise, through the mask when there is dropout.

Either way this path saves what the plain one saves (the LoRA input and ``x A^T``, plus the
mask with dropout) and no more. Under autocast it computes in autocast's dtype, as the plain
path does, by casting its inputs to it first; the gradients of A and B come back in their
own dtype (float32 master weights).
"""

import torch
from torch import nn
from torch.nn import functional as F

from lora.compute_dtype import compute_dtype
from lora.inject import lora_layers
from lora.layer import LoRALinear


class FusedLoRA(torch.autograd.Function):
    """``x W^T + b + s * B A dropout(x)`` with a hand-written backward; see the module docstring.

    Shapes: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or None, ``lora_A (r, in)``,
    ``lora_B (out, r)`` -> ``(..., out)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout: float):
        if weight.requires_grad:
            raise ValueError("the fused LoRA path keeps the base weight frozen; to train it, use the plain path: "
                             "use_fused_lora(model, False)")
        # Cast everything to the dtype the plain path computes in; the ops below then find their
        # inputs already in autocast's dtype, so autocast changes nothing inside.
        dtype = compute_dtype(x)
        x, weight, lora_A, lora_B = x.to(dtype), weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        x2d = x.reshape(-1, x.shape[-1])  # (tokens, in)
        x_lora, mask = torch.native_dropout(x2d, dropout, True) if dropout > 0 else (x2d, None)
        # The rank-r products are taken as (r, tokens) matrices and used transposed: BLAS runs a
        # product with r rows 2-3x faster than one with r columns, in float32 (benchmarks/README.md).
        xa = (lora_A @ x_lora.T).T  # (tokens, r)
        through_merged_weight = dropout == 0 and dtype == torch.float32
        if through_merged_weight:  # one matmul through W' = W + s B A, formed for this call and dropped
            out = F.linear(x2d, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)
        else:  # x W^T + b, then s (x A^T) B^T added in place by the kernel that multiplies it
            out = F.linear(x2d, weight, bias).addmm_(xa, lora_B.T, alpha=scaling)
        ctx.save_for_backward(x_lora, xa, mask, weight, lora_A, lora_B)
        ctx.scaling, ctx.dropout, ctx.through_merged_weight = scaling, dropout, through_merged_weight
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_lora, xa, mask, weight, lora_A, lora_B = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout
        needs_x, _, needs_bias, needs_A, needs_B = ctx.needs_input_grad[:5]  # the inputs of forward, in order
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(xa.dtype)  # (tokens, out)
        gb = (lora_B.T @ g.T).T.mul_(s)  # s g B, (tokens, r): scaled once here, so no (r, in) or (out, r) pass later
        grad_x = grad_bias = grad_A = grad_B = None
        if needs_x:
            if ctx.through_merged_weight:
                grad_x = g @ torch.addmm(weight, lora_B, lora_A, alpha=s)
            elif p > 0:  # the LoRA branch's input gradient goes back through dropout: the mask, and 1 / (1 - p)
                grad_x = (g @ weight).addcmul_(gb @ lora_A, mask, value=1.0 / (1.0 - p))
            else:
                grad_x = (g @ weight).addmm_(gb, lora_A)
            grad_x = grad_x.view(*grad_out.shape[:-1], weight.shape[1])
        if needs_A:
            grad_A = gb.T @ x_lora  # (r, in)
        if needs_B:
            grad_B = ((xa.T * s) @ g).T  # (out, r)
        if needs_bias:  # a trainable bias (peft's bias="lora_only" style): its gradient is free
            grad_bias = g.sum(dim=0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


def fused_lora(x, weight, bias, lora_A, lora_B, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropout(x), lora_A), lora_B)``, fused.

    Shapes: ``(..., in) -> (..., out)``. ``dropout`` is the probability, applied (training) as given.
    """
    return FusedLoRA.apply(x, weight, bias, lora_A, lora_B, scaling, dropout)


class FusedLoRALinear(LoRALinear):
    """A ``LoRALinear`` whose forward takes the fused path while gradients are enabled; the plain one otherwise.

    The same parameters, names and state-dict keys as ``LoRALinear``: only ``forward`` differs.
    ``use_fused_lora(model, True)`` turns a model's plain LoRA layers into this class in place,
    and ``False`` turns them back.
    """

    def use_fused(self) -> bool:
        """Whether ``forward`` takes the fused path now: while gradients are enabled and the layer is not merged or off.

        Without gradients (inference, generation) the plain path is faster: in float32 the fused
        one would form the merged weight, ``in * out * r`` FLOPs, for every call, even for one token.
        """
        check_fusable(self)  # again: the base may have been quantized since the layer was put on this path
        return torch.is_grad_enabled() and not (self.merged or self.disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + (alpha / r) * B(A(dropout(x)))`` through ``fused_lora``, ``(..., in) -> (..., out)``."""
        if not self.use_fused():
            return super().forward(x)
        return fused_lora(x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                          self.scaling, self.dropout if self.training else 0.0)


def is_plain_lora(layer: LoRALinear) -> bool:
    """Whether ``layer`` is plain LoRA on either path, not a variant (``DoRALinear``): what the fused path takes."""
    return type(layer) in (LoRALinear, FusedLoRALinear)


def check_fusable(layer: LoRALinear) -> None:
    """Raise ``ValueError`` unless the fused path can take ``layer``: plain LoRA (not DoRA) on an ``nn.Linear``.

    A 4-bit base is refused because the fused backward would keep a dequantized W, undoing the 4 bits.
    """
    if not isinstance(layer.base_layer, nn.Linear):
        raise ValueError("the fused LoRA path needs an nn.Linear base; a 4-bit base (NF4Linear) takes the "
                         "plain path: use_fused_lora(model, False)")
    if not is_plain_lora(layer):
        raise ValueError(f"the fused LoRA path is plain LoRA's; a {type(layer).__name__} takes the plain path: "
                         "use_fused_lora(model, False)")


def use_fused_lora(model: nn.Module, fused: bool) -> int:
    """Put every ``LoRALinear`` in ``model`` on the fused path (True) or back on the plain one (False).

    The plain path, ``LoRALinear.forward``'s one line, is the default. The fused one is the same
    math with a hand-written backward and fewer passes over the activations, equal to the plain
    one up to float rounding; a layer takes it only while gradients are enabled (without them
    the plain one is faster) and refuses a trained base weight (its backward gives W no gradient).
    Each layer changes class in place (``FusedLoRALinear`` and back), as ``fully_shard`` changes
    a module's class: its parameters, and an optimizer holding them, stay as they are.

    Returns:
        How many layers were set.

    Raises:
        TypeError: ``fused`` is not True or False.
        ValueError: ``fused`` is True and a layer cannot take the fused path (``check_fusable``:
            a 4-bit ``NF4Linear`` base, or a DoRA layer); no layer is changed.
    """
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be True or False, got {fused!r}")
    layers = list(lora_layers(model))
    for name, layer in layers if fused else []:
        try:
            check_fusable(layer)
        except ValueError as error:
            raise ValueError(f"{name}: {error}" if name else str(error)) from None
    for _, layer in layers:
        if is_plain_lora(layer):
            layer.__class__ = FusedLoRALinear if fused else LoRALinear
    return len(layers)
