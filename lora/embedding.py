"""LoRA on a token embedding: a frozen ``nn.Embedding`` plus a trainable low-rank update.

LoRA (Hu et al., 2021) adapts any weight matrix W by a low-rank product, W + (alpha / r) * B A.
An embedding is a weight matrix too: looking up token t in the table E, shape
(num_embeddings, embedding_dim), is multiplying the one-hot vector e_t by W = Eᵀ. So in the
paper's notation, with in = num_embeddings and out = embedding_dim::

    h = E[t] + (alpha / r) * B A[:, t]        A: (r, num_embeddings), B: (embedding_dim, r)

and the table changes by ΔWᵀ = (alpha / r) * (B A)ᵀ, shape (num_embeddings, embedding_dim):
the transpose, because ``nn.Embedding`` stores E = Wᵀ (one row per token) where ``nn.Linear``
stores W itself. A[:, t] is found by a lookup (``F.embedding`` of the ids into Aᵀ), never by
multiplying a one-hot vector: the cost is r * embedding_dim per token.

Why A starts at zero and B random here, the reverse of ``LoRALinear``'s choice:

- One of the two must be zero, so that B A = 0 and training starts exactly at the pretrained
  model; the other must be random, or neither gets a gradient. With A = 0 the gradient of B,
  (alpha / r) * g A[:, t]ᵀ, is zero at the first step, but the gradient of A's column t,
  (alpha / r) * Bᵀ g, is not, because B is random: A moves first, then B follows.
- The lookup sends gradient only to the columns of A of the tokens in the batch. So with A = 0,
  the row of ΔWᵀ of a token never seen in training, (alpha / r) * (B A[:, t])ᵀ, stays exactly zero
  (AdamW's step for a zero gradient is zero, and weight decay of zero is zero): unseen tokens keep
  their pretrained embeddings, and so does the padding token, whose column ``F.embedding`` gives
  no gradient (``padding_idx``). With Linear's choice (A random, B zero), every row of the table
  would change as soon as B moved.
- B is drawn from N(0, 1), as ``nn.Embedding`` draws its own table. This is microsoft/loralib's
  choice, which Hugging Face peft copies (``reset_lora_parameters``).

Tied embeddings. SmolLM2 (and Qwen2.5, and ``tiny-qwen2``) use one tensor for the input
embedding and the output head: ``lm_head.weight is embed_tokens.weight``. Unmerged, only the
input lookup sees the adapter; the head still multiplies by E. ``merge()`` adds ΔWᵀ into that
one tensor, so the head then multiplies by E + ΔWᵀ too: for a tied model the merged outputs
differ from the unmerged ones (an untied model's do not). peft behaves the same (it warns when
such a model is merged). ``unmerge()`` subtracts ΔWᵀ from the shared tensor, which restores
E, and so both the embedding and the head, up to float rounding.
"""

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from lora.inject import ADAPTERS, LoRAOptions
from lora.layer import LoRAModule, check_hyperparameters


