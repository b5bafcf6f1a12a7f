"""Is ΔW low-rank? The SVD arithmetic of LoRA's bet and of the paper's §7, as small pure functions.

LoRA (Hu et al., 2021) bets that the change fine-tuning makes to a pretrained weight W0 (out, in),
ΔW = W_after - W0, has a low "intrinsic rank" (§1): that B (out, r) times A (r, in), for an r far
below min(out, in), can stand in for it. §7 of the paper looks at what LoRA learns; this module
holds the arithmetic of three questions, each written out:

1. How low-rank is ΔW? The bet tested head-on, on a fully fine-tuned ΔW. Its singular values
   σ_1 >= σ_2 >= ... say it: the *energy* in the top k, ``sum_{i<=k} σ_i² / sum_i σ_i²``, and
   the relative error of the best rank-r approximation, which by Eckart-Young is the part of the
   spectrum it leaves out. A random Gaussian matrix of the same shape is the yardstick: it has
   no low-rank structure at all. At r = min(out, in) LoRA expresses any ΔW exactly
   (``full_rank_lora``; §4.1, "a generalization of full fine-tuning"), so the question is only
   how small an r suffices.
2. Do two ranks find the same directions? (§7.2, eq. 4, Figure 3) The normalised subspace
   similarity φ of the input directions that two A matrices read, from 0 (orthogonal) to 1
   (one subspace inside the other).
3. Does ΔW amplify what W already has? (§7.3, Table 7) How much of W lies in ΔW's own top-r
   directions, ``||Uᵀ W V||_F``, against W's own top r and random ones; and the amplification
   factor ``||ΔW||_F / ||Uᵀ W V||_F``.

Every function takes and returns tensors (or floats); the singular values and vectors are taken
in float64. ``python -m experiments.delta_w`` applies them to a real fine-tune of SmolLM2 and
writes the report; ``tutorials/E_is_delta_w_low_rank.md`` walks through them one by one.
"""

import math

import torch
from torch import nn

from lora import LoRALinear


# ---------------------------------------------------------------------------------------------
# 1. How low-rank is a matrix: its spectrum, its energy, Eckart-Young.
# ---------------------------------------------------------------------------------------------


def singular_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """The singular values σ_1 >= σ_2 >= ... >= 0 of ``matrix`` (out, in), shape (min(out, in),), in float64.

    float64 because the small singular values are the point: in float32 they drown in the
    rounding of the large ones sooner.
    """
    return torch.linalg.svdvals(matrix.double())


def energy(sigma: torch.Tensor) -> torch.Tensor:
    """Cumulative energy: entry k-1 is ``sum_{i<=k} σ_i² / sum_i σ_i²``, the fraction of ||ΔW||_F² in the top k.

    Shape (len(sigma),); it rises to 1 at the last entry. ``sigma`` sorted descending
    (``singular_spectrum``'s order).
    """
    squares = sigma.double() ** 2
    return torch.cumsum(squares, 0) / squares.sum()


