"""The arithmetic of ``experiments/spectrum.py`` (is ΔW low-rank?), each function against its definition."""

import math

import pytest
import torch
from torch import nn

from experiments.spectrum import (
    amplification_factor,
    amplification_row,
    eckart_young_error,
    energy,
    full_rank_lora,
    gaussian_like,
    low_rank_approximation,
    random_orthonormal,
    rank_for_energy,
    right_singular_vectors,
    singular_spectrum,
    subspace_similarity,
    top_singular_vectors,
)


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def matrix_of_rank(r, out=20, inputs=30, seed=0):
    return seeded(out, r, seed=seed) @ seeded(r, inputs, seed=seed + 1)


def test_singular_spectrum_is_descending_and_its_squares_sum_to_the_frobenius_norm_squared():
    M = seeded(12, 7)
    sigma = singular_spectrum(M)
    assert sigma.shape == (7,)
    assert bool((sigma[:-1] >= sigma[1:]).all())
    torch.testing.assert_close((sigma ** 2).sum(), torch.linalg.matrix_norm(M) ** 2)


def test_energy_is_the_cumulative_share_of_the_squared_singular_values():
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(energy(sigma), torch.tensor([9.0, 13.0, 14.0], dtype=torch.float64) / 14)


def test_rank_for_energy_is_the_smallest_k_reaching_the_fraction():
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)  # energies 9/14 = 0.64, 13/14 = 0.93, 1
    assert [rank_for_energy(sigma, f) for f in (0.5, 9 / 14, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 3]


def test_a_rank_r_matrix_holds_all_its_energy_in_r_singular_values():
    assert rank_for_energy(singular_spectrum(matrix_of_rank(3)), 1.0) == 3


@pytest.mark.parametrize("r", [0, 1, 4, 7])
def test_eckart_young_error_equals_the_norm_of_the_truncation_residual(r):
    M = seeded(12, 7)
    residual = torch.linalg.matrix_norm(M - low_rank_approximation(M, r)) / torch.linalg.matrix_norm(M)
    torch.testing.assert_close(torch.tensor(eckart_young_error(singular_spectrum(M), r), dtype=torch.float64), residual)


def test_the_truncated_svd_beats_another_rank_r_approximation():
    """Eckart-Young's other half: no rank-r matrix is closer; here, a random rank-2 one and a rank-2 projection."""
    M = seeded(12, 7)
    best = torch.linalg.matrix_norm(M - low_rank_approximation(M, 2))
    Q = random_orthonormal(12, 2, seed=3)
    for other in (matrix_of_rank(2, 12, 7, seed=5), Q @ Q.T @ M):
        assert best < torch.linalg.matrix_norm(M - other)


def test_a_rank_r_matrix_is_recovered_exactly_at_rank_r():
    M = matrix_of_rank(3)
    assert eckart_young_error(singular_spectrum(M), 3) < 1e-7
    torch.testing.assert_close(low_rank_approximation(M, 3), M)


def test_a_gaussian_matrix_needs_most_of_its_directions_for_90_percent_energy():
    """The reference the report sets ΔW against: no low-rank structure, so no small r holds it."""
    sigma = singular_spectrum(gaussian_like(torch.empty(576, 192)))
    assert rank_for_energy(sigma, 0.9) > 192 // 2
    assert eckart_young_error(sigma, 8) > 0.9


def test_subspace_similarity_of_a_matrix_with_itself_is_1_on_the_diagonal():
    A = seeded(8, 40)
    phi = subspace_similarity(A, A)
    torch.testing.assert_close(phi.diagonal(), torch.ones(8, dtype=torch.float64))


def test_subspace_similarity_is_1_when_the_smaller_subspace_lies_in_the_larger():
    A_big = seeded(16, 40)
    A_small = seeded(4, 16, seed=1) @ A_big  # rows in the row space of A_big: its 4 directions lie in A_big's 16
    phi = subspace_similarity(A_small, A_big)
    torch.testing.assert_close(phi[:, -1], torch.ones(4, dtype=torch.float64))


def test_subspace_similarity_with_an_orthogonal_complement_is_0():
    A = seeded(5, 40)
    basis = right_singular_vectors(seeded(40, 40, seed=1))  # 40 orthonormal directions
    inside, outside = basis[:, :5].T, basis[:, 5:].T  # A's directions, and the 35 orthogonal to them
    A = seeded(5, 5, seed=2) @ inside
    torch.testing.assert_close(subspace_similarity(A, outside), torch.zeros(5, 35, dtype=torch.float64))


def test_subspace_similarity_is_symmetric_and_between_0_and_1():
    A1, A2 = seeded(8, 40), seeded(32, 40, seed=1)
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (8, 32)
    torch.testing.assert_close(subspace_similarity(A2, A1), phi.T)
    assert bool((phi >= 0).all()) and bool((phi <= 1 + 1e-12).all())


def test_subspace_similarity_matches_eq_4_written_out():
    A1, A2 = seeded(4, 20), seeded(6, 20, seed=1)
    U1, U2 = right_singular_vectors(A1), right_singular_vectors(A2)
    expected = torch.tensor([[float(torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j))
                              for j in range(1, 7)] for i in range(1, 5)], dtype=torch.float64)
    torch.testing.assert_close(subspace_similarity(A1, A2), expected)


def test_subspace_similarity_refuses_a_matrices_of_different_modules():
    with pytest.raises(ValueError, match="same module"):
        subspace_similarity(seeded(4, 20), seeded(4, 21))


def test_amplification_factor_of_w_own_top_r_part_is_1():
    """ΔW = W_r: its singular vectors are W's own, and UᵀWV = diag(σ_1..σ_r), whose norm is ||W_r||_F."""
    W = seeded(20, 30)
    torch.testing.assert_close(amplification_factor(low_rank_approximation(W, 4), W, 4), 1.0)


def test_amplification_factor_is_the_norm_ratio_written_out():
    W, delta = seeded(20, 30), 0.01 * matrix_of_rank(4, seed=7)
    U, V = top_singular_vectors(delta, 4)
    expected = float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(U.T @ W @ V))
    torch.testing.assert_close(amplification_factor(delta, W, 4), expected)


def test_w_own_directions_hold_more_of_w_than_random_ones():
    row = amplification_row(0.01 * matrix_of_rank(4, seed=7), seeded(20, 30), 4)
    assert row["projection_w"] > row["projection_random"]
    top4 = singular_spectrum(seeded(20, 30))[:4]
    torch.testing.assert_close(row["projection_w"], math.sqrt(float((top4 ** 2).sum())))  # ||diag(σ_1..σ_4)||_F


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_full_rank_lora_reproduces_any_delta_w(shape):
    base = nn.Linear(shape[1], shape[0], dtype=torch.float64)
    delta = seeded(*shape)
    layer = full_rank_lora(base, delta, alpha=16.0)
    assert layer.r == min(shape)
    torch.testing.assert_close(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight, delta)
    x = seeded(3, shape[1], seed=1)
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T)
