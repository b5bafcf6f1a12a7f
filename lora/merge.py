"""Merging: fold ΔW = (alpha / r) * B @ A into the frozen weight, so inference costs nothing extra."""

from torch import nn

from lora.inject import lora_layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer of ``model`` (W <- W + ΔW). Layers already merged are left alone."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora`` (W <- W - ΔW). Layers not merged are left alone."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer, then put its plain ``nn.Linear`` back in its place. In place.

    The result has no LoRA modules left: a transformers model saved from it with
    ``save_pretrained`` loads in plain transformers and gives the same logits.
    Its parameters stay frozen, as they were under LoRA.
    """
    for name, layer in list(lora_layers(model)):
        layer.merge()
        model.set_submodule(name, layer.base_layer, strict=True)
    return model
