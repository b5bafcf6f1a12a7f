"""Counting parameters: how much of the model LoRA actually trains."""

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
