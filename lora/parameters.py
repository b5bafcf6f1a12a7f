"""What trains and what does not: counting parameters, and holding the frozen ones in a cheaper dtype."""

import torch
from torch import nn

from lora.nf4 import NF4Linear


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model``; a tied weight counts once.

    A 4-bit ``NF4Linear`` holds its weight as packed codes and absmax constants (frozen
    parameters, so that FSDP2 shards them); those are not counted, the layer counts as the
    ``out x in`` frozen weights it stands for, so quantizing does not change the total.
    """
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    storage = {id(tensor) for layer in quantized for tensor in layer.storage()}
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in storage:
            continue
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    total += sum(layer.in_features * layer.out_features for layer in quantized)
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """peft's summary line, e.g. ``trainable params: 540,672 || all params: 494,573,440 || trainable%: 0.1093``."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable_parameters_line(model)``, exactly as peft's ``print_trainable_parameters()`` does."""
    print(trainable_parameters_line(model))


@torch.no_grad()
def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold every frozen floating-point parameter of ``model`` in ``dtype``; return how many changed.

    What trains (``requires_grad``: LoRA's A and B) keeps its dtype, and so do the buffers
    (a Llama's rotary ``inv_freq`` stays float32: rounded, the positions far along would drift).
    A 4-bit ``NF4Linear`` keeps its codes and float32 absmax constants as quantized, unrounded;
    its bias is cast, and it dequantizes to ``dtype`` from then on (its ``dtype``).

    Each parameter changes in place, as ``nn.Module.to`` changes it, so weights that are shared
    (an embedding tied to the vocabulary head) stay shared.
    """
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    storage = {id(tensor) for layer in quantized for tensor in layer.storage()}
    for layer in quantized:
        layer.dtype = dtype
    changed = 0
    for parameter in model.parameters():
        if parameter.requires_grad or id(parameter) in storage or not parameter.is_floating_point():
            continue
        if parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)  # .data: the same Parameter object, so ties hold
            changed += 1
    return changed
