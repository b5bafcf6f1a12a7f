"""Named adapters: several LoRA adapters on one frozen base, one of them active at a time.

An adapter is small beside its base (SmolLM2's q_proj and v_proj at r = 8: 0.46 M numbers
against 135 M), so one base model can hold many, one per task or per user, and change which
one it computes with in no time. That is how LoRA is served at scale: the base is loaded once,
the adapters are swapped or mixed in a batch (``lora/mixed.py``).

Here an adapter is what ``inject_lora`` makes: a LoRA layer (``LoRALinear``, ``DoRALinear`` or
``LoRAEmbedding``) per adapted module, ``{module path: layer}``. Every adapter's layer at a path
wraps the same frozen base module, so the base is held once, whatever the number of adapters.
The model's module tree holds the ACTIVE adapter's layers, so everything that works on a model
with one adapter (forward, training, ``merge_lora``, ``save_adapter``, ``disable_lora``) works
on the active one unchanged. The others wait beside the tree, in the model's registry
(``model.lora_adapters``, an ``Adapters``); switching puts their layers into the tree in place
of the active one's (``model.set_submodule``): no weight is copied, and adapters of different r,
targets or kinds sit side by side, since each keeps its own layers.

The names are peft's: the adapter a model gets from ``inject_lora`` (or ``load_adapter``) is
``"default"``; ``add_adapter``, ``set_adapter`` and ``delete_adapter`` do what peft's methods of
those names do, and a new adapter does not become the active one (unless it is the only one).

What the registry does not follow: a waiting adapter's tensors are not in the module tree, so
``model.to(device)`` moves the active adapter only; ``set_adapter`` moves the one it switches in
onto its base's device. Quantize (``quantize_model``) before adding adapters, not between:
waiting adapters would keep the full-precision base.
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lora.embedding import LoRAEmbedding
from lora.inject import adapted_modules, inject_lora

DEFAULT = "default"  # peft's name for an adapter that was given none


@dataclass
class Adapters:
    """A model's named adapters: ``layers[name]`` is ``{module path: LoRA layer}``; ``active`` is in the tree."""

    layers: dict[str, dict[str, nn.Module]] = field(default_factory=dict)
    active: str | None = None


def registry(model: nn.Module) -> Adapters:
    """The named adapters of ``model``, registered on first use: LoRA already in it becomes ``"default"``.

    Raises:
        ValueError: the LoRA layers in the model are not the active adapter's: they were changed
            behind the registry's back (``inject_lora`` or ``merge_and_unload`` on a model with
            named adapters); the message says how to start again.
    """
    adapters = model.__dict__.get("lora_adapters")
    in_tree = dict(adapted_modules(model))
    if adapters is None:
        # A plain attribute, not a submodule: the waiting adapters stay out of the module tree, so
        # parameters(), state_dict() and the optimizer see the active adapter only.
        adapters = Adapters({DEFAULT: in_tree}, DEFAULT) if in_tree else Adapters()
        model.__dict__["lora_adapters"] = adapters
    active = adapters.layers.get(adapters.active, {})
    if in_tree.keys() != active.keys() or any(in_tree[path] is not layer for path, layer in active.items()):
        raise ValueError(f"the model's LoRA layers are not those of its active adapter {adapters.active!r}: they "
                         "were changed outside lora.named (inject_lora or merge_and_unload); add adapters with "
                         "add_adapter, or start again from a model without LoRA")
    return adapters


def factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of a LoRA layer, A ``(r, in)`` and B ``(out, r)`` (an embedding's in = num_embeddings)."""
    if isinstance(layer, LoRAEmbedding):
        return layer.lora_embedding_A, layer.lora_embedding_B
    return layer.lora_A.weight, layer.lora_B.weight


def forget_adapters(model: nn.Module) -> None:
    """Drop the registry of ``model`` (``merge_and_unload`` does: the waiting adapters were for the unmerged base)."""
    model.__dict__.pop("lora_adapters", None)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters ``model`` holds, in the order they were added."""
    return list(registry(model).layers)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter ``model`` computes with; None when it has no LoRA."""
    return registry(model).active


def adapter_layers(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """``{module path: LoRA layer}`` of the adapter ``name``, active or waiting.

    Raises:
        KeyError: no adapter of that name; the message lists the names there are.
    """
    adapters = registry(model)
    if name not in adapters.layers:
        raise KeyError(f"no adapter named {name!r}; this model has {list(adapters.layers) or 'none'} "
                       "(add_adapter or load_adapter(..., adapter_name=...) adds one)")
    return adapters.layers[name]


def unplug(model: nn.Module, layers: dict[str, nn.Module], warn: bool = True) -> None:
    """Put each layer's base back at its path: the model computes without this adapter.

    A merged layer is unmerged first, since the base it leaves behind is shared with every other
    adapter; ``warn``: say so, as peft's ``set_adapter`` does (not when the caller merges it again).
    """
    merged = [path for path, layer in layers.items() if layer.merged]
    if merged and warn:
        warnings.warn(f"unmerging the adapter merged into {merged[0]} and {len(merged) - 1} more layers before "
                      "switching adapters: the base is shared by every adapter", stacklevel=3)
    for path, layer in layers.items():
        layer.unmerge()
        layer.requires_grad_(False)  # only the active adapter trains, as with peft
        model.set_submodule(path, layer.base_layer, strict=True)


def plug(model: nn.Module, layers: dict[str, nn.Module], merged: bool = False) -> None:
    """Put each layer at its path, on its base's device and in the model's train/eval mode; ``merged``: merge
    each again (it was merged when ``unplug(..., warn=False)`` took it out)."""
    for path, layer in layers.items():
        layer.to(next(layer.base_layer.parameters()).device)  # model.to() moved the base, not waiting adapters
        for name, parameter in layer.named_parameters():
            if not name.startswith("base_layer."):
                parameter.requires_grad_(True)
        layer.train(model.training)
        model.set_submodule(path, layer, strict=True)
        if merged:
            layer.merge()


def check_name(name: str) -> None:
    """Raise unless ``name`` can name an adapter: a non-empty string that is also a folder name (``save_adapters``)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"an adapter name must be a non-empty string without '/', got {name!r}")
    if name == "__base__":
        raise ValueError("'__base__' is the name of no adapter in a mixed batch (lora/mixed.py); choose another")


@contextmanager
def new_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Within this block ``model`` holds no LoRA; the LoRA layers put into it there become the adapter ``name``.

    On leaving, the active adapter is back in the tree, and the new one waits beside it (or is
    active, when it is the model's first). If the block raises, the model is as it was.

    Raises:
        ValueError: ``name`` is taken or not a valid name; the block made no LoRA layer; an
            adapter already there started from PiSSA, whose base is not the original W.
    """
    check_name(name)
    adapters = registry(model)
    if name in adapters.layers:
        raise ValueError(f"the model already has an adapter named {name!r}; choose another name, or "
                         "delete_adapter(model, name) first")
    if any(getattr(layer, "init_lora_weights", True) == "pissa"
           for layers in adapters.layers.values() for layer in layers.values()):
        raise ValueError("an adapter of this model started from PiSSA, which changed the base weights; other "
                         "adapters need the original base: save it with initial= (a plain LoRA adapter) and load that")
    active = adapters.layers.get(adapters.active, {})
    merged = any(layer.merged for layer in active.values())
    unplug(model, active, warn=False)  # merged again below
    try:
        yield
        made = dict(adapted_modules(model))
        if not made:
            raise ValueError(f"no LoRA layer was added for the adapter {name!r}")
    except BaseException:
        unplug(model, dict(adapted_modules(model)))
        plug(model, active, merged)
        raise
    adapters.layers[name] = made
    if adapters.active is None:
        adapters.active = name  # the first adapter is the active one
    else:
        unplug(model, made)
        plug(model, active, merged)


def add_adapter(model: nn.Module, name: str, **settings) -> list[str]:
    """Add a new adapter called ``name`` to ``model``, as ``inject_lora(model, **settings)`` would make it.

    The active adapter stays active (peft's ``add_adapter`` does not switch either), unless the
    model had none. Adapters may differ in r, alpha, targets and kind (DoRA, rsLoRA).

    Args:
        name: the new adapter's name.
        settings: ``inject_lora``'s arguments: ``target_modules``, ``r``, ``alpha``, ``dropout``,
            ``adapter_dtype``, ``use_rslora``, ``use_dora``. ``init="pissa"`` only for the first
            adapter: it changes the base, which every adapter shares.

    Returns:
        The full names of the modules the new adapter adapts.

    Raises:
        ValueError: as ``new_adapter`` and ``inject_lora`` raise; PiSSA on a model that has adapters.
    """
    if settings.get("init") == "pissa" and registry(model).layers:
        raise ValueError("PiSSA moves the principal part of W into the adapter, changing the base every adapter "
                         "shares; use init='pissa' for a model's first adapter only")
    with new_adapter(model, name):
        targets = inject_lora(model, **settings)
    return targets


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter ``model`` computes with (and trains: its A and B require grad, the others' not).

    A merged active adapter is unmerged first, with a warning, as peft's ``set_adapter`` does.

    Raises:
        KeyError: no adapter of that name (the message lists them).
    """
    layers = adapter_layers(model, name)
    adapters = registry(model)
    if adapters.active == name:
        return
    unplug(model, adapters.layers[adapters.active])
    plug(model, layers)
    adapters.active = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the adapter ``name`` from ``model``. If it was active, the first remaining adapter becomes
    active, as with peft; when none remains, the model is its base model again (no LoRA).

    Raises:
        KeyError: no adapter of that name (the message lists them).
    """
    layers = adapter_layers(model, name)
    adapters = registry(model)
    del adapters.layers[name]
    if adapters.active == name:
        unplug(model, layers)
        adapters.active = next(iter(adapters.layers), None)
        if adapters.active is not None:
            plug(model, adapters.layers[adapters.active])
    if not adapters.layers:
        forget_adapters(model)


@contextmanager
def adapter_active(model: nn.Module, name: str) -> Iterator[None]:
    """Within this block ``name`` is the active adapter; the one active before is back (merged if it was) after."""
    layers = adapter_layers(model, name)
    adapters = registry(model)
    before = adapters.active
    if before == name:
        yield
        return
    merged = any(layer.merged for layer in adapters.layers[before].values())
    unplug(model, adapters.layers[before], warn=False)  # merged again below
    plug(model, layers)
    adapters.active = name
    try:
        yield
    finally:
        unplug(model, adapters.layers[name])
        plug(model, adapters.layers[before], merged)
        adapters.active = before
