"""DoRA: LoRA on the direction of W, with the length of each row learned on its own.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits the frozen weight
W (out x in) into a magnitude and a direction, ``W = m * W / ||W||_c``, and adapts the two
apart: LoRA's low-rank update moves the direction, a trainable vector m rescales it::

    W' = m * (W + s B A) / ||W + s B A||_c       m: (out,), A: (r, in), B: (out, r), s = alpha / r

``||.||_c`` is the paper's "column-wise" norm. The paper writes W as (in, out), so a column is
everything that feeds one output; in PyTorch's (out, in) weight that is a row: one L2 norm per
output feature, ``torch.linalg.norm(W, dim=1)``, shape (out,), as peft computes it. m starts at
``||W||_c`` and B at zero, so ``W' = W`` and training starts at the pretrained model. Why split:
the paper measures (§3) that in full fine-tuning the changes of magnitude and of direction are
negatively correlated, while LoRA's rise together; with its own m, DoRA learns more as full
fine-tuning does, for r * (in + out) + out parameters, m being the ``+ out``.

The norm is treated as a constant for autograd (§4.3): "we suggest treating ||V + ∆V||_c in
Eq. (5) as a constant, thereby detaching it from the gradient graph", which saves the memory of
its backward at little cost in accuracy. Its value still follows A and B at every step.

The forward is written as peft (0.21.2) writes it, so that logits and gradients equal peft's bit
for bit. With ``scale = m / ||W + s B A||_c`` (detached), the paper's ``W' x + b`` is::

    base(x) + (scale - 1) * W x + scale * s * B A x     = scale * (W x + s B A x) + b

which reuses the base layer's matmul ``W x + b`` (subtracting b) instead of multiplying by W'.
Dropout, as peft does it: with dropout > 0, in training, the DoRA terms see ``dropout(x)``, so
``W dropout(x)`` is computed anew (one more matmul) and the output is
``base(x) + (scale - 1) * W dropout(x) + scale * s * B A dropout(x)``: the base's own term keeps
x undropped. With dropout 0, or in eval mode, it is the formula above exactly.

On disk the magnitude is peft's ``base_model.model.<module path>.lora_magnitude_vector``, with
no ``.weight`` after it: peft keeps m as ``lora_magnitude_vector["default"].weight`` in its
model but renames the key when it saves (``LoraModel._get_adapter_state_dict``) and back when it
loads. Here m is a plain ``nn.Parameter`` named ``lora_magnitude_vector`` on the layer, so this
model's own state-dict key, ``<module path>.lora_magnitude_vector``, is already peft's file key
without its prefix: no renaming either way.
"""

import torch
from torch import nn

from lora.inject import ADAPTERS, LoRAOptions
from lora.layer import LinearBase, LoRALinear
from lora.nf4 import NF4Linear

MAGNITUDE = "lora_magnitude_vector"  # the parameter's name here, and the last part of peft's file key


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The paper's ``||weight||_c``: the L2 norm of each output row of an (out, in) weight, shape (out,)."""
    return torch.linalg.norm(weight, dim=1)


def dora_weight(weight: torch.Tensor, lora_delta: torch.Tensor, magnitude: torch.Tensor,
                norm: torch.Tensor) -> torch.Tensor:
    """``W' = m / norm * (W + ΔW)``: each row of ``W + ΔW`` rescaled to length m.

    Shapes: weight and lora_delta (out, in), magnitude and norm (out,) -> (out, in).

    ``norm`` (``||W + ΔW||_c``) is passed in, not computed here, so that ``merge`` can keep the
    norm it used: ``unmerge`` divides by it, and cannot compute it again from W'.
    """
    return (magnitude / norm).view(-1, 1) * (weight + lora_delta)


def magnitude_key(module_name: str) -> str:
    """The state-dict key of m for the DoRA layer at ``module_name``: ``<module_name>.lora_magnitude_vector``.

    peft's file key is this with its prefix in front, ``base_model.model.`` (``lora.adapter.KEY_PREFIX``),
    and no ``.weight`` at the end (A and B's keys end in ``.weight``; m's does not).
    """
    return f"{module_name}.{MAGNITUDE}"


