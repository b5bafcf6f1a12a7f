"""Putting LoRA into a model: find layers by name, wrap them, freeze everything else.

Module names are paths through the model, as ``model.named_modules()`` lists them. In the
Llama and Qwen2 families the attention projections of layer N are called
``model.layers.N.self_attn.q_proj`` (and ``k_proj``, ``v_proj``, ``o_proj``).
"""

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from torch import nn

from lora.dora import DoRALinear
from lora.embedding import LoRAEmbedding
from lora.layer import LoRALinear, check_hyperparameters
from lora.nf4 import NF4Linear
from lora.pissa import pissa_init_

# How inject_lora starts A and B: "lora", the paper's (A random, B zero), or "pissa" (lora/pissa.py).
INITS = ("lora", "pissa")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(name, layer)`` for every ``LoRALinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAEmbedding]]:
    """Yield ``(name, module)`` for every LoRA module of ``model``: each ``LoRALinear`` and ``LoRAEmbedding``.

    Both hold ``base_layer``, ``merge``/``unmerge`` and ``disabled``; their A and B differ in shape and
    name (``lora_A.weight`` against ``lora_embedding_A``), so code that reads A and B uses ``lora_layers``.
    """
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            yield name, module


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for the submodules a target name is matched against.

    That is every named submodule except the insides of LoRA modules (their ``base_layer``,
    ``lora_A`` and ``lora_B``), which are parts of an adapted layer, not targets themselves.
    """
    inside = None  # the name prefix of the LoRA layer being skipped; named_modules is pre-order
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            inside = name + "."
        yield name, module


def find_linear_modules(model: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``model`` that LoRA could target.

    Layers already wrapped by LoRA are listed under their own name, not as ``....base_layer``.
    """
    return [name for name, module in candidate_modules(model)
            if isinstance(module, (nn.Linear, NF4Linear, LoRALinear))]


def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """peft's matching rule for ``target_modules``.

    A string is a regular expression that must match the whole module name; a list or
    tuple matches a name equal to an entry or ending in ``"." + entry``.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def short_names(names: Sequence[str]) -> list[str]:
    """The distinct last components of ``names``, in order of first appearance."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Full names of the modules ``inject_lora`` would replace, in model order; raises as it does."""
    if isinstance(target_modules, str):
        re.compile(target_modules)  # a bad pattern fails here, with re's own message
    targets = []
    for name, module in candidate_modules(model):
        if not matches_target(name, target_modules):
            continue
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            raise ValueError(f"{name} already has LoRA; inject once, or merge_and_unload(model) first")
        if not isinstance(module, (nn.Linear, NF4Linear, nn.Embedding)):
            raise TypeError(
                f"{name} matches {target_modules!r} but is a {type(module).__name__}, not an nn.Linear or "
                "nn.Embedding; LoRA here wraps those (and the 4-bit NF4Linear) only: choose Linear targets "
                "(see find_linear_modules(model)) or an embedding"
            )
        targets.append(name)
    if not targets:
        available = ", ".join(short_names(find_linear_modules(model))) or "(none)"
        raise ValueError(f"no module matches {target_modules!r}; Linear modules here end in: {available}")
    return targets


