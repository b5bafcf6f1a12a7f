"""Forecasts that need no language model: the bars an LLM forecast is measured against.

Each takes a context ``(n_steps, n_vars)`` in the original units and returns ``horizon`` steps.
From least to most knowledge:

- **persistence**: the last value, repeated. Knows nothing.
- **linear extrapolation**: a least-squares line through the last few steps. Knows that the
  series is smooth.
- **autoregression** (VAR(p)): each step a linear function of the p before it, fitted to the
  context by least squares, both variables jointly, its order p chosen by BIC. Knows no physics,
  but learns the system's own rhythm from its context; its residuals give a distribution, so it
  is scored as the LLM's samples are (CRPS, coverage).
- **the physics fit**: the Lotka-Volterra equations themselves, their four parameters and the
  starting state fitted to the context by least squares, then integrated forward. Knows the
  equations that made the data. On noise-free series it is the physical limit, almost exact;
  no method that learns from data should be expected to reach it.
"""

import numpy as np

from data.lotka_volterra import DT, SUBSTEPS, integrate

LINEAR_WINDOW = 5  # context steps the linear baseline fits; few enough to follow the current trend
MAX_AR_ORDER = 8  # the largest p BIC considers: 2 x (1 + 2 p) = 34 coefficients from a 50-step context
FIT_ITERATIONS = 50  # Levenberg-Marquardt steps of the physics fit; it stops earlier once it no longer improves


def persistence(context: np.ndarray, horizon: int) -> np.ndarray:
    """The last value of ``context (n_steps, n_vars)``, repeated ``horizon`` times: ``(horizon, n_vars)``."""
    return np.repeat(context[-1:], horizon, axis=0)


def linear_extrapolation(context: np.ndarray, horizon: int, window: int = LINEAR_WINDOW) -> np.ndarray:
    """A least-squares line through the last ``window`` context steps, per variable, continued ``horizon`` steps."""
    recent = context[-window:]
    t = np.arange(len(recent))
    slope, intercept = np.polyfit(t, recent, deg=1)  # one column per variable
    future = np.arange(len(recent), len(recent) + horizon)[:, None]
    return intercept + slope * future


# --- Autoregression ----------------------------------------------------------------------------------------------


