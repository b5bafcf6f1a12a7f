"""LoRA+: train B with a learning rate ``ratio`` times A's.

LoRA+ (Hayou, Ghosh and Yu, 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354) keeps LoRA's layer as it is (``lora/layer.py``)::

    h = W x + (alpha / r) * B A x        x: (in,), A: (r, in), B: (out, r)

and changes only the optimizer: A and B get different learning rates,

    lr_A = lr,    lr_B = ratio * lr        (the paper's lambda = lr_B / lr_A)

Why one learning rate is the wrong choice (§3 works it through on a toy model, §4 proves it for
wide networks). Count how much each matrix's update moves the layer's output as the width
``in = n`` grows, with Adam, whose normalised updates have entries of size about lr:

- B's update dB is (out, r) and acts on ``A x``, a vector of only r numbers: dB A x = O(lr_B).
- A's update dA is (r, in) and acts on x itself: ``dA x`` sums n products, which add up rather
  than cancel (A's gradient is B^T g x^T, aligned with x), so B dA x = O(n lr_A).

For both to move the features by O(1) as n grows, the paper's §4 theorem asks for lr_A = Θ(1/n)
and lr_B = Θ(1): the ratio grows with the width. With one lr either A's contribution blows up
(lr large) or B's barely moves (lr ~ 1/n), so B learns too slowly: "suboptimal finetuning of
models with large width" (the abstract). The theory fixes how the ratio scales, not its value;
the paper's experiments (§5) suggest lambda = 2^4 = 16 as a rule of thumb (peft's docstring adds:
larger for harder tasks, with lr a little below plain LoRA's, e.g. halved). peft's
``create_loraplus_optimizer`` has no default for ``loraplus_lr_ratio``: it must be given.
``ratio = 1`` is plain LoRA exactly.

peft (``peft/optimizers/loraplus.py``) groups parameters by name (``"lora_B" in name``, or any
1-D parameter, takes B's rate) and excludes biases and norm weights from weight decay. Here A and
B are found by type (every ``LoRALinear``'s ``lora_A`` and ``lora_B``); they are the weights of
bias-free ``nn.Linear`` layers, never biases or norms, so both decay. LoRA on an embedding
(``LoRAEmbedding``) trains its A and B at one rate of its own, ``lr_embedding``, as peft's does
(``loraplus_lr_embedding``): the width argument above does not carry over, because an embedding's
input is a one-hot token, so A's step touches one column and sums nothing over n. Its default,
1e-6, is peft's and the authors' code's, given without a reason; it all but freezes that adapter,
so pass a larger ``lr_embedding`` to train it. Two differences from peft, both deliberate: peft's
``weight_decay=`` keyword is overridden by its groups (they read ``loraplus_weight_decay``,
default 0.0), while ``weight_decay`` here is what every group gets; and any other trainable
parameter keeps ``lr`` here, where peft gives a 1-D one (a bias, a norm) B's rate.
"""

import math
import numbers
from collections.abc import Iterator

import torch
from torch import nn

from lora.dora import DoRALinear
from lora.embedding import LoRAEmbedding
from lora.inject import lora_layers

PEFT_LR_EMBEDDING = 1e-6  # peft's default loraplus_lr_embedding, an absolute rate (not a multiple of lr)


def check_rates(lr: float, ratio: float) -> None:
    """Raise ``ValueError`` unless ``lr`` and ``ratio`` (lr_B / lr_A) are finite numbers > 0."""
    if not _positive(lr):
        raise ValueError(f"lr must be a finite number > 0 (A's learning rate), got {lr!r}")
    if not _positive(ratio):
        raise ValueError(f"ratio must be a finite number > 0 (B's learning rate is ratio * lr; "
                         f"the paper suggests 16, 1 is plain LoRA), got {ratio!r}")


