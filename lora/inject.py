"""Putting LoRA into a model: wrap the targeted layers (``lora/targets.py`` finds them), freeze everything else."""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lora.layer import LinearBase, LoRALinear, LoRAModule, check_hyperparameters
from lora.targets import find_targets


@dataclass(frozen=True)
class LoRAOptions:
    """What ``inject_lora`` was asked for, as each variant's adapter and start (below) read it."""

    r: int
    alpha: float
    dropout: float = 0.0
    dtype: torch.dtype | None = None
    use_rslora: bool = False
    init: str = "lora"
    use_dora: bool = False


def plain_lora(name: str, module: nn.Module, options: LoRAOptions) -> Callable[[], nn.Module] | None:
    """The adapter of last resort: a ``LoRALinear`` on any ``LinearBase`` (``nn.Linear``, or a 4-bit ``NF4Linear``)."""
    if not isinstance(module, LinearBase):
        return None
    return lambda: LoRALinear(module, options.r, options.alpha, options.dropout, options.dtype, options.use_rslora)


# How a target becomes a LoRA module: ``adapter(name, module, options)`` returns a function that
# builds it, None when the module or the options are not the adapter's kind, or raises ValueError
# when they are but cannot work together. Variants that change the layer add theirs when imported
# (``import lora`` imports them all): lora/dora.py (use_dora) and lora/embedding.py (nn.Embedding).
ADAPTERS: list[Callable[[str, nn.Module, LoRAOptions], Callable[[], nn.Module] | None]] = []
# How A and B start, by ``init``: ``start(name, module, options)`` returns what to do to the built
# layer (None: nothing; "lora" is the paper's A random, B zero) or raises ValueError. lora/pissa.py adds "pissa".
INITS: dict[str, Callable[[str, nn.Module, LoRAOptions], Callable[[nn.Module], None] | None]] = {
    "lora": lambda name, module, options: None,
}


def adapter_for(name: str, module: nn.Module, options: LoRAOptions) -> Callable[[], nn.Module]:
    """The builder of the LoRA module for target ``name``: the first adapter's that takes it, plain LoRA's last."""
    return next(build for adapter in (*ADAPTERS, plain_lora) if (build := adapter(name, module, options)) is not None)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(name, layer)`` for every ``LoRALinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, LoRAModule]]:
    """Yield ``(name, module)`` for every LoRA module of ``model``: each ``LoRALinear`` and ``LoRAEmbedding``.

    Both hold ``base_layer``, ``merge``/``unmerge`` and ``disabled``; their A and B differ in shape and
    name (``lora_A.weight`` against ``lora_embedding_A``), so code that reads A and B uses ``lora_layers``.
    """
    for name, module in model.named_modules():
        if isinstance(module, LoRAModule):
            yield name, module


def inject_lora(model: nn.Module, target_modules: str | Sequence[str] = ("q_proj", "v_proj"), r: int = 8,
                alpha: float = 16, dropout: float = 0.0, adapter_dtype: torch.dtype | None = None,
                use_rslora: bool = False, init: str = "lora", use_dora: bool = False) -> list[str]:
    """Replace every targeted layer of ``model`` with a LoRA module, in place; freeze every other parameter.

    An ``nn.Linear`` (or 4-bit ``NF4Linear``) becomes a ``LoRALinear``; an ``nn.Embedding``
    (``embed_tokens``) a ``LoRAEmbedding`` (``lora/embedding.py``: A zero, B normal, as peft's).
    Only the adapter trains: every parameter that is not a LoRA A or B is frozen.

    Args:
        model: any ``nn.Module``, usually a transformers causal LM.
        target_modules: which layers to adapt, matched as peft does (``lora.targets.matches_target``).
            The default, the query and value projections, is the LoRA paper's choice (§7.1).
        r, alpha, dropout, use_rslora: passed to every ``LoRALinear`` (``use_rslora``: scale by
            alpha / sqrt(r) rather than alpha / r).
        adapter_dtype: the dtype of every A and B; None takes each base weight's. Training on a
            bf16 base passes float32: the small updates AdamW makes to A and B would round away
            in bf16, whose spacing just above 1 is 2^-7 (torch.finfo(torch.bfloat16).eps).
        init: "lora" (A random, B zero) or "pissa": A and B from the top-r singular vectors of
            each W, the rest of W left frozen (``lora/pissa.py``; the model's output is unchanged).
        use_dora: a ``DoRALinear`` (``lora/dora.py``) in place of each ``LoRALinear``: a trained
            magnitude per output beside the low-rank direction (DoRA). rsLoRA, DoRA and PiSSA
            are for Linear layers: an embedding target refuses them.

    Returns:
        The full names of the replaced modules, in model order.

    Raises:
        ValueError: nothing matches (the message lists the Linear names the model has), a match
            already holds LoRA, a hyperparameter is out of range, or a variant refuses a target.
        TypeError: a match is neither Linear nor Embedding (GPT-2's ``Conv1D``, say).
    """
    check_hyperparameters(r, alpha, dropout)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    options = LoRAOptions(r, alpha, dropout, adapter_dtype, use_rslora, init, use_dora)
    targets = find_targets(model, target_modules)
    plans = []  # every target's adapter and start, all asked before any module changes: a refusal changes nothing
    for name in targets:
        module = model.get_submodule(name)
        plans.append((name, adapter_for(name, module, options), INITS[init](name, module, options)))
    for name, build, start in plans:
        layer = build()
        if start is not None:
            start(layer)
        model.set_submodule(name, layer, strict=True)
    mark_only_lora_trainable(model)
    return targets


def mark_only_lora_trainable(model: nn.Module) -> None:
    """``requires_grad`` True on every LoRA layer's own parameters (A and B; DoRA's magnitude too), False on
    every other parameter."""
    model.requires_grad_(False)
    for _, layer in adapted_modules(model):
        for name, parameter in layer.named_parameters():
            if not name.startswith("base_layer."):  # a 4-bit base holds uint8 codes, which cannot require grad
                parameter.requires_grad_(True)


@contextmanager
def disable_lora(model: nn.Module):
    """Within this block ``model`` computes as its base model; LoRA is back on exit, even after an error.

    Merged layers are unmerged for the block and merged again afterwards.
    """
    layers = [layer for _, layer in adapted_modules(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()