def rank_for_energy(sigma: torch.Tensor, fraction: float = 0.9) -> int:
    """The smallest k whose top k singular values hold at least ``fraction`` of the energy."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    # A hair of tolerance: the last entry of energy() is 1 up to rounding, and must count as >= 1.
    return int((energy(sigma) < fraction - 1e-12).sum()) + 1


def eckart_young_error(sigma: torch.Tensor, r: int) -> float:
    """The relative error of the best rank-r approximation, from the singular values alone.

    Eckart-Young: the best rank-r approximation of M in the Frobenius norm is its truncated SVD
    M_r = U_r diag(σ_1..σ_r) V_rᵀ, and what it misses is the rest of the spectrum::

        ||M - M_r||_F / ||M||_F = sqrt(sum_{i>r} σ_i²) / sqrt(sum_i σ_i²)
    """
    squares = sigma.double() ** 2
    return math.sqrt(float(squares[r:].sum() / squares.sum()))


def low_rank_approximation(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """M_r = U_r diag(σ_1..σ_r) V_rᵀ, the best rank-r approximation of ``matrix`` (out, in); float64."""
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def gaussian_like(matrix: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random N(0, 1) matrix of ``matrix``'s shape: the reference with no structure at all.

    Its spectrum follows the Marchenko-Pastur law: it falls slowly, so a Gaussian (out, in)
    matrix needs a large share of its min(out, in) directions for 90% of its energy.
    """
    return torch.randn(matrix.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def full_rank_lora(base: nn.Linear, delta: torch.Tensor, alpha: float = 16.0) -> LoRALinear:
    """A LoRALinear on ``base`` at r = min(out, in) whose (alpha / r)·B·A equals ``delta`` (out, in).

    From the SVD ΔW = U diag(S) Vᵀ: A = sqrt(S) Vᵀ (r, in), B = U sqrt(S) · r / alpha (out, r).
    Any matrix has such a factorisation, so LoRA at full rank can express whatever full
    fine-tuning can; the bet is that a much smaller r suffices.
    """
    r = min(delta.shape)
    layer = LoRALinear(base, r=r, alpha=alpha, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    with torch.no_grad():
        layer.lora_A.weight.copy_(S.sqrt()[:, None] * Vh)
        layer.lora_B.weight.copy_(U * S.sqrt() / layer.scaling)
    return layer


# ---------------------------------------------------------------------------------------------
# 2. Do two LoRA ranks find the same directions: the subspace similarity of their A matrices.
# ---------------------------------------------------------------------------------------------


def right_singular_vectors(A: torch.Tensor) -> torch.Tensor:
    """U_A, the right-singular vectors of LoRA's A (r, in) as columns: shape (in, r), most important first.

    A maps the input to r numbers, so the directions it reads live in input space: these.
    """
    _, _, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return Vh.T


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """The LoRA paper's normalised subspace similarity (§7.2, eq. 4) of two A matrices, as a table.

    With U_1 (in, r1) and U_2 (in, r2) the right-singular vectors of A1 (r1, in) and A2 (r2, in),
    and U^i the first i columns::

        φ(A1, A2, i, j) = ||U_1^iᵀ U_2^j||_F² / min(i, j)

    Returned as a (r1, r2) tensor, entry [i-1, j-1] = φ(A1, A2, i, j). It lies in [0, 1]: 1 when
    the smaller of the two subspaces lies in the larger, 0 when they are orthogonal. Two random
    subspaces of an n-dimensional space give about max(i, j) / n.
    """
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 {tuple(A1.shape)} and A2 {tuple(A2.shape)} read different input sizes; "
                         "compare the A matrices of the same module")
    U1, U2 = right_singular_vectors(A1), right_singular_vectors(A2)
    overlaps = (U1.T @ U2) ** 2  # (r1, r2): squared cosines between single directions
    # ||U_1^iᵀ U_2^j||_F² sums the top-left i x j block; a 2-D cumulative sum gives every block at once.
    blocks = overlaps.cumsum(0).cumsum(1)
    i = torch.arange(1, U1.shape[1] + 1, dtype=torch.float64)
    j = torch.arange(1, U2.shape[1] + 1, dtype=torch.float64)
    return blocks / torch.minimum(i[:, None], j[None, :])


# ---------------------------------------------------------------------------------------------
# 3. Does ΔW amplify what W already has: W seen through ΔW's top directions.
# ---------------------------------------------------------------------------------------------


def top_singular_vectors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)``: the top-r left (out, r) and right (in, r) singular vectors of ``matrix`` (out, in); float64."""
    U, _, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return U[:, :r], Vh[:r].T


def random_orthonormal(n: int, r: int, seed: int = 0) -> torch.Tensor:
    """r random orthonormal columns in n dimensions, shape (n, r): the Q of a Gaussian matrix's QR."""
    Q, _ = torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return Q


def projection_norm(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||Uᵀ W V||_F: how much of W (out, in) lies in the directions U (out, r), V (in, r). (r, r) inside."""
    return float(torch.linalg.matrix_norm(U.T @ weight.double() @ V))


def amplification_factor(delta: torch.Tensor, weight: torch.Tensor, r: int) -> float:
    """The LoRA paper's amplification factor (§7.3): ``||ΔW||_F / ||Uᵀ W V||_F``.

    U (out, r) and V (in, r) are the top-r left and right singular vectors of ΔW (out, in), so
    Uᵀ W V (r, r) is the part of the pretrained W (out, in) that lies in ΔW's own directions.
    (The paper writes ``UᵀWVᵀ``, its V being our Vᵀ.) A large factor: ΔW strongly amplifies
    directions that W holds only weakly. A ΔW made of W's own top-r part gives exactly 1.
    """
    U, V = top_singular_vectors(delta, r)
    return float(torch.linalg.matrix_norm(delta.double())) / projection_norm(weight, U, V)


def amplification_row(delta: torch.Tensor, weight: torch.Tensor, r: int, seed: int = 0) -> dict:
    """Table 7 of the paper for one module: ||Uᵀ W V||_F for U, V from ΔW, from W itself, and random; the norms."""
    U_delta, V_delta = top_singular_vectors(delta, r)
    U_w, V_w = top_singular_vectors(weight, r)
    out, inputs = weight.shape
    return {
        "projection_delta": projection_norm(weight, U_delta, V_delta),
        "projection_w": projection_norm(weight, U_w, V_w),
        "projection_random": projection_norm(weight, random_orthonormal(out, r, seed),
                                             random_orthonormal(inputs, r, seed + 1)),
        "w_norm": float(torch.linalg.matrix_norm(weight.double())),
        "delta_norm": float(torch.linalg.matrix_norm(delta.double())),
        "amplification": amplification_factor(delta, weight, r),
    }
