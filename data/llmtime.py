"""Numbers written as text, so a language model can forecast a time series by writing on.

An adaptation of LLMTIME (Gruver et al., 2023, "Large Language Models Are Zero-Shot Time Series
Forecasters"), which writes one variable at a time with a fixed number of digits, the decimal
point dropped, the digits spaced and " ," between time steps ("8 0 , 7 3 , 6 6"). This module
writes both populations of a step together and keeps the point, in three steps:

1. scale each variable so its values are small numbers (a ``Scaler``, fitted on the context
   only, never on the part to be forecast);
2. write the scaled values with a fixed number of decimals: ``,`` between the variables of one
   time step, ``;`` between time steps::

       prey, predator at t=0 ; at t=1         ->   "0.52,1.41;0.53,1.39"

3. let the model continue the text, read the numbers back, and undo the scaling (``decode``).

Digits need no spacing. GPT-3's tokenizer merges digit runs into tokens of uneven length
("1523" might be "152" + "3"), so LLMTIME wrote "1 5 2 3" to give every digit a token of its
own. The tokenizers of SmolLM2 (the embedded model; a test checks it) and of Qwen2.5 already
split every digit into its own token, so the spaces would only double the length of the text.
(Llama 3's tokenizer is different: it groups up to three digits into one token.)

Values are written with a fixed number of decimals, so a decoded value is within half a unit
of the last decimal of the scaled value: ``|decoded - x| <= 0.5 * 10**-decimals * scale``.
"""

import re
from dataclasses import dataclass

import numpy as np

METHODS = ("llmtime", "percentile")
# The "percentile" scaler maps the chosen percentile of |x| to this value, so most scaled values
# lie in about 0 to 10. With 2 decimals that keeps 3 significant digits for values above 1,
# where values below 1 would keep only 2 ("0.07"); aiming higher (100) would add a digit, a
# token, to every value.
PERCENTILE_TARGET = 10.0
# A decoded number: an optional minus sign, ASCII digits, and optionally a point and more digits.
# Stricter than float(), which also reads "nan", "1e5", "1_000" and non-ASCII digits.
NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


@dataclass(frozen=True, eq=False)
class Scaler:
    """A per-variable affine map ``z = (x - offset) / scale`` and its inverse ``x = z * scale + offset``.

    Shapes: ``offset``, ``scale`` are ``(n_vars,)``; ``transform`` and ``inverse_transform``
    take and return ``(..., n_vars)``.
    """

    offset: np.ndarray
    scale: np.ndarray

    @property
    def n_vars(self) -> int:
        return len(self.offset)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.offset) / self.scale

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.scale + self.offset


def fit_scaler(
    context: np.ndarray,
    method: str = "llmtime",
    alpha: float = 0.95,
    beta: float = 0.3,
    percentile: float = 90.0,
) -> Scaler:
    """Fit a ``Scaler`` to ``context``, per variable (its last axis). Pass the context only.

    ``method="llmtime"`` (the paper's)::

        offset = min - beta * (max - min)
        scale  = alpha-quantile of (x - offset)

    so the context's alpha-quantile becomes 1, and the margin beta below its minimum keeps a
    forecast that dips under the context positive (no "-" to write).

    ``method="percentile"`` (simpler, common with Qwen2.5)::

        offset = 0
        scale  = percentile-th percentile of |x| / PERCENTILE_TARGET

    so the 90th percentile of |x| becomes 10 (by default) and zero stays zero. The 90th rather
    than the maximum, so that one spike in the context does not squash all the other values.

    A variable whose scale comes out 0 (constant under "llmtime", all zeros under
    "percentile") gets scale 1 instead, so nothing is divided by zero.

    Args:
        context: ``(n_steps, n_vars)`` the values the model is shown; not the ones it forecasts,
            or the scale leaks their range.
        method: "llmtime" or "percentile".
        alpha: "llmtime" only; the quantile, in (0, 1], that is mapped to 1.
        beta: "llmtime" only; the margin below the minimum, as a fraction of max - min, >= 0.
        percentile: "percentile" only; the percentile of |x|, in (0, 100], mapped to PERCENTILE_TARGET.

    Raises:
        ValueError: an unknown method, alpha, beta or percentile out of range, a context that is
            not 2-D or has no time steps, or a NaN or infinity in it.
    """
    context = _check_series(context, "context")
    if method == "llmtime":
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1] (the quantile mapped to 1), got {alpha!r}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0 (the margin below the minimum), got {beta!r}")
        low, high = context.min(axis=0), context.max(axis=0)
        offset = low - beta * (high - low)
        scale = np.quantile(context - offset, alpha, axis=0)
    elif method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        offset = np.zeros(context.shape[1])
        scale = np.percentile(np.abs(context), percentile, axis=0) / PERCENTILE_TARGET
    else:
        raise ValueError(f"unknown scaling method {method!r}; choose one of {METHODS}")
    return Scaler(offset=offset, scale=np.where(scale > 0, scale, 1.0))