class DoRALinear(LoRALinear):
    """A frozen ``nn.Linear`` with DoRA: ``m / ||W + s B A||_c * (W x + s B A x) + b``.

    Shapes: ``(..., in_features) -> (..., out_features)``.

    A ``LoRALinear`` (so ``lora_layers``, ``disable_lora`` and the adapter code find it) with one
    more trainable parameter, ``lora_magnitude_vector`` (m, shape (out,), in the dtype of A and
    B). Everything else (A, B, their initialisation, dropout, scaling, the ``merged`` and
    ``disabled`` flags) is LoRA's. Only the plain path: the fused backward (``lora/fused.py``)
    is plain LoRA's, and ``use_fused_lora`` refuses a DoRA layer.

    Args:
        base: the pretrained ``nn.Linear`` to adapt; frozen here.
        r, alpha, dropout, dtype, use_rslora: as ``LoRALinear``.

    Raises:
        NotImplementedError: ``base`` is a 4-bit ``NF4Linear``.
        TypeError, ValueError: as ``LoRALinear``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None, use_rslora: bool = False):
        if isinstance(base, NF4Linear):
            # DoRA needs W itself on every forward (its row norms); QDoRA would dequantize it each time.
            raise NotImplementedError(
                "DoRA on a 4-bit base (NF4Linear) is not implemented: its norm needs the full weight on every "
                "forward; dequantize first (lora.dequantize_model(model)) or use plain LoRA on the 4-bit model"
            )
        super().__init__(base, r, alpha, dropout=dropout, dtype=dtype, use_rslora=use_rslora)
        self._merge_norm = None  # ||W + ΔW||_c as merge took it, for unmerge; not saved (merging is undone first)

    def reset_parameters(self) -> None:
        """A random, B zero (``LoRALinear.reset_parameters``), then m = ``||W + s B A||_c``, which is ``||W||_c``.

        With m equal to the norm the forward divides it by, ``scale`` is exactly 1 and B A is 0,
        so the layer starts out computing exactly what its base computes.
        (``LoRALinear.__init__`` calls this, so it is also where m is created.)
        """
        super().reset_parameters()
        self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m <- ``||W + s B A||_c`` (a new Parameter): scale is 1, the output plain LoRA's, ``W x + s B A x + b``.

        For an initialisation that changes W, A or B after construction (PiSSA), as peft sets m
        after initialising A and B; then the start is again exactly what W and A, B compute.
        """
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    def lora_weight(self) -> torch.Tensor:
        """B A, shape (out, in), without the scaling, formed as peft forms it: ``B(A(I))ᵀ``.

        Through the layers' own forwards rather than ``B.weight @ A.weight`` (peft: so that FSDP
        hooks see it): peft's operations, so the norm equals peft's to the bit on any backend.
        """
        A = self.lora_A.weight
        identity = torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
        return self.lora_B(self.lora_A(identity)).T

    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||_c``, shape (out,), from the current A and B; ``forward`` detaches it.

        Taken in the dtype of A and B, as peft does: float32 adapters on a bf16 base (under autocast,
        which forms B A in bf16) give a float32 norm of the float32 sum.
        """
        dtype = self.lora_A.weight.dtype
        return column_norm(self.base_layer.weight.to(dtype) + self.scaling * self.lora_weight().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s B A||_c * (W x + s B A x) + b`` as ``base(x) + (scale - 1) W x + scale s B A x``.

        Shapes: ``(..., in_features) -> (..., out_features)``. See the module's docstring for
        why this form and for what dropout does.
        """
        if self.merged or self.disabled:
            return self.base_layer(x)
        result = self.base_layer(x)  # W x + b
        x = x.to(self.lora_A.weight.dtype)  # peft's cast: float32 adapters take x in float32
        if self.training and self.dropout > 0:
            x = self.lora_dropout(x)  # peft: the DoRA terms see dropout(x), so W dropout(x) is computed anew
            base_product = nn.functional.linear(x, self.base_layer.weight.to(x.dtype))
        else:
            bias = self.base_layer.bias  # reuse the base's matmul: W x = (W x + b) - b
            base_product = result if bias is None else result - bias
        # DoRA §4.3: the norm is a constant for autograd; only its value follows A and B.
        scale = self.lora_magnitude_vector / self.weight_norm().detach()
        dora = (scale - 1) * base_product + scale * self.lora_B(self.lora_A(x)) * self.scaling
        return (result + dora).to(result.dtype)  # m and the norm may be float32 over a bf16 base: back to its dtype

    @torch.no_grad()
    def lora_delta_weight(self) -> torch.Tensor:
        """LoRA's update ``s B A``, shape (out, in), in the dtype of A and B (peft's ``get_delta_weight``).

        Taken in float32, as ``LoRALinear.delta_weight``, but not rounded to a bf16 base's dtype:
        ``W + s B A`` and its norm are float32 sums, as in peft's merge, and only W' is rounded.
        """
        A, B = self.lora_A.weight, self.lora_B.weight
        return (B.float() @ A.float() * self.scaling).to(A.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W' = m * (W + s B A) / ||W + s B A||_c``, shape (out, in), in the base weight's dtype.

        As peft's merge computes it: ``s B A`` as ``B @ A * s`` (``lora_delta_weight``), and the
        norm from that, not from the forward's ``B(A(I))ᵀ``, so W' equals peft's merged weight
        and the merged forward equals the unmerged one up to float rounding, not to the bit.
        """
        return self._merged_weight_and_norm()[0]

    def _merged_weight_and_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.merged:  # W already is W': m * (W' + s B A) / ||.|| would be neither W' nor anything else
            raise RuntimeError("this DoRA layer is merged, so its weight already is W'; unmerge() it first")
        weight, delta = self.base_layer.weight, self.lora_delta_weight()
        norm = column_norm(weight + delta)
        return dora_weight(weight, delta, self.lora_magnitude_vector, norm).to(weight.dtype), norm

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The whole change merging makes to W, ``W' - W``, shape (out, in): W plus it is W' up to rounding.

        Not LoRA's ``s B A`` (that is ``lora_delta_weight``): DoRA also rescales each row of W.
        Unlike LoRA's, it depends on W, so it is refused while merged (``RuntimeError``).
        """
        return self.merged_weight() - self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W' = m * (W + s B A) / ||W + s B A||_c, so the forward is one matmul. A no-op when already merged.

        The norm is kept for ``unmerge``: from W' alone it cannot be computed again.
        """
        if not self.merged:
            merged, self._merge_norm = self._merged_weight_and_norm()
            self.base_layer.weight.copy_(merged)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W' * ||W + s B A||_c / m - s B A, undoing ``merge`` (as peft does). A no-op when not merged.

        Exact up to float rounding (a division and a subtraction), not to the bit. A and B and m
        must not change while merged (they do not: a merged layer's forward does not use them).
        """
        if self.merged:
            factor = (self.lora_magnitude_vector / self._merge_norm).view(-1, 1)
            weight = self.base_layer.weight
            weight.copy_((weight / factor - self.lora_delta_weight()).to(weight.dtype))
            self._merge_norm = None
            self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def dora_adapter(name: str, module: nn.Module, options: LoRAOptions):
    """``inject_lora``'s adapter for ``use_dora=True``: a ``DoRALinear`` on a full-precision ``nn.Linear``.

    Raises:
        ValueError: the target is a 4-bit ``NF4Linear``: DoRA's row norms need the full weight
            on every forward (QDoRA is not supported).
    """
    if not options.use_dora or not isinstance(module, LinearBase):
        return None
    if isinstance(module, NF4Linear):
        raise ValueError("DoRA needs the base weight in full precision for its row norms on every forward; a 4-bit "
                         "base (QDoRA) is not supported: use_dora=False, or inject before quantize_model")
    return lambda: DoRALinear(module, options.r, options.alpha, options.dropout, options.dtype, options.use_rslora)


ADAPTERS.append(dora_adapter)