class LoRAEmbedding(LoRAModule):
    """A frozen ``nn.Embedding`` with a low-rank update: ``base(ids) + (alpha / r) * Aᵀ[ids] @ Bᵀ``.

    Shapes: integer ids ``(...)`` -> ``(..., embedding_dim)``. A is ``(r, num_embeddings)`` and B
    is ``(embedding_dim, r)``, held as ``nn.Parameter``s named ``lora_embedding_A`` and
    ``lora_embedding_B`` as peft names them, so the state-dict keys are peft's:
    ``base_model.model.<module path>.lora_embedding_A`` (no ``.weight``: they are parameters,
    not ``nn.Linear`` modules). A starts at zero and B at N(0, 1); the module docstring says why.

    ``forward`` is peft's ``lora.Embedding.forward`` for one adapter, the same operations in the
    same order, so it equals peft bit for bit. The lookup into Aᵀ takes the base's
    ``padding_idx`` (that token's column of A gets no gradient) and ``scale_grad_by_freq``.
    There is no dropout: peft creates ``lora_dropout`` for embeddings but never applies it.

    Args:
        base: the pretrained embedding to adapt. Its weight is frozen here.
        r: the rank of the update.
        alpha: the update is scaled by ``alpha / r`` (LoRA §4.1, as in ``LoRALinear``).
        dtype: the dtype of A and B; None (the default) takes the base weight's. float32 on a
            bf16 base is what peft does by default (``autocast_adapter_dtype``); the output is
            then cast back to the base's dtype, as peft casts it.

    Raises:
        TypeError: ``base`` is not an ``nn.Embedding``.
        ValueError: r <= 0 or alpha <= 0; or the base uses ``max_norm`` (the lookup would
            renormalize A's columns in place), ``sparse`` gradients (they cannot flow through Aᵀ),
            or an ``embed_scale`` (Gemma's scaled embedding), which this layer does not support.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dtype: torch.dtype | None = None):
        super().__init__()
        check_embedding(base)
        check_hyperparameters(r, alpha, 0.0)
        self.base_layer = base.requires_grad_(False)
        self.r = int(r)
        self.alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
        self.scaling = self.alpha / self.r
        weight = base.weight
        dtype = dtype or weight.dtype
        where = dict(device=weight.device, dtype=dtype)
        self.lora_embedding_A = nn.Parameter(torch.empty(self.r, base.num_embeddings, **where))
        self.lora_embedding_B = nn.Parameter(torch.empty(base.embedding_dim, self.r, **where))
        self.merged = False
        self.disabled = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A zero, B from N(0, 1): the update starts at zero and A's gradient does not (module docstring)."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def lookup_A(self, ids: torch.Tensor) -> torch.Tensor:
        """The columns of A for ``ids``: Aᵀ[ids], ``(...)`` -> ``(..., r)``, with the base's gradient options."""
        base = self.base_layer
        return F.embedding(ids, self.lora_embedding_A.T, padding_idx=base.padding_idx,
                           scale_grad_by_freq=base.scale_grad_by_freq)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``base(ids) + (alpha / r) * Aᵀ[ids] @ Bᵀ``, ``(...)`` -> ``(..., embedding_dim)``."""
        if self.merged or self.disabled:
            return self.base_layer(ids)
        h = self.base_layer(ids) + self.lookup_A(ids) @ self.lora_embedding_B.T * self.scaling
        return h.to(self.base_layer.weight.dtype)  # float32 adapters on a bf16 base: back to bf16, as peft does

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔWᵀ = ((alpha / r) * B @ A)ᵀ, shape (num_embeddings, embedding_dim): the change to the table.

        Transposed from ``LoRALinear.delta_weight``'s layout because the table holds one row per
        token. The product is taken in float32 and cast to the base weight's dtype once.
        """
        delta = self.lora_embedding_B.float() @ self.lora_embedding_A.float() * self.scaling
        return delta.T.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """E <- E + ΔWᵀ, so the forward is one lookup. A no-op when already merged.

        For tied embeddings E is also the output head's weight, which changes with it (module docstring).
        """
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """E <- E - ΔWᵀ, undoing ``merge`` (for tied embeddings, the head's too). A no-op when not merged.

        Exact up to float rounding: each element of E + ΔWᵀ - ΔWᵀ is within one unit in the last
        place of the larger of E and E + ΔWᵀ, not always E to the bit.
        """
        if self.merged:
            self.base_layer.weight.add_(-self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def check_embedding(base: nn.Module) -> None:
    """Raise unless ``base`` is an ``nn.Embedding`` that ``LoRAEmbedding`` can adapt; errors say why and what to do."""
    if not isinstance(base, nn.Embedding):
        raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}; "
                        "an nn.Linear takes LoRALinear (lora/layer.py)")
    if base.max_norm is not None:
        raise ValueError(f"the embedding has max_norm={base.max_norm}, which renormalizes the rows it looks up in "
                         "place: LoRAEmbedding would renormalize A's columns, not the adapted rows E + ΔWᵀ; "
                         "use an embedding without max_norm")
    if base.sparse:
        raise ValueError("the embedding has sparse=True; a sparse gradient cannot flow back through Aᵀ, "
                         "so LoRAEmbedding needs sparse=False")
    if hasattr(base, "embed_scale"):
        raise ValueError(f"{type(base).__name__} scales its lookup by embed_scale (Gemma's scaled embedding), "
                         "which LoRAEmbedding does not apply to its update; adapt a plain nn.Embedding")


def modules_sharing_weight(model: nn.Module, layer: LoRAEmbedding) -> list[str]:
    """Names of the modules of ``model``, other than ``layer``'s base, whose ``weight`` is the base's very tensor.

    ``["lm_head"]`` for a model with tied embeddings (SmolLM2, Qwen2.5): what ``layer.merge()``
    changes besides the embedding. Empty for an untied model.
    """
    shared = layer.base_layer.weight
    return [name for name, module in model.named_modules()
            if module is not layer.base_layer and getattr(module, "weight", None) is shared]


def embedding_adapter(name: str, module: nn.Module, options: LoRAOptions):
    """``inject_lora``'s adapter for an ``nn.Embedding`` target: a ``LoRAEmbedding`` (plain LoRA only).

    Raises:
        ValueError: DoRA, rsLoRA or PiSSA asked for: this library adapts an embedding with plain LoRA only.
    """
    if not isinstance(module, nn.Embedding):
        return None
    if options.use_dora or options.use_rslora or options.init != "lora":
        raise ValueError(f"{name} is an embedding, which this library adapts with plain LoRA only; "
                         "leave it out of the targets, or drop use_dora, use_rslora and init='pissa'")
    return lambda: LoRAEmbedding(module, r=options.r, alpha=options.alpha, dtype=options.dtype)


ADAPTERS.append(embedding_adapter)
