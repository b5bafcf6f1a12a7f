"""LoRA from scratch: low-rank adapters for frozen PyTorch models, interchangeable with peft's.

Read in this order: ``layer`` (the LoRA layer), ``targets`` (which layers, by name), ``inject``
(putting it into a model), ``parameters`` (what trains), ``merge`` (folding it back in),
``adapter`` (files on disk). Then variants, each in a file of its own that ``layer`` and
``inject`` never import: ``fused`` (the same layer with a hand-written backward, for speed:
opt-in with ``use_fused_lora(model, True)``; the layer's one-line forward is the default),
``nf4`` (a 4-bit frozen base: QLoRA), and LoRA's relatives, each a small change to the plain
layer and each equal to peft's: rsLoRA (``use_rslora``, in ``layer``), ``dora`` (a trained
magnitude per output), ``pissa`` (A and B from W's principal singular vectors), ``loraplus`` (B
at a higher learning rate than A) and ``embedding`` (LoRA on an ``nn.Embedding``). A variant
that changes how ``inject_lora`` builds a layer or starts it adds itself to its tables
(``ADAPTERS``, ``INITS``) when imported, which importing this package does. Then many adapters
on one base: ``named`` (add, switch, delete), ``combine`` (a weighted combination of adapters)
and ``mixed`` (each row of a batch through its own adapter).
"""

from lora.adapter import adapter_config, adapter_state_dict, load_adapter, load_adapters, save_adapter, save_adapters
from lora.combine import add_weighted_adapter
from lora.dora import DoRALinear
from lora.embedding import LoRAEmbedding
from lora.fused import fused_lora, use_fused_lora
from lora.inject import adapted_modules, disable_lora, inject_lora, lora_layers, mark_only_lora_trainable
from lora.layer import LoRALinear
from lora.loraplus import loraplus_optimizer, loraplus_parameter_groups
from lora.merge import merge_and_unload, merge_lora, unmerge_lora
from lora.mixed import mixed_batch
from lora.named import active_adapter, add_adapter, adapter_names, delete_adapter, set_adapter
from lora.nf4 import NF4Linear, dequantize_model, quantize_model
from lora.parameters import cast_frozen, count_parameters, print_trainable_parameters, trainable_parameters_line
from lora.pissa import pissa_init_, pissa_to_lora
from lora.targets import find_linear_modules, parse_targets

__all__ = [
    "DoRALinear",
    "LoRAEmbedding",
    "LoRALinear",
    "NF4Linear",
    "active_adapter",
    "adapted_modules",
    "adapter_config",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "add_weighted_adapter",
    "cast_frozen",
    "count_parameters",
    "delete_adapter",
    "dequantize_model",
    "disable_lora",
    "find_linear_modules",
    "fused_lora",
    "inject_lora",
    "load_adapter",
    "load_adapters",
    "lora_layers",
    "loraplus_optimizer",
    "loraplus_parameter_groups",
    "mark_only_lora_trainable",
    "merge_and_unload",
    "merge_lora",
    "mixed_batch",
    "parse_targets",
    "pissa_init_",
    "pissa_to_lora",
    "print_trainable_parameters",
    "quantize_model",
    "save_adapter",
    "save_adapters",
    "set_adapter",
    "trainable_parameters_line",
    "unmerge_lora",
    "use_fused_lora",
]
