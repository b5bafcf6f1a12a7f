"""Weighted combinations: a new adapter made from several, as peft's ``add_weighted_adapter`` makes it.

Two adapters trained for two tasks can be blended without training again: the new adapter's
update is meant to be the weighted sum of theirs, ``ΔW = Σ_i w_i ΔW_i`` with
``ΔW_i = s_i B_i A_i`` (s_i = alpha_i / r_i). Two ways to build it, both peft's:

- ``"svd"``: form the weighted sum of the updates at each adapted layer, then factor it back into
  rank ``svd_rank`` by its SVD, ``ΔW = U S Vᵀ``::

      B = U_k diag(S_k)    (out, k)        A = V_kᵀ    (k, in)        scaling 1 (alpha = r = k)

  With k at least the sum of the adapters' ranks, Σ w_i ΔW_i has rank at most k and this is
  exact; a smaller k keeps its best rank-k approximation (Eckart-Young). Any r mix.
- ``"linear"``: add the factors themselves, each weighted by the square root of ``|w_i s_i|``
  (the sign goes on A only)::

      A = Σ_i sign(w_i) sqrt(|w_i s_i|) A_i        B = Σ_i sqrt(|w_i s_i|) B_i      scaling 1

  Cheap (no SVD, the same r), but B A is not Σ w_i ΔW_i: the product has cross terms
  ``sqrt(|w_i s_i w_j s_j|) B_i A_j`` for i ≠ j. peft's documentation calls it "a very rough
  approximation". The adapters must share r, as in peft. With one adapter it is exact:
  ``w s B A``.

The new adapter adapts every module any of them adapts (the union of their targets); at a
module only some of them adapt, the sums run over those. It has alpha = r, so scaling 1: the
weights and each adapter's scaling are inside A and B already. Its other settings (dropout, the
dtype of A and B) are the first adapter's, but not rsLoRA: peft (0.21.2) copies ``use_rslora``
too, and its alpha = r then scales by sqrt(r) instead of 1, so its combination of rsLoRA
adapters is sqrt(r) times too large. Here the new adapter is plain LoRA, scaling 1, for any inputs.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from lora.dora import DoRALinear
from lora.inject import inject_lora
from lora.named import adapter_layers, factors, new_adapter

COMBINATIONS = ("svd", "linear")


def linear_combination(layers: Sequence[nn.Module], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the "linear" combination of ``layers`` with ``weights`` (module docstring), as peft builds them."""
    root_weights = [math.sqrt(abs(weight * layer.scaling)) for layer, weight in zip(layers, weights)]
    signs = [1 if weight * layer.scaling >= 0 else -1 for layer, weight in zip(layers, weights)]
    weights_A = torch.tensor([sign * root for sign, root in zip(signs, root_weights)])
    weights_B = torch.tensor(root_weights)
    A = torch.stack([factors(layer)[0] for layer in layers])
    B = torch.stack([factors(layer)[1] for layer in layers])
    A = (A * weights_A.to(A.device).view(-1, 1, 1)).sum(dim=0)
    B = (B * weights_B.to(B.device).view(-1, 1, 1)).sum(dim=0)
    return A, B


def svd_combination(layers: Sequence[nn.Module], weights: Sequence[float], rank: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """``(A, B)`` of rank ``rank`` from the SVD of ``Σ w_i s_i B_i A_i`` (module docstring), as peft builds them."""
    deltas = torch.stack([factors(layer)[1] @ factors(layer)[0] * layer.scaling for layer in layers])
    delta = (deltas * torch.tensor(weights).to(deltas.device).view(-1, 1, 1)).sum(dim=0)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)  # peft's call; only the first `rank` vectors are kept
    return Vh[:rank, :], U[:, :rank] @ torch.diag(S[:rank])


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> list[str]:
    """Add the adapter ``adapter_name``, made from the named ``adapters`` with ``weights``; return its modules.

    peft's ``add_weighted_adapter`` for its "svd" and "linear" combination types (module
    docstring); the new adapter waits beside the active one (``set_adapter`` to use it).

    Args:
        adapters: names of the adapters to combine (``lora/named.py``).
        weights: one number per adapter, negative to subtract an adapter's effect.
        adapter_name: the new adapter's name.
        combination_type: "svd" (any ranks; the default, as in peft) or "linear" (equal ranks).
        svd_rank: the rank of the "svd" result; None: the largest rank among ``adapters``.

    Raises:
        ValueError: an unknown combination type, weights and adapters of different lengths, no
            adapters, ranks that differ for "linear", an ``svd_rank`` larger than a weight allows,
            or a DoRA adapter (its magnitude vector does not combine linearly).
        KeyError: an adapter name the model does not hold.
    """
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {', '.join(COMBINATIONS)}, got {combination_type!r}")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    sources = {name: adapter_layers(model, name) for name in adapters}
    for name, layers in sources.items():
        if any(isinstance(layer, DoRALinear) for layer in layers.values()):
            raise ValueError(f"{name} is a DoRA adapter, whose magnitude vector does not combine as A and B do; "
                             "combine plain LoRA adapters")
    ranks = {name: next(iter(layers.values())).r for name, layers in sources.items()}
    if combination_type == "linear" or len(adapters) == 1:  # peft too takes "linear" for a single adapter
        if len(set(ranks.values())) > 1:
            raise ValueError(f"the linear combination needs adapters of one r, got {ranks}; use "
                             "combination_type='svd', which takes any")
        combination_type, rank = "linear", next(iter(ranks.values()))
    else:
        rank = svd_rank or max(ranks.values())
    paths = [path for path, _ in model.named_modules()
             if any(path in layers for layers in sources.values())]  # the union, in model order
    first = next(iter(sources[adapters[0]].values()))
    with torch.no_grad():
        combined = {}
        for path in paths:
            layers = [sources[name][path] for name in adapters if path in sources[name]]
            used = [weight for name, weight in zip(adapters, weights) if path in sources[name]]
            A, B = (linear_combination(layers, used) if combination_type == "linear"
                    else svd_combination(layers, used, rank))
            if A.shape[0] != rank:
                raise ValueError(f"svd_rank={rank} is larger than {path}'s update can have ({A.shape[0]}: "
                                 "min(in, out)); choose a smaller svd_rank")
            combined[path] = A, B
    with new_adapter(model, adapter_name):
        inject_lora(model, paths, r=rank, alpha=rank, dropout=getattr(first, "dropout", 0.0),
                    adapter_dtype=factors(first)[0].dtype)
    with torch.no_grad():
        for path, layer in adapter_layers(model, adapter_name).items():
            A, B = factors(layer)
            A.copy_(combined[path][0])
            B.copy_(combined[path][1])
    return paths
