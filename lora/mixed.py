"""Mixed-adapter batches: one forward in which each row of the batch goes through its own adapter.

A server holding one base and many adapters (``lora/named.py``) gets requests for different
adapters at once. Switching adapters between requests serves them one at a time; merging each in
turn rewrites W every time. But the base's work, W x, is the same for every row: only the small
update differs. So the rows can share one batch: every base layer runs on the whole batch, and
each row adds its own adapter's update (Punica and S-LoRA serve LoRA so; peft calls it
``adapter_names=[...]``). For row i, with adapter k(i)::

    h_i = W x_i + b + s_k(i) B_k(i) A_k(i) x_i

Written as tensors, with the adapters' A and B stacked once per layer (K adapters, r_max the
largest rank; a smaller adapter's A padded with zero rows and its B with zero columns, which add
exactly nothing)::

    A_all: (K + 1, r_max, in)    B_all: (K + 1, out, r_max)    s_all: (K + 1,)    rows: (batch,) in 0..K
    A = A_all[rows]            (batch, r_max, in)     a gather: each row's own A
    B = B_all[rows]            (batch, out, r_max)
    h = base(x) + (x @ Aᵀ) @ Bᵀ * s_all[rows]         x: (batch, seq, in), two batched matmuls

Stack entry 0 is all zeros: the rows of ``"__base__"`` (peft's name for "no adapter") and the
rows of an adapter that does not adapt this module take it, and get the base's output alone.

Inference only, as in peft: a mixed batch is refused while the model is training (each row's
gradient would reach its adapter through a gather; train adapters one at a time), while an
adapter is merged (W would hold its update for every row), and for DoRA adapters (their
magnitude rescales the base's output per row; peft refuses them too).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lora.dora import DoRALinear
from lora.named import adapter_layers, factors, plug, registry, unplug

BASE = "__base__"  # peft's name for a row without an adapter


class RowAdapters:
    """Which adapter each row of the batch takes: ``rows[i]`` indexes the stacked adapters (0: none).

    One object shared by every mixed layer of a model, so that a generation loop that drops its
    finished rows from the batch (or repeats a prompt's row for its samples) keeps them all in step.
    """

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows at ``index``, in that order (the batch's ``cache.batch_select_indices(index)``)."""
        self.rows = self.rows[index.to(self.rows.device)]

    def repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row (the batch's ``cache.batch_repeat_interleave(repeats)``)."""
        self.rows = self.rows.repeat_interleave(repeats)


def stack_factors(layers: Sequence[nn.Module | None], shape_A: tuple[int, int],
                  shape_B: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A_all, B_all, s_all)``: entry 0 zero, entry k + 1 the k-th of ``layers`` (zero where it is None).

    Shapes: A_all ``(K + 1, r_max, in)``, B_all ``(K + 1, out, r_max)``, s_all ``(K + 1,)``, with
    ``shape_A = (r_max, in)`` and ``shape_B = (out, r_max)``; a rank below r_max is zero-padded.
    """
    first_A = factors(next(layer for layer in layers if layer is not None))[0]
    where = dict(dtype=first_A.dtype, device=first_A.device)
    A_all = torch.zeros(len(layers) + 1, *shape_A, **where)
    B_all = torch.zeros(len(layers) + 1, *shape_B, **where)
    s_all = torch.zeros(len(layers) + 1, **where)
    for k, layer in enumerate(layers, start=1):
        if layer is None:
            continue
        A, B = factors(layer)
        A_all[k, : layer.r] = A
        B_all[k, :, : layer.r] = B
        s_all[k] = layer.scaling
    return A_all, B_all, s_all


class MixedAdapters(nn.Module):
    """A frozen layer and the stacked A, B and scalings of K adapters at it (``stack_factors``), for one block.

    ``in_features, out_features``: the sizes A and B multiply (an embedding's: num_embeddings and embedding_dim).
    """

    def __init__(self, base: nn.Module, layers: Sequence[nn.Module | None], row_adapters: RowAdapters,
                 in_features: int, out_features: int):
        super().__init__()
        r_max = max(layer.r for layer in layers if layer is not None)
        self.base_layer = base
        self.lora_A, self.lora_B, self.scaling = stack_factors(layers, (r_max, in_features), (out_features, r_max))
        self.row_adapters = row_adapters


class MixedLoRALinear(MixedAdapters):
    """A frozen linear layer and K adapters; row i of the batch gets adapter ``rows[i]`` (0: none).

    ``base(x) + (x @ A_all[rows]ᵀ) @ B_all[rows]ᵀ * s_all[rows]``, ``(batch, ..., in) -> (batch, ..., out)``
    (module docstring). Built by ``mixed_batch``; not trained.
    """

    def __init__(self, base: nn.Module, layers: Sequence[nn.Module | None], row_adapters: RowAdapters):
        super().__init__(base, layers, row_adapters, base.in_features, base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = check_rows(self, x)
        result = self.base_layer(x)
        A, B = self.lora_A[rows], self.lora_B[rows]  # (batch, r_max, in), (batch, out, r_max): a gather
        s = self.scaling[rows].view(-1, *[1] * (x.dim() - 1))
        flat = x.reshape(len(x), -1, x.shape[-1]).to(A.dtype)  # (batch, tokens, in): any middle dimensions
        update = (flat @ A.transpose(1, 2)) @ B.transpose(1, 2)  # (batch, tokens, out)
        return result + (update.view(*x.shape[:-1], -1) * s).to(result.dtype)


class MixedLoRAEmbedding(MixedAdapters):
    """A frozen embedding and K adapters; row i of the batch gets adapter ``rows[i]`` (0: none).

    ``base(ids) + A_all[rows, :, ids] @ B_all[rows]ᵀ * s_all[rows]``: each row looks up its own
    adapter's columns of A, ``(batch, seq)`` -> ``(batch, seq, embedding_dim)``. Built by ``mixed_batch``.
    """

    def __init__(self, base: nn.Embedding, layers: Sequence[nn.Module | None], row_adapters: RowAdapters):
        super().__init__(base, layers, row_adapters, base.num_embeddings, base.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = check_rows(self, ids)
        result = self.base_layer(ids)
        columns = self.lora_A[rows.view(-1, *[1] * (ids.dim() - 1)), :, ids]  # (batch, seq, r_max): A's columns
        update = columns @ self.lora_B[rows].transpose(1, 2)  # (batch, seq, embedding_dim)
        s = self.scaling[rows].view(-1, *[1] * (ids.dim() - 1), 1)
        return (result + update * s).to(result.dtype)


def check_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows' adapter indices for ``x``; raises unless it has one row per adapter name and is not training."""
    if layer.training:
        raise ValueError("a mixed-adapter batch is for inference: call model.eval() (train one adapter at a time)")
    rows = layer.row_adapters.rows
    if len(x) != len(rows):
        raise ValueError(f"the batch has {len(x)} rows but {len(rows)} adapter names were given; "
                         "give one name per row")
    return rows.to(x.device)


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[RowAdapters]:
    """Within this block, row i of every batch ``model`` computes goes through adapter ``adapter_names[i]``.

    ``"__base__"`` is a row without an adapter. The rows keep their adapters for the whole block,
    so a generation loop (``eval.generate.generate(..., adapter_names=...)``) runs inside one; it
    gets the block's ``RowAdapters``, to follow the rows it drops or repeats.
    Each adapted module is replaced for the block by a ``MixedLoRALinear`` (or ``MixedLoRAEmbedding``)
    holding every named adapter's A and B stacked (module docstring); the active adapter and the
    layers as they were are back on exit.

    Raises:
        ValueError: the model is training; an adapter is merged; an adapter is DoRA; an unknown
            name (the message lists the model's adapters); no names.
    """
    adapter_names = list(adapter_names)
    adapters = registry(model)
    if model.training:
        raise ValueError("a mixed-adapter batch is for inference: call model.eval() first (as peft refuses it "
                         "while training)")
    if not adapter_names:
        raise ValueError("give one adapter name per row of the batch, '__base__' for none")
    unknown = sorted({name for name in adapter_names if name != BASE} - set(adapters.layers))
    if unknown:
        raise ValueError(f"no adapter named {unknown[0]!r}; this model has {list(adapters.layers) or 'none'} "
                         f"(and {BASE!r} for none)")
    used = list(dict.fromkeys(name for name in adapter_names if name != BASE))
    layers = {name: adapter_layers(model, name) for name in used}
    for name, adapter in adapters.layers.items():
        if any(layer.merged for layer in adapter.values()):
            raise ValueError(f"the adapter {name!r} is merged into W, which every row shares; "
                             "unmerge_lora(model) first")
    for name, adapter in layers.items():
        if any(isinstance(layer, DoRALinear) for layer in adapter.values()):
            raise ValueError(f"{name} is a DoRA adapter, which a mixed batch does not take (nor does peft's); "
                             "run its rows apart, with set_adapter")
    rows = RowAdapters(torch.tensor([0 if name == BASE else used.index(name) + 1 for name in adapter_names]))
    active = adapters.layers.get(adapters.active, {})
    unplug(model, active)
    paths = [path for path, _ in model.named_modules() if any(path in adapter for adapter in layers.values())]
    try:
        for path in paths:
            base = model.get_submodule(path)
            per_adapter = [layers[name].get(path) for name in used]
            mixed = (MixedLoRAEmbedding if isinstance(base, nn.Embedding) else MixedLoRALinear)(base, per_adapter, rows)
            model.set_submodule(path, mixed.eval(), strict=True)  # model.train() in the block is refused
        yield rows
    finally:
        for path in paths:
            module = model.get_submodule(path)
            if isinstance(module, MixedAdapters):
                model.set_submodule(path, module.base_layer, strict=True)
        plug(model, active)
