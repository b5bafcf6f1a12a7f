"""Counting parameters: how much of the model LoRA actually trains."""

from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model``; a tied weight counts once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """peft's summary line, e.g. ``trainable params: 540,672 || all params: 494,573,440 || trainable%: 0.1093``."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable_parameters_line(model)``, exactly as peft's ``print_trainable_parameters()`` does."""
    print(trainable_parameters_line(model))