def encode(series: np.ndarray, scaler: Scaler, decimals: int = 2) -> str:
    """Scale ``series`` and write it as text: ``"0.52,1.41;0.53,1.39"``.

    Each value is ``scaler.transform(x)`` rounded to ``decimals`` places; ``,`` separates the
    variables of one time step and ``;`` the time steps, with no separator at the end (the
    model writes the ``;`` that starts the next step). Negative values get a leading ``-``.

    Shapes: ``series (n_steps, n_vars)`` with ``n_vars == scaler.n_vars`` -> one string.

    Raises:
        ValueError: ``series`` is not ``(n_steps, n_vars)``, holds a NaN or infinity (the first
            such time step is named), or ``decimals`` is not an integer >= 0.
    """
    series = _check_series(series, "series", scaler.n_vars)
    if not isinstance(decimals, (int, np.integer)) or isinstance(decimals, bool) or decimals < 0:
        raise ValueError(f"decimals must be an integer >= 0, got {decimals!r}")
    scaled = scaler.transform(series)
    return ";".join(",".join(_format(value, decimals) for value in step) for step in scaled)


def _format(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    # -0.001 rounds to "-0.00": write "0.00", the same number one token shorter.
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def decode(text: str, scaler: Scaler, n_vars: int | None = None) -> np.ndarray:
    """Read numbers written by ``encode`` (or generated by a model) back, and undo the scaling.

    Whitespace around the text and one trailing ``;`` are ignored. Reading stops at the first
    malformed time step (the wrong number of values, a value that is not a plain decimal
    number, an empty step, or a number too large to be finite once read or unscaled, such as
    400 nines), and the steps before it are returned: a model's generation may end mid-step or
    wander off, and the length of the result says how many steps were usable.

    Shapes: one string -> ``(n_parsed, n_vars)``, every value finite; ``(0, n_vars)`` when the
    first step is malformed.

    Args:
        text: e.g. ``"0.52,1.41;0.53,1.39;"``.
        scaler: the ``Scaler`` the text was encoded with.
        n_vars: values per time step; defaults to ``scaler.n_vars`` and must equal it.

    Raises:
        ValueError: ``n_vars`` differs from ``scaler.n_vars``.
    """
    if n_vars is None:
        n_vars = scaler.n_vars
    if n_vars != scaler.n_vars:
        raise ValueError(f"n_vars is {n_vars} but the scaler was fitted to {scaler.n_vars} variables")
    text = text.strip()
    if text.endswith(";"):
        text = text[:-1]
    steps = []
    for step in text.split(";"):
        values = step.split(",")
        if len(values) != n_vars or not all(NUMBER.fullmatch(value) for value in values):
            break
        steps.append([float(value) for value in values])
    with np.errstate(over="ignore"):  # a value too large for float64 is inf; the steps from it on are cut below
        series = scaler.inverse_transform(np.array(steps, dtype=np.float64).reshape(len(steps), n_vars))
    finite = np.isfinite(series).all(axis=1)
    return series[: len(series) if finite.all() else int(np.argmin(finite))]


def _check_series(series, name: str, n_vars: int | None = None) -> np.ndarray:
    """``series`` as a float64 ``(n_steps, n_vars)`` array; a one-line ValueError naming what is wrong."""
    series = np.asarray(series, dtype=np.float64)
    if series.ndim != 2 or series.shape[0] == 0:
        raise ValueError(f"{name} must be (n_steps, n_vars) with n_steps >= 1, got shape {series.shape}; "
                         "for one variable use x.reshape(-1, 1)")
    if n_vars is not None and series.shape[1] != n_vars:
        raise ValueError(f"{name} has {series.shape[1]} variables but the scaler was fitted to {n_vars}")
    finite = np.isfinite(series).all(axis=1)
    if not finite.all():
        step = int(np.argmin(finite))
        raise ValueError(f"{name} has a non-finite value at time step {step}: {series[step].tolist()}")
    return series