def lagged(series: np.ndarray, p: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """``(X, Y)`` for regressing each step from ``start`` on: Y[t] = y_t, X[t] = [1, y_{t-1}, ..., y_{t-p}].

    Shapes: ``series (n, d)`` -> X ``(n - start, 1 + p d)``, Y ``(n - start, d)``; ``start >= p``.
    """
    rows = range(start, len(series))
    X = np.array([np.concatenate([[1.0], *(series[t - lag] for lag in range(1, p + 1))]) for t in rows])
    return X, series[start:]


def fit_var(series: np.ndarray, p: int, start: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares VAR(p): ``y_t = c + A_1 y_{t-1} + ... + A_p y_{t-p} + e_t``; returns ``(coefficients, residuals)``.

    ``coefficients`` is ``(1 + p d, d)``: row 0 is c, rows ``1 + (k-1) d`` to ``k d`` are A_kᵀ. The
    residuals are those of the steps from ``start`` (default p) on, ``(n - start, d)``.
    """
    X, Y = lagged(series, p, p if start is None else start)
    coefficients, *_ = np.linalg.lstsq(X, Y, rcond=None)
    return coefficients, Y - X @ coefficients


def bic(residuals: np.ndarray, n_coefficients: int) -> float:
    """The Bayesian information criterion of a Gaussian VAR: ``n ln det(Σ) + k ln n``.

    Σ is the residuals' maximum-likelihood covariance, n their count, k the coefficients'.
    """
    n = len(residuals)
    covariance = residuals.T @ residuals / n
    sign, log_det = np.linalg.slogdet(covariance)
    log_det = log_det if sign > 0 else -np.inf  # a perfect fit: no order beats it
    return float(n * log_det + n_coefficients * np.log(n))


def var_order(series: np.ndarray, max_order: int = MAX_AR_ORDER) -> int:
    """The order p in 1..max_order with the lowest BIC, every p scored on the same steps (those after max_order).

    The order is capped so that each regression keeps more steps than coefficients.
    """
    n, d = series.shape
    max_order = max(1, min(max_order, (n - 2) // (d + 1)))
    scores = [bic(fit_var(series, p, start=max_order)[1], d * (1 + p * d)) for p in range(1, max_order + 1)]
    return 1 + int(np.argmin(scores))


def var_forecast(series: np.ndarray, coefficients: np.ndarray, horizon: int, innovations: np.ndarray | None = None):
    """Continue ``series`` ``horizon`` steps with the VAR ``coefficients``, adding ``innovations[h]`` at step h.

    Without innovations it is the point forecast (the conditional mean). With innovations of shape
    ``(samples, horizon, d)`` it is one sample path per row: ``(samples, horizon, d)``.
    """
    d = series.shape[1]
    p = (len(coefficients) - 1) // d
    paths = np.zeros((1, horizon, d)) if innovations is None else innovations
    history = np.repeat(series[None, -p:], len(paths), axis=0)  # (samples, p, d), oldest first
    out = np.empty_like(paths)
    for h in range(horizon):
        X = np.concatenate([np.ones((len(paths), 1)), history[:, ::-1].reshape(len(paths), -1)], axis=1)
        out[:, h] = X @ coefficients + paths[:, h]
        history = np.concatenate([history[:, 1:], out[:, h : h + 1]], axis=1)
    return out[0] if innovations is None else out


def autoregression(context: np.ndarray, horizon: int, samples: int = 0,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The VAR(p) forecast of ``context``, p by BIC: ``(point (horizon, d), sample paths (samples, horizon, d))``.

    The sample paths add Gaussian innovations with the residuals' covariance at every step (the
    coefficients' own uncertainty left out), drawn from ``seed``.
    """
    p = var_order(context)
    coefficients, residuals = fit_var(context, p)
    covariance = residuals.T @ residuals / len(residuals)
    rng = np.random.default_rng(seed)
    innovations = rng.multivariate_normal(np.zeros(context.shape[1]), covariance, size=(samples, horizon))
    paths = var_forecast(context, coefficients, horizon, innovations) if samples else innovations
    return var_forecast(context, coefficients, horizon), paths


# --- The physics fit ---------------------------------------------------------------------------------------------


def initial_guess(context: np.ndarray, dt: float = DT) -> np.ndarray:
    """``log (alpha, beta, delta, gamma, x0, y0)`` from a linear least-squares fit of the equations' log form.

    Dividing the equations by x and y makes them linear in the parameters, and integrating one
    sample interval (the trapezoid rule for the integral of y, and of x) gives::

        ln x_{i+1} - ln x_i = alpha dt - beta dt (y_i + y_{i+1}) / 2
        ln y_{i+1} - ln y_i = delta dt (x_i + x_{i+1}) / 2 - gamma dt

    two ordinary least-squares problems. The rates are clipped at 1e-3 (a log must exist).
    Shapes: ``context (n_steps, 2)`` -> ``(6,)``.
    """
    x, y = np.maximum(context[:, 0], 1e-9), np.maximum(context[:, 1], 1e-9)
    mean_x, mean_y = (x[:-1] + x[1:]) / 2, (y[:-1] + y[1:]) / 2
    ones = np.full(len(mean_x), dt)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([ones, -dt * mean_y], axis=1), np.diff(np.log(x)), rcond=None)
    (delta, gamma), *_ = np.linalg.lstsq(np.stack([dt * mean_x, -ones], axis=1), np.diff(np.log(y)), rcond=None)
    return np.log(np.concatenate([np.maximum([alpha, beta, delta, gamma], 1e-3), [x[0], y[0]]]))


def lotka_volterra_parameters(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(params (alpha, beta, delta, gamma), initial (x0, y0))`` of ``theta`` = their logarithms, as fitted.

    The fit works in logs so that the rates and the state stay positive; this reads its result in
    the units ``data.lotka_volterra.simulate`` draws them in, to compare a fit with the truth.

    Shapes: ``(..., 6)`` -> ``((..., 4), (..., 2))``.
    """
    values = np.exp(theta)
    return values[..., :4], values[..., 4:]


def trajectory(theta: np.ndarray, n_steps: int, dt: float = DT) -> np.ndarray:
    """The Lotka-Volterra series of ``theta`` = log (alpha, beta, delta, gamma, x0, y0).

    Shapes: ``(..., 6)`` -> ``(..., n_steps, 2)``.
    """
    shape = theta.shape[:-1]
    params, initial = lotka_volterra_parameters(theta.reshape(-1, 6))
    series = integrate(initial, params, n_steps, dt, SUBSTEPS)
    return series.reshape(*shape, n_steps, 2)


def fit_lotka_volterra(contexts: np.ndarray, dt: float = DT, iterations: int = FIT_ITERATIONS) -> np.ndarray:
    """Least squares of the Lotka-Volterra equations to each context: ``log (alpha, beta, delta, gamma, x0, y0)``.

    Minimizes the squared difference of the logarithms of the simulated series and the context
    (relative errors: a population of 20 and one of 1 weigh alike, and multiplicative noise is
    Gaussian there) by Levenberg-Marquardt from ``initial_guess``, with the Jacobian by finite
    differences. Every system is fitted at once: each step integrates all their trajectories
    (and the 6 shifted ones of each, for the Jacobian) as one batch. In logs the rates and the
    state stay positive. A system stops when a step no longer lowers its cost by a relative 1e-8.

    Shapes: ``contexts (n_steps, 2)`` or ``(n_systems, n_steps, 2)`` -> ``(6,)`` or ``(n_systems, 6)``.
    """
    single = contexts.ndim == 2
    contexts = contexts[None] if single else contexts
    n_systems, n_steps, _ = contexts.shape
    target = np.log(np.maximum(contexts, 1e-9)).reshape(n_systems, -1)

    def residuals(thetas: np.ndarray, systems: np.ndarray) -> np.ndarray:
        """Residuals of ``thetas (len(systems), k, 6)`` against their systems' contexts: ``(len(systems), k, 2 n)``."""
        with np.errstate(over="ignore", invalid="ignore"):
            simulated = trajectory(thetas, n_steps, dt).reshape(*thetas.shape[:2], -1)
            result = np.log(np.maximum(simulated, 1e-300)) - target[systems, None]
        return np.where(np.isfinite(result), result, 1e6)  # a trajectory that blew up costs a lot

    theta = np.stack([initial_guess(context, dt) for context in contexts])
    everyone = np.arange(n_systems)
    r = residuals(theta[:, None], everyone)[:, 0]
    cost = (r**2).sum(axis=1)
    damping = np.full(n_systems, 1e-3)
    active = everyone
    step = 1e-6
    for _ in range(iterations):
        if not len(active):
            break
        shifted = theta[active, None] + step * np.eye(6)  # (active, 6, 6): one parameter moved per row
        jacobian = ((residuals(shifted, active) - r[active, None]) / step).transpose(0, 2, 1)  # (active, 2n, 6)
        normal = jacobian.transpose(0, 2, 1) @ jacobian
        gradient = (jacobian.transpose(0, 2, 1) @ r[active, :, None])[..., 0]
        trying = np.ones(len(active), bool)  # systems still looking for a damping that lowers their cost
        candidate, r_candidate = theta[active].copy(), r[active].copy()
        while trying.any():
            index = np.flatnonzero(trying)
            scaled = np.diag(np.ones(6))[None] * (np.diagonal(normal[index], axis1=1, axis2=2) + 1e-12)[:, None]
            move = np.linalg.solve(normal[index] + damping[active[index], None, None] * scaled,
                                   gradient[index, :, None])[..., 0]
            candidate[index] = theta[active[index]] - move
            r_candidate[index] = residuals(candidate[index, None], active[index])[:, 0]
            lower = (r_candidate[index] ** 2).sum(axis=1) < cost[active[index]]
            trying[index[lower]] = False
            damping[active[index[~lower]]] *= 10
            trying &= damping[active] < 1e12  # no damping helps: a minimum
        new_cost = (r_candidate**2).sum(axis=1)
        better = new_cost < cost[active]
        improvement = np.where(better, cost[active] - new_cost, 0.0)
        accepted = active[better]
        theta[accepted], r[accepted], cost[accepted] = candidate[better], r_candidate[better], new_cost[better]
        damping[accepted] = np.maximum(damping[accepted] / 10, 1e-12)
        done = ~better | (improvement <= 1e-8 * cost[active]) | (cost[active] < 1e-24)
        active = active[~done]
    return theta[0] if single else theta


def physics_fit(contexts: np.ndarray, horizon: int, dt: float = DT) -> np.ndarray:
    """The fitted Lotka-Volterra systems integrated past their contexts, the physical limit.

    Shapes: ``contexts (n_steps, 2)`` or ``(n_systems, n_steps, 2)`` -> ``(horizon, 2)`` or ``(n_systems, horizon, 2)``.
    """
    theta = fit_lotka_volterra(contexts, dt)
    return trajectory(theta, contexts.shape[-2] + horizon, dt)[..., contexts.shape[-2]:, :]

