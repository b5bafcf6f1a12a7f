"""The LoRA layer: a frozen ``nn.Linear`` plus a trainable low-rank update.

LoRA (Hu et al., 2021) freezes a pretrained weight W (out x in) and learns the
update as a product of two thin matrices::

    h = W x + b + (alpha / r) * B A x        A: (r, in), B: (out, r), r << min(in, out)

Only A and B are trained: r * (in + out) parameters instead of in * out.
"""

import math
import numbers
from typing import Protocol, runtime_checkable

import torch
from torch import nn


def check_hyperparameters(r: int, alpha: float, dropout: float) -> None:
    """Raise ``ValueError`` naming the first LoRA hyperparameter that is out of range.

    The one owner of what is valid: ``LoRALinear``, ``inject_lora``, adapter configs and the
    training config all call it. Each message starts with the parameter's name (``r must be ...``),
    so a command line can put ``--`` in front of it.
    """
    if not _is_number(r, numbers.Integral) or r <= 0:
        raise ValueError(f"r must be a positive integer (the rank of B @ A), got {r!r}")
    if not _is_number(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0 (scaling = alpha / r), got {alpha!r}")
    if not _is_number(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def _is_number(value, types) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B @ A: ``alpha / r`` (the LoRA paper), or ``alpha / sqrt(r)`` (rsLoRA), as peft computes it."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@runtime_checkable
class LinearBase(Protocol):
    """What ``LoRALinear`` asks of the frozen layer it wraps; ``nn.Linear`` answers it, as does ``NF4Linear``.

    Calling the layer computes ``x W^T + b``; ``weight`` is W, ``(out_features, in_features)``,
    whose ``dtype`` and ``device`` A and B take and to which ``merge`` adds ΔW (``weight.add_``).
    The 4-bit ``NF4Linear`` (``lora/nf4.py``: QLoRA) gives a weight that answers these as a tensor does.
    """

    in_features: int
    out_features: int
    weight: torch.Tensor


class LoRAModule(nn.Module):
    """Any LoRA module: a frozen ``base_layer``, an update ``merge()`` folds into it and ``unmerge()``
    takes out, and the flags ``merged`` and ``disabled``. ``LoRALinear`` and ``LoRAEmbedding``
    (``lora/embedding.py``) are its kinds; code that handles either selects by this type."""


class LoRALinear(LoRAModule):
    """A frozen ``nn.Linear`` with a low-rank update: ``base(x) + (alpha / r) * B(A(dropout(x)))``.

    Shapes: ``(..., in_features) -> (..., out_features)``.

    The frozen layer is held, not inherited from, as ``base_layer``: an ``nn.Linear``, or any
    ``LinearBase`` (the 4-bit ``NF4Linear``: QLoRA). A and B take the base weight's dtype, or
    ``dtype`` when given: float32 adapters on a bf16 base train as peft's do by default
    (``autocast_adapter_dtype``), with autocast running each matmul in bf16. The update is
    ``lora_A = nn.Linear(in, r)`` and ``lora_B = nn.Linear(r, out)``, both without bias.
    These names make the state-dict keys the ones Hugging Face peft reads and writes.

    ``forward`` is the formula above, one line: peft's operations in peft's order, equal to peft
    bit for bit. Variants build on it in files of their own: ``DoRALinear`` (``lora/dora.py``)
    and the same math with a hand-written backward, ``use_fused_lora`` (``lora/fused.py``).

    Args:
        base: the pretrained layer to adapt, an ``nn.Linear`` or ``NF4Linear``; its weight and bias are frozen here.
        r: the rank of the update. Memory and compute of the adapter grow linearly with it.
        alpha: the update is scaled by ``alpha / r``. The LoRA paper holds alpha fixed while r
            varies: "This scaling helps to reduce the need to retune hyperparameters when we
            vary r" (§4.1). (``alpha = 2 * r`` for every r instead fixes the scaling at 2.)
        dropout: dropout on the input of the low-rank path only; the base path sees x as is.
        dtype: the dtype of A and B; None (the default) takes the base weight's.
        use_rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilized LoRA, Kalajdzievski,
            2023; peft's ``use_rslora``). With ``alpha / r`` the update of a larger r starts
            smaller and learns more slowly; ``alpha / sqrt(r)`` keeps its size steady as r
            grows (§3 of that paper), so a larger r can use what it adds.

    Raises:
        TypeError: ``base`` is not a ``LinearBase`` (an ``nn.Linear`` or an ``NF4Linear``).
        ValueError: r <= 0, alpha <= 0, or dropout outside [0, 1).
    """

    def __init__(self, base: LinearBase, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, LinearBase):
            raise TypeError(f"LoRALinear wraps an nn.Linear or an NF4Linear, got {type(base).__name__}")
        check_hyperparameters(r, alpha, dropout)
        self.base_layer = base.requires_grad_(False)
        # Plain Python numbers (not numpy's), so the adapter config can be written as JSON.
        self.r = int(r)
        self.alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.alpha, self.r, self.use_rslora)
        weight = base.weight
        dtype = dtype or weight.dtype
        self.lora_A = nn.Linear(base.in_features, self.r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, base.out_features, bias=False, device=weight.device, dtype=dtype)
        # Identity rather than Dropout(0.0): the same module peft uses, and no wasted kernel.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
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
        """``base(x) + (alpha / r) * B(A(dropout(x)))``, ``(..., in_features) -> (..., out_features)``."""
        if self.merged or self.disabled:
            return self.base_layer(x)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update ΔW = (alpha / r) * B @ A, shape (out_features, in_features), in the base weight's dtype.

        The product is taken in float32 even for a bf16 or fp16 base, so that merging
        rounds once (when adding to W) rather than twice. A 4-bit base: its original dtype.
        """
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + ΔW, so the forward is one matmul. A no-op when already merged.

        Dropout is skipped while merged, so merge for inference, not for training. A 4-bit base
        rounds W + ΔW back to NF4 and warns (``NF4Linear.add_``); ``dequantize_model(model)``
        first merges exactly, in full size.
        """
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW, undoing ``merge``. A no-op when not merged.

        Exact up to float rounding: in bf16 or fp16, W + ΔW - ΔW can differ from W in the last bit;
        a 4-bit base rounds to NF4 again rather than restoring its original codes.
        """
        if self.merged:
            self.base_layer.weight.add_(-self.delta_weight())  # -ΔW is exact: W + (-ΔW) is W - ΔW to the bit
            self.merged = False

    def extra_repr(self) -> str:
        rslora = ", use_rslora=True" if self.use_rslora else ""
        return f"r={self.r}, alpha={self.alpha}{rslora}, scaling={self.scaling:g}, merged={self.merged}"
