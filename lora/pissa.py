"""PiSSA: start LoRA from the principal part of W instead of from zero.

PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation")
keeps LoRA's shapes and forward, and changes only where training starts. Take the SVD of the
frozen weight W (out x in)::

    W = U S Vᵀ          U: (out, k), S: (k,) descending, Vᵀ: (k, in), k = min(out, in)

Split it into the r largest singular values and the rest, give the first part to the adapter
and leave the rest, the residual, in the frozen base::

    A = sqrt(S_r / s) V_rᵀ                      (r, in)
    B = U_r sqrt(S_r / s)                       (out, r)
    W_res = W - s B A = U_[r:] S_[r:] V_[r:]ᵀ   (out, in)

where s is the layer's scaling, alpha / r (alpha / sqrt(r) with rsLoRA), so ``W_res x + s B A x
= W x``: the model computes what it computed before, but the part of W that training moves is
its principal part, the directions that matter most, rather than an update that starts at zero
in random directions. The paper reports faster convergence and better results than LoRA at the
same r, and a smaller 4-bit error when the residual, whose largest singular values are gone, is
what gets quantized (QPiSSA).

Why divide S by s before the square root: LoRA's forward multiplies B A by s, so s B A must
equal U_r S_r V_rᵀ. Why a square root on each side: the paper splits S so, and then A and B
start equally large (row i of A and column i of B both have length sqrt(S_i / s)). This is
peft's ``init_lora_weights="pissa"`` (``LoraLayer.pissa_init``): the same full SVD in float32
and the same operations in the same order, so A, B and W_res equal peft's bit for bit.

A trained PiSSA adapter (A', B') only makes sense on W_res. To share it for the ORIGINAL W,
peft's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` rewrites it as a
plain LoRA adapter of rank 2r (``LoraModel.subtract_mutated_init``)::

    ΔW = (W_res + s B' A') - W = s B' A' - s B0 A0 = s [B', -B0] [A'; A0]

with A = cat([A', A0]) (2r, in) and B = cat([B', -B0]) (out, 2r). r and alpha both double, so
the scaling alpha / r stays s (with rsLoRA, alpha / sqrt(r), alpha grows by sqrt(2) instead).
``pissa_to_lora`` and ``pissa_to_lora_config`` do the same to a state dict and a config.
"""

import torch
from torch import nn

from lora.dora import DoRALinear
from lora.inject import INITS, LoRAOptions
from lora.layer import LoRALinear
from lora.nf4 import NF4Linear


