"""Merging: fold ΔW = (alpha / r) * B @ A into the frozen weight, so inference costs nothing extra.

Merging is explicit, ``merge_lora`` or a layer's ``merge()``, never a side effect of ``.eval()``,
and merging twice changes nothing. A merged layer skips dropout, so merge for inference, not for
training. ``merge_and_unload`` keeps the active adapter and drops the others, as peft does
(``lora/named.py``).
"""

from torch import nn

from lora.inject import adapted_modules
from lora.named import forget_adapters


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer of ``model`` (W <- W + ΔW). Layers already merged are left alone."""
    for _, layer in adapted_modules(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora`` (W <- W - ΔW). Layers not merged are left alone."""
    for _, layer in adapted_modules(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer, then put its plain ``nn.Linear`` (or ``nn.Embedding``) back in its place. In place.

    The result has no LoRA modules left: a transformers model saved from it with
    ``save_pretrained`` loads in plain transformers and gives the same logits.
    Its parameters stay frozen, as they were under LoRA. With tied embeddings (SmolLM2), a merged
    embedding adapter changes the output head too, which shares its weight: the merged model's
    logits then differ from the adapted one's (``lora/embedding.py``).
    """
    for name, layer in list(adapted_modules(model)):
        layer.merge()
        model.set_submodule(name, layer.base_layer, strict=True)
    forget_adapters(model)  # named adapters waiting beside the active one were for the unmerged base
    return model