def inject_lora(
    model: nn.Module,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    adapter_dtype: torch.dtype | None = None,
    use_rslora: bool = False,
    init: str = "lora",
    use_dora: bool = False,
) -> list[str]:
    """Replace every targeted ``nn.Linear`` (or 4-bit ``NF4Linear``) of ``model`` with a ``LoRALinear``, in place.

    Then freeze every parameter that is not a LoRA A or B, so only the adapter trains.

    Args:
        model: any ``nn.Module``, usually a transformers causal LM.
        target_modules: which layers to adapt, matched as peft does (see ``matches_target``).
            The default, the query and value projections, is the LoRA paper's choice (§7.1).
        r, alpha, dropout, use_rslora: passed to every ``LoRALinear`` (``use_rslora``: scale by
            alpha / sqrt(r) rather than alpha / r).
        init: "lora" (A random, B zero) or "pissa": A and B from the top-r singular vectors of
            each W, the rest of W left frozen (``lora/pissa.py``; the model's output is unchanged).
        use_dora: a ``DoRALinear`` (``lora/dora.py``) in place of each ``LoRALinear``: a trained
            magnitude per output beside the low-rank direction (DoRA).

    A target that is an ``nn.Embedding`` (``embed_tokens``) gets a ``LoRAEmbedding``
    (``lora/embedding.py``: A zero, B normal, no dropout, as peft's); rsLoRA, DoRA and PiSSA are
    for Linear layers and refuse it.
        adapter_dtype: the dtype of every A and B; None takes each base weight's. Training on a
            bf16 base passes float32: the small updates AdamW makes to A and B would round away
            in bf16, whose spacing just above 1 is 2^-7 (torch.finfo(torch.bfloat16).eps).

    Returns:
        The full names of the replaced modules, in model order.

    Raises:
        ValueError: nothing matches (the message lists the Linear names the model has),
            a match already holds LoRA, or a hyperparameter is out of range.
        TypeError: a match is not an ``nn.Linear`` (GPT-2's ``Conv1D``, say): only Linear
            layers are supported.
    """
    check_hyperparameters(r, alpha, dropout)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    targets = find_targets(model, target_modules)
    if init == "pissa":
        for name in targets:
            module = model.get_submodule(name)
            if isinstance(module, NF4Linear) or (isinstance(module, nn.Linear)
                                                 and r > min(module.in_features, module.out_features)):
                raise ValueError(f"{name}: PiSSA takes the SVD of a full-precision weight with at least r={r} "
                                 "singular values; inject before quantize_model, with r <= min(in, out)")
    embeddings = [name for name in targets if isinstance(model.get_submodule(name), nn.Embedding)]
    if embeddings and (use_dora or use_rslora or init != "lora"):
        raise ValueError(f"{embeddings[0]} is an embedding, which this library adapts with plain LoRA only; "
                         "leave it out of the targets, or drop use_dora, use_rslora and init='pissa'")
    if use_dora and any(isinstance(model.get_submodule(name), NF4Linear) for name in targets):
        raise ValueError("DoRA needs the base weight in full precision for its row norms on every forward; a 4-bit "
                         "base (QDoRA) is not supported: use_dora=False, or inject before quantize_model")
    layer_class = DoRALinear if use_dora else LoRALinear
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            layer = LoRAEmbedding(module, r=r, alpha=alpha, dtype=adapter_dtype)
        else:
            layer = layer_class(module, r=r, alpha=alpha, dropout=dropout, dtype=adapter_dtype, use_rslora=use_rslora)
        model.set_submodule(name, layer, strict=True)
    if init == "pissa":  # checked above, before anything changed: full-precision bases, r within the shapes
        for name in targets:
            layer = model.get_submodule(name)
            pissa_init_(layer)
            if use_dora:
                layer.reset_magnitude()  # m = ||W_res + s B A||, as peft sets it after PiSSA
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


def use_fused_lora(model: nn.Module, fused: bool) -> int:
    """Put every ``LoRALinear`` in ``model`` on the fused path (True) or back on the plain one (False).

    The plain path, ``LoRALinear.forward``'s one line, is the default. The fused one
    (``lora/fused.py``) is the same math with a hand-written backward and fewer passes over the
    activations, equal to the plain one up to float rounding; a layer takes it only while
    gradients are enabled (without them the plain one is faster) and refuses it for a trained
    base weight (its backward gives W no gradient).

    Returns:
        How many layers were set.

    Raises:
        TypeError: ``fused`` is not True or False.
        ValueError: ``fused`` is True and a layer's base is a 4-bit ``NF4Linear``, which only the
            plain path takes; no layer is changed.
    """
    layers = list(lora_layers(model))
    before = [layer.fused for _, layer in layers]
    for index, (name, layer) in enumerate(layers):
        try:
            layer.fused = fused  # LoRALinear.fused refuses a base the fused path cannot take
        except ValueError as error:
            for (_, earlier), value in zip(layers[:index], before):  # all layers or none
                earlier.fused = value
            raise ValueError(f"{name}: {error}") from None
    return len(layers)


def parse_targets(text: str) -> list[str]:
    """A comma-separated list of module names as a list: ``"q_proj, v_proj"`` -> ``["q_proj", "v_proj"]``.

    Spaces around names and empty entries are dropped. The one place the command lines split ``--targets``.
    """
    return [name.strip() for name in text.split(",") if name.strip()]
