"""Which modules of a model LoRA adapts: found by name, with peft's matching rule.

Module names are paths through the model, as ``model.named_modules()`` lists them. In the
Llama and Qwen2 families the attention projections of layer N are called
``model.layers.N.self_attn.q_proj`` (and ``k_proj``, ``v_proj``, ``o_proj``).

A target must be an ``nn.Linear`` (or the 4-bit ``NF4Linear``) or an ``nn.Embedding``. GPT-2's
``Conv1D`` (``c_attn``) stores its weight transposed; peft adapts it with ``fan_in_fan_out=True``,
which this library leaves out to keep the layer's forward one readable line.
"""

import re
from collections.abc import Iterator, Sequence

from torch import nn

from lora.layer import LinearBase, LoRALinear, LoRAModule


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for the submodules a target name is matched against.

    That is every named submodule except the insides of LoRA modules (their ``base_layer``,
    ``lora_A`` and ``lora_B``), which are parts of an adapted layer, not targets themselves.
    """
    inside = None  # the name prefix of the LoRA layer being skipped; named_modules is pre-order
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        if isinstance(module, LoRAModule):
            inside = name + "."
        yield name, module


def find_linear_modules(model: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``model`` that LoRA could target.

    Layers already wrapped by LoRA are listed under their own name, not as ``....base_layer``.
    """
    return [name for name, module in candidate_modules(model)
            if isinstance(module, (LinearBase, LoRALinear))]


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
        if isinstance(module, LoRAModule):
            raise ValueError(f"{name} already has LoRA; inject once, or merge_and_unload(model) first")
        if not isinstance(module, (LinearBase, nn.Embedding)):
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


def parse_targets(text: str) -> list[str]:
    """A comma-separated list of module names as a list: ``"q_proj, v_proj"`` -> ``["q_proj", "v_proj"]``.

    Spaces around names and empty entries are dropped. The one place the command lines split ``--targets``.
    """
    return [name.strip() for name in text.split(",") if name.strip()]
