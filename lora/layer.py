"""The LoRA layer: a frozen ``nn.Linear`` plus a trainable low-rank update.

LoRA (Hu et al., 2021) freezes a pretrained weight W (out x in) and learns the
update as a product of two thin matrices::

    h = W x + b + (alpha / r) * B A x        A: (r, in), B: (out, r), r << min(in, out)

Only A and B are trained: r * (in + out) parameters instead of in * out.
"""

import math
import numbers
import warnings

import torch
from torch import nn

from lora.fused import fused_lora
from lora.nf4 import NF4Linear


def check_hyperparameters(r: int, alpha: float, dropout: float) -> None:
    """Raise ``ValueError`` naming the first LoRA hyperparameter that is out of range."""
    if not _is_number(r, numbers.Integral) or r <= 0:
        raise ValueError(f"r must be a positive integer (the rank of B @ A), got {r!r}")
    if not _is_number(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0 (scaling = alpha / r), got {alpha!r}")
    if not _is_number(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def _is_number(value, types) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with a low-rank update: ``base(x) + (alpha / r) * B(A(dropout(x)))``.

    Shapes: ``(..., in_features) -> (..., out_features)``.

    The frozen layer is held, not inherited from, as ``base_layer``: an ``nn.Linear``, or an
    ``NF4Linear`` (4-bit, ``lora/nf4.py``: QLoRA), whose A and B take the original weight's dtype.
    The update is
    ``lora_A = nn.Linear(in, r)`` and ``lora_B = nn.Linear(r, out)``, both without bias.
    These names make the state-dict keys the ones Hugging Face peft reads and writes.

    Args:
        base: the pretrained layer to adapt, ``nn.Linear`` or ``NF4Linear``. Its weight and bias are frozen here.
        r: the rank of the update. Memory and compute of the adapter grow linearly with it.
        alpha: the update is scaled by ``alpha / r``. Keeping alpha fixed while varying r
            "reduces the need to retune hyperparameters when we vary r" (LoRA paper, §4.1).
        dropout: dropout on the input of the low-rank path only; the base path sees x as is.

    Raises:
        TypeError: ``base`` is neither an ``nn.Linear`` nor an ``NF4Linear``.
        ValueError: r <= 0, alpha <= 0, or dropout outside [0, 1).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRALinear wraps an nn.Linear or an NF4Linear, got {type(base).__name__}")
        check_hyperparameters(r, alpha, dropout)
        self.base_layer = base.requires_grad_(False)
        # Plain Python numbers (not numpy's), so the adapter config can be written as JSON.
        self.r = int(r)
        self.alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
        self.dropout = float(dropout)
        self.scaling = self.alpha / self.r
        quantized = isinstance(base, NF4Linear)
        factory = {"device": base.codes.device if quantized else base.weight.device,
                   "dtype": base.dtype if quantized else base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, base.out_features, bias=False, **factory)
        # Identity rather than Dropout(0.0): the same module peft uses, and no wasted kernel.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        # Which forward: None chooses (the fused one while training, see use_fused), True the fused
        # one (lora/fused.py), False the plain one (peft's operations, op for op, bit for bit).
        self.fused: bool | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A random (kaiming-uniform, as ``nn.Linear`` does), B zero.

        B = 0 makes B @ A = 0, so training starts exactly at the pretrained model;
        A random (not zero too) so that the gradient of B, which is proportional to
        A x, is not zero and training can move away from that start.
        """
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.use_fused():
            # The same math with a hand-written backward and fewer passes over x (lora/fused.py).
            return fused_lora(x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight,
                              self.lora_B.weight, self.scaling, self.dropout if self.training else 0.0)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def use_fused(self) -> bool:
        """Whether ``forward`` takes the fused path: as forced by ``self.fused``, else when only A and B train.

        Without gradients (inference, generation) the plain path is faster: in float32 the fused
        one would form the merged weight, ``in * out * r`` FLOPs, for every call, even for one token.
        """
        if isinstance(self.base_layer, NF4Linear):
            if self.fused:
                raise ValueError("the fused LoRA path needs an nn.Linear base; a 4-bit base (NF4Linear) takes the "
                                 "plain path: set layer.fused = None")
            return False  # the fused path would keep a dequantized W for the backward, undoing the 4 bits
        if self.fused is not None:
            return self.fused
        training_lora = self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad
        return torch.is_grad_enabled() and training_lora and not self.base_layer.weight.requires_grad

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update ΔW = (alpha / r) * B @ A, shape (out_features, in_features), in the base's dtype.

        The product is taken in float32 even for a bf16 or fp16 base, so that merging
        rounds once (when adding to W) rather than twice.
        """
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
        base = self.base_layer
        return delta.to(base.dtype if isinstance(base, NF4Linear) else base.weight.dtype)  # 4-bit: its original dtype

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + ΔW, so the forward is one matmul. A no-op when already merged.

        Dropout is skipped while merged, so merge for inference, not for training.
        """
        if not self.merged:
            if isinstance(self.base_layer, NF4Linear):
                self.requantize(self.delta_weight())
            else:
                self.base_layer.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW, undoing ``merge``. A no-op when not merged.

        Exact up to float rounding: in bf16 or fp16, W + ΔW - ΔW can differ from W in the last bit.
        """
        if self.merged:
            if isinstance(self.base_layer, NF4Linear):
                self.requantize(-self.delta_weight())
            else:
                self.base_layer.weight.sub_(self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def requantize(self, delta: torch.Tensor) -> None:
        """A 4-bit base: W <- NF4(dequantize(W) + delta). Rounds, so it warns.

        The sum is rounded back to 4 bits, to keep the layer 4-bit: the merged layer then differs
        from base + LoRA by up to half a code step per weight, and unmerging rounds again instead
        of restoring the original codes. ``dequantize_model(model)`` first merges exactly, in full size.
        """
        warnings.warn("merging LoRA into a 4-bit base rounds W + ΔW to NF4 again, so outputs change by the "
                      "rounding; for an exact merge call lora.dequantize_model(model) first", stacklevel=3)
        base = self.base_layer
        base.store(base.dequantize(torch.float32) + delta.float())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