def _positive(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf


def _trainable(parameters: Iterator[nn.Parameter]) -> list[nn.Parameter]:
    return [parameter for parameter in parameters if parameter.requires_grad]


def loraplus_parameter_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                              lr_embedding: float | None = None) -> list[dict]:
    """The optimizer's parameter groups for LoRA+: A at ``lr``, B at ``lr * ratio``.

    Each group also carries ``"name"`` (``"lora_A"``, ``"lora_B"``, ``"embedding"``, ``"other"``)
    and ``"lr_scale"``, its learning rate over ``lr`` (1, ``ratio``, ``lr_embedding / lr``, 1).
    A schedule keeps the rates in proportion by setting ``group["lr"] = lr_now * group["lr_scale"]``
    at every step.

    Args:
        model: a model with LoRA layers (``inject_lora`` or ``load_adapter``), possibly wrapped
            by DDP or FSDP2 (both keep the ``LoRALinear`` modules).
        lr: A's learning rate, the ``lr`` of plain LoRA.
        ratio: B's learning rate over A's (lambda in the paper); 16 is its rule of thumb.
        weight_decay: AdamW's decoupled weight decay, the same for every group.
        lr_embedding: the rate of both A and B of every ``LoRAEmbedding``; None takes peft's
            default, 1e-6 (``PEFT_LR_EMBEDDING``).

    Returns:
        The groups ``lora_A``, ``lora_B`` (each in model order), ``embedding`` and ``other`` (any
        other parameter that trains, a norm unfrozen by hand, say, at ``lr``), leaving out those
        with no parameters. Frozen parameters, A's and B's included, are left out, as an
        optimizer over ``requires_grad`` parameters would leave them.

    Raises:
        ValueError: ``lr`` or ``ratio`` is not a finite number > 0, or ``model`` has no trainable
            LoRA A or B.
    """
    check_rates(lr, ratio)
    lr_embedding = PEFT_LR_EMBEDDING if lr_embedding is None else lr_embedding
    linear = [layer for _, layer in lora_layers(model)]
    embeddings = [module for module in model.modules() if isinstance(module, LoRAEmbedding)]
    a = _trainable(p for layer in linear for p in layer.lora_A.parameters())
    # DoRA's magnitude vector goes with B, as peft's create_loraplus_optimizer puts every 1-D LoRA parameter.
    b = _trainable([*(p for layer in linear for p in layer.lora_B.parameters()),
                    *(layer.lora_magnitude_vector for layer in linear if isinstance(layer, DoRALinear))])
    embedding = _trainable(p for layer in embeddings for p in (layer.lora_embedding_A, layer.lora_embedding_B))
    if not a + b + embedding:
        raise ValueError("the model has no trainable LoRA A or B: add LoRA first with inject_lora(model, ...) "
                         "or load_adapter(model, folder), and keep it trainable (mark_only_lora_trainable(model))")
    adapter = {id(p) for p in a + b + embedding}
    other = [p for p in _trainable(model.parameters()) if id(p) not in adapter]
    groups = [
        {"name": "lora_A", "params": a, "lr": lr, "lr_scale": 1.0},
        {"name": "lora_B", "params": b, "lr": lr * ratio, "lr_scale": float(ratio)},
        {"name": "embedding", "params": embedding, "lr": lr_embedding, "lr_scale": lr_embedding / lr},
        {"name": "other", "params": other, "lr": lr, "lr_scale": 1.0},
    ]
    return [{**group, "weight_decay": weight_decay} for group in groups if group["params"]]


def loraplus_optimizer(model: nn.Module, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, *,
                       lr: float, ratio: float, weight_decay: float = 0.0, lr_embedding: float | None = None,
                       **kwargs) -> torch.optim.Optimizer:
    """An optimizer over ``loraplus_parameter_groups(model, lr, ratio, weight_decay, lr_embedding)``.

    ``kwargs`` go to ``optimizer_class`` (``betas``, ``eps``, ...). The same as peft's
    ``create_loraplus_optimizer(peft_model, optimizer_class, lr=lr, loraplus_lr_ratio=ratio,
    loraplus_weight_decay=weight_decay, loraplus_lr_embedding=lr_embedding, **kwargs)`` on the
    same adapter.

    Raises:
        ValueError: as ``loraplus_parameter_groups`` does.
    """
    groups = loraplus_parameter_groups(model, lr, ratio, weight_decay, lr_embedding)
    return optimizer_class(groups, lr=lr, **kwargs)
