"""The forecasting baselines: persistence and a line exactly, the autoregression's and the physics fit's recovery."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from data.lotka_volterra import simulate
from eval.baselines import (
    autoregression,
    fit_lotka_volterra,
    fit_var,
    linear_extrapolation,
    lotka_volterra_parameters,
    persistence,
    physics_fit,
    var_forecast,
    var_order,
)


def test_persistence_repeats_the_last_value():
    context = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert_allclose(persistence(context, 3), [[3.0, 4.0]] * 3)


def test_linear_extrapolation_continues_a_straight_line_exactly():
    t = np.arange(20.0)
    context = np.stack([2.0 + 0.5 * t, 10.0 - 0.25 * t], axis=1)
    future = np.arange(20.0, 26.0)
    assert_allclose(linear_extrapolation(context, 6), np.stack([2.0 + 0.5 * future, 10.0 - 0.25 * future], axis=1))


def simulated_var2(n_steps=20000, seed=0):
    """A bivariate VAR(2) with known intercept and coefficients, and Gaussian noise of 0.1."""
    c, A1, A2 = np.array([1.0, -0.5]), np.array([[0.5, 0.1], [-0.2, 0.3]]), np.array([[0.2, 0.0], [0.1, -0.2]])
    rng = np.random.default_rng(seed)
    y = np.zeros((n_steps, 2))
    for t in range(2, n_steps):
        y[t] = c + A1 @ y[t - 1] + A2 @ y[t - 2] + rng.normal(0, 0.1, 2)
    return y, c, A1, A2


def test_the_ar_fit_recovers_a_simulated_ar2s_order_and_coefficients():
    y, c, A1, A2 = simulated_var2()
    assert var_order(y) == 2
    coefficients, residuals = fit_var(y, 2)
    assert_allclose(coefficients[1:3].T, A1, atol=0.03)  # rows 1-2: A_1 transposed
    assert_allclose(coefficients[3:5].T, A2, atol=0.03)
    assert_allclose(coefficients[0], c, atol=0.06)
    assert_allclose(residuals.std(axis=0), [0.1, 0.1], rtol=0.03)


def test_the_point_forecast_continues_the_recursion_without_noise():
    y, c, A1, A2 = simulated_var2(n_steps=50)
    coefficients = np.concatenate([c[None], A1.T, A2.T])
    forecast = var_forecast(y, coefficients, 3)
    history = list(y[-2:])
    for step in range(3):
        history.append(c + A1 @ history[-1] + A2 @ history[-2])
        assert_allclose(forecast[step], history[-1], rtol=1e-12)


def test_autoregression_sample_paths_spread_around_its_point_forecast():
    context = simulated_var2(n_steps=200)[0]  # noise 0.1: a spread well above float rounding
    point, paths = autoregression(context, 10, samples=4000, seed=0)
    assert paths.shape == (4000, 10, 2)
    assert_allclose(paths.mean(axis=0), point, atol=5 * paths.std(axis=0).max() / np.sqrt(4000))


def test_the_physics_fit_recovers_known_parameters_from_a_clean_simulated_context():
    _, series, params = simulate(3, 60, seed=1)
    for system in range(3):
        fitted, start = lotka_volterra_parameters(fit_lotka_volterra(series[system, :50]))
        assert_allclose(fitted, params[system], rtol=1e-6)
        assert_allclose(start, series[system, 0], rtol=1e-6)
        assert_allclose(physics_fit(series[system, :50], 10), series[system, 50:60], rtol=1e-6)


def test_fitting_systems_together_equals_fitting_each_alone():
    _, series, _ = simulate(4, 50, seed=3)
    together = fit_lotka_volterra(series)
    for system in range(4):
        assert_allclose(together[system], fit_lotka_volterra(series[system]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_physics_fit_starts_from_the_linear_fit_of_the_log_equations_and_improves_it(seed):
    from eval.baselines import initial_guess, trajectory

    context = simulate(1, 50, seed=seed)[1][0]
    guess, fitted = initial_guess(context), fit_lotka_volterra(context)
    error = {name: np.abs(np.log(trajectory(theta, 50)) - np.log(context)).max()
             for name, theta in (("guess", guess), ("fitted", fitted))}
    assert error["fitted"] < 1e-9 < error["guess"] < 0.1