def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, residual)`` for PiSSA: ``scaling * B @ A`` is the rank-r principal part of ``weight``.

    Shapes: weight (out, in) -> A (r, in), B (out, r), residual (out, in), all float32 (the
    SVD is taken in float32 whatever the weight's dtype, as peft does).

    Raises:
        ValueError: ``r`` is larger than ``min(out, in)``, the number of singular values W has.
    """
    if r > min(weight.shape):
        raise ValueError(f"r={r} is larger than min(out, in)={min(weight.shape)} for a weight of shape "
                         f"{tuple(weight.shape)}: W has only that many singular values; choose a smaller r")
    weight = weight.float()
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # the full SVD, as peft's "pissa" (not "pissa_niter_")
    root = torch.diag(torch.sqrt(S[:r] / scaling))  # diag(sqrt(S_r / s)), (r, r): peft's operation, for bit equality
    A = root @ Vh[:r]
    B = U[:, :r] @ root
    residual = weight - scaling * B @ A
    return A, B, residual


def _check_pissa_ready(layer: LoRALinear) -> None:
    """Refuse a layer whose base weight is not the plain full-precision W that the SVD needs."""
    if isinstance(layer.base_layer, NF4Linear):
        raise ValueError(
            "PiSSA needs the base weight in full precision to take its SVD, but this layer's base is a 4-bit "
            "NF4Linear; initialize PiSSA before quantizing (inject_lora, then pissa_init_, then quantize_model: "
            "the residual is what gets quantized, QPiSSA)"
        )
    if layer.merged:
        raise ValueError("PiSSA takes the SVD of the base weight, but this layer is merged (W holds W + ΔW); "
                         "call layer.unmerge() first")


@torch.no_grad()
def pissa_init_(layer: LoRALinear) -> LoRALinear:
    """Set A and B to W's principal part and W to the residual, in place; return ``layer``.

    The layer's output is unchanged (up to the float32 rounding of the SVD): ``W_res x + s B A x
    = W x``. A and B are rounded to their own dtype and W_res to the base weight's, after W_res is
    computed from the float32 factors (as peft does). The bias, if any, is left as it is.

    Raises:
        ValueError: the base is a 4-bit ``NF4Linear`` (PiSSA first, then quantize), the layer is
            merged, or r is larger than ``min(out, in)``.
    """
    _check_pissa_ready(layer)
    weight = layer.base_layer.weight
    A, B, residual = pissa_factors(weight, layer.r, layer.scaling)
    layer.lora_A.weight.copy_(A)
    layer.lora_B.weight.copy_(B)
    weight.copy_(residual)
    # The base now holds W_res: an adapter saved from here says so, in peft's words (a layer without
    # the attribute started as the paper's, peft's init_lora_weights=True).
    layer.init_lora_weights = "pissa"
    return layer


def pissa_start(name: str, module: nn.Module, options: LoRAOptions):
    """``inject_lora``'s start for ``init="pissa"``: ``pissa_init_`` on the built layer (DoRA's m set after it).

    Raises:
        ValueError: the target is a 4-bit ``NF4Linear`` or has fewer than r singular values.
    """
    if isinstance(module, NF4Linear) or (isinstance(module, nn.Linear)
                                         and options.r > min(module.in_features, module.out_features)):
        raise ValueError(f"{name}: PiSSA takes the SVD of a full-precision weight with at least r={options.r} "
                         "singular values; inject before quantize_model, with r <= min(in, out)")

    def start(layer: LoRALinear) -> None:
        pissa_init_(layer)
        if isinstance(layer, DoRALinear):
            layer.reset_magnitude()  # m = ||W_res + s B A||, as peft sets it after PiSSA

    return start


INITS["pissa"] = pissa_start


def pissa_to_lora(initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trained PiSSA adapter as a rank-2r plain LoRA adapter for the ORIGINAL base weight.

    ``initial`` holds A0 and B0 as ``pissa_init_`` set them, ``trained`` the A' and B' after
    training, both under peft's keys (``base_model.model.<module>.lora_A.weight`` and
    ``.lora_B.weight``, see ``lora.adapter.adapter_key``). For each layer::

        lora_A = cat([A', A0], dim=0)    (2r, in)
        lora_B = cat([B', -B0], dim=1)   (out, 2r)

    so that ``s * lora_B @ lora_A = s B' A' - s B0 A0``, the change training made to W. This is
    peft's ``LoraModel.subtract_mutated_init``; pair it with ``pissa_to_lora_config``, which
    doubles r and alpha so that s stays the same.

    Raises:
        ValueError: the two dicts hold different keys, a key is neither a lora_A nor a lora_B
            weight, or a tensor's shape differs between them.
    """
    if initial.keys() != trained.keys():
        only_trained, only_initial = sorted(trained.keys() - initial.keys()), sorted(initial.keys() - trained.keys())
        key, side = (only_trained[0], "trained") if only_trained else (only_initial[0], "initial")
        raise ValueError(f"{key} is only in the {side} adapter; initial and trained must come from the same "
                         "PiSSA model (the initial one saved right after inject_lora(..., init='pissa'))")
    converted = {}
    for key, tensor in trained.items():
        if initial[key].shape != tensor.shape:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)} trained but {tuple(initial[key].shape)} "
                             "initially; both must have the same r")
        if key.endswith(".lora_A.weight"):
            converted[key] = torch.cat([tensor, initial[key]], dim=0)
        elif key.endswith(".lora_B.weight"):
            converted[key] = torch.cat([tensor, -initial[key]], dim=1)
        else:
            raise ValueError(f"{key} is neither a lora_A nor a lora_B weight; only plain LoRA adapters convert")
    return converted


def pissa_to_lora_config(config: dict) -> dict:
    """The ``adapter_config.json`` contents for ``pissa_to_lora``'s adapter: a new dict.

    As peft's ``save_pretrained`` with ``path_initial_model_for_weight_conversion`` writes it:
    r doubles; lora_alpha doubles (times 2**0.5 with rsLoRA), which keeps the scaling; any
    ``rank_pattern`` and ``alpha_pattern`` entries double; and ``init_lora_weights`` becomes
    True, a plain LoRA adapter that loading must not run PiSSA's SVD for again.

    Raises:
        ValueError: rsLoRA together with a rank_pattern or alpha_pattern, which peft refuses to convert.
    """
    rslora = bool(config.get("use_rslora"))
    if rslora and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ValueError("a PiSSA adapter with use_rslora and a rank_pattern or alpha_pattern cannot be converted "
                         "(peft refuses it too): the per-module scalings would not stay the same")
    converted = dict(config, r=2 * config["r"], init_lora_weights=True)
    converted["lora_alpha"] = config["lora_alpha"] * 2**0.5 if rslora else 2 * config["lora_alpha"]
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            converted[field] = {key: 2 * value for key, value in config[field].items()}
    return converted
