"""LoRA from scratch: low-rank adapters for frozen PyTorch models, interchangeable with peft's.

Read in this order: ``layer`` (the LoRA layer), ``inject`` (putting it into a model),
``parameters`` (what trains), ``merge`` (folding it back in), ``adapter`` (files on disk),
``fused`` (the same layer with a hand-written backward, for speed: opt-in with
``use_fused_lora(model, True)``; the layer's one-line forward is the default), ``nf4`` (a 4-bit
frozen base: QLoRA).
"""

from lora.adapter import adapter_config, adapter_state_dict, load_adapter, save_adapter
from lora.fused import fused_lora
from lora.inject import (
    disable_lora,
    find_linear_modules,
    inject_lora,
    lora_layers,
    mark_only_lora_trainable,
    parse_targets,
    use_fused_lora,
)
from lora.layer import LoRALinear
from lora.merge import merge_and_unload, merge_lora, unmerge_lora
from lora.nf4 import NF4Linear, dequantize_model, quantize_model
from lora.parameters import cast_frozen, count_parameters, print_trainable_parameters, trainable_parameters_line

__all__ = [
    "LoRALinear",
    "NF4Linear",
    "adapter_config",
    "adapter_state_dict",
    "cast_frozen",
    "count_parameters",
    "dequantize_model",
    "disable_lora",
    "find_linear_modules",
    "fused_lora",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "mark_only_lora_trainable",
    "merge_and_unload",
    "merge_lora",
    "parse_targets",
    "print_trainable_parameters",
    "quantize_model",
    "save_adapter",
    "trainable_parameters_line",
    "unmerge_lora",
    "use_fused_lora",
]
