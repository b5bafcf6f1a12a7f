"""Predator-prey time series from the Lotka-Volterra equations, the data the LLM learns to forecast.

Prey x grow on their own and are eaten; predators y starve on their own and grow by eating::

    dx/dt = alpha x - beta x y          (prey)
    dy/dt = delta x y - gamma y         (predator)

The populations cycle around the equilibrium (x*, y*) = (gamma / delta, alpha / beta), and each
trajectory keeps one quantity exactly constant::

    V = delta x - gamma ln x + beta y - alpha ln y

so a simulation can be checked without a reference solver: if V drifts, the integrator is wrong
or its step too coarse.

The dataset has the shape of the source material, 1,000 systems of 100 time points, each system
with its own (alpha, beta, delta, gamma) and starting point. It is split *by system* into
train/validation/test (80/10/10), so the model is never trained on any part of a test system.

Real counts are noisy. ``create_dataset(noise=0.05)`` observes each value with multiplicative
log-normal noise, ``x * exp(0.05 z)`` with z ~ N(0, 1) drawn afresh for every value (about 5%
either way; a population stays positive, and a large one is as uncertain, relatively, as a
small one). The dataset keeps both: ``series`` is what is observed, ``clean`` the solution of
the equations, so a forecast can be scored against what a user would have and against the truth.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora.atomic import write_atomically

# Time between samples and RK4 steps per sample: 10 steps of 0.02 keep the drift of V below
# about 1e-9 of its terms; one step of 0.2 already drifts 10,000 times more.
DT = 0.2
SUBSTEPS = 10

# Ranges of the uniform draws. The period of small cycles is 2 pi / sqrt(alpha gamma), 6 to 13
# time units for alpha, gamma in [0.5, 1]; 100 samples 0.2 apart (20 time units) show one to
# three cycles. beta, delta in [0.1, 0.3] put the equilibrium x* = gamma / delta and
# y* = alpha / beta between 1.7 and 10, and starting each population at 0.5 to 1.5 times its
# equilibrium keeps the cycles moderate: the populations stay between about 0.6 and 20.
RATE_RANGE = (0.5, 1.0)  # alpha and gamma: prey growth, predator death
INTERACTION_RANGE = (0.1, 0.3)  # beta and delta: predation, predator growth per prey eaten
START_RANGE = (0.5, 1.5)  # x(0) / x* and y(0) / y*

N_SYSTEMS = 1000
N_STEPS = 100
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# The split shuffles with the random stream of seed [seed, SPLIT_STREAM], not of seed, so which
# system lands in which split does not reuse the random numbers that drew its parameters.
SPLIT_STREAM = 1
NOISE_STREAM = 2  # the observation noise's stream, [seed, NOISE_STREAM]: adding noise changes no other draw
ARRAYS = ("times", "series", "params", *(f"split_{name}" for name in SPLITS))
NOISY_ARRAYS = ("clean", "noise")  # written only for a noisy dataset; a file without them is noise-free


def derivatives(state: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The right-hand side (dx/dt, dy/dt) = (alpha x - beta x y, delta x y - gamma y).

    Shapes: ``state (..., 2)`` as (x, y), ``params (..., 4)`` as (alpha, beta, delta, gamma) -> ``(..., 2)``.
    """
    x, y = state[..., 0], state[..., 1]
    alpha, beta, delta, gamma = np.moveaxis(params, -1, 0)
    return np.stack([alpha * x - beta * x * y, delta * x * y - gamma * y], axis=-1)


def rk4_step(f: Callable[[np.ndarray], np.ndarray], state: np.ndarray, h: float) -> np.ndarray:
    """One classic Runge-Kutta step of size h for ds/dt = f(s); the error per step is O(h^5)::

        k1 = f(s), k2 = f(s + h/2 k1), k3 = f(s + h/2 k2), k4 = f(s + h k3)
        s(t + h) = s + h/6 (k1 + 2 k2 + 2 k3 + k4)
    """
    k1 = f(state)
    k2 = f(state + h / 2 * k1)
    k3 = f(state + h / 2 * k2)
    k4 = f(state + h * k3)
    return state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def integrate(initial: np.ndarray, params: np.ndarray, n_steps: int, dt: float = DT, substeps: int = SUBSTEPS):
    """Sample every system at times 0, dt, ..., (n_steps - 1) dt, with ``substeps`` RK4 steps per dt.

    All systems advance together (one array operation per RK4 stage), so the only Python loop
    is over time.

    Shapes: ``initial (n_systems, 2)``, ``params (n_systems, 4)`` -> ``(n_systems, n_steps, 2)``.
    """
    def f(state):
        return derivatives(state, params)

    h = dt / substeps
    series = np.empty((initial.shape[0], n_steps, 2))
    series[:, 0] = state = initial
    for step in range(1, n_steps):
        for _ in range(substeps):
            state = rk4_step(f, state, h)
        series[:, step] = state
    return series


def simulate(n_systems: int, n_steps: int, dt: float = DT, seed: int = 0, substeps: int = SUBSTEPS):
    """``(times, series, params)`` for ``n_systems`` random predator-prey systems; the same seed gives the same arrays.

    Each system draws alpha, gamma from ``RATE_RANGE``, beta, delta from ``INTERACTION_RANGE``,
    and starts at ``START_RANGE`` times its equilibrium, all uniformly.

    Shapes: ``times (n_steps,)``, ``series (n_systems, n_steps, 2)`` with ``[..., 0]`` the prey
    and ``[..., 1]`` the predator, ``params (n_systems, 4)`` with columns alpha, beta, delta, gamma.

    Raises:
        ValueError: n_systems < 1, n_steps < 2, dt <= 0, or substeps < 1.
    """
    _check_count("n_systems", n_systems, 1)
    _check_count("n_steps", n_steps, 2)
    _check_count("substeps", substeps, 1)
    if not (isinstance(dt, (int, float, np.floating)) and np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0 (the time between samples), got {dt!r}")

    rng = np.random.default_rng(seed)
    alpha, gamma = rng.uniform(*RATE_RANGE, size=(2, n_systems))
    beta, delta = rng.uniform(*INTERACTION_RANGE, size=(2, n_systems))
    params = np.stack([alpha, beta, delta, gamma], axis=1)
    equilibrium = np.stack([gamma / delta, alpha / beta], axis=1)
    initial = equilibrium * rng.uniform(*START_RANGE, size=(n_systems, 2))
    times = np.arange(n_steps) * float(dt)
    return times, integrate(initial, params, n_steps, float(dt), substeps), params


def observe(series: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    """``series`` as observed with multiplicative log-normal noise: ``series * exp(noise * z)``, z ~ N(0, 1).

    One z per value, from the random stream ``[seed, NOISE_STREAM]``; ``noise = 0`` returns a
    copy of ``series``. ``noise = 0.05`` is about 5% either way.

    Raises:
        ValueError: ``noise`` is negative or not finite.
    """
    check_noise(noise)
    if noise == 0:
        return series.copy()
    z = np.random.default_rng([seed, NOISE_STREAM]).standard_normal(series.shape)
    return series * np.exp(noise * z)


def check_noise(noise) -> None:
    """Raise unless ``noise`` is a finite number >= 0 (the standard deviation of the log of the noise factor)."""
    if not (isinstance(noise, (int, float, np.floating)) and not isinstance(noise, bool) and np.isfinite(noise)
            and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0 (0.05: about 5% observation noise), got {noise!r}")


def _check_count(name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def conserved_quantity(series: np.ndarray, params: np.ndarray) -> np.ndarray:
    """V = delta x - gamma ln x + beta y - alpha ln y at every time step; constant along a true trajectory.

    (dV/dt = (delta - gamma / x) dx/dt + (beta - alpha / y) dy/dt, which is zero by the equations.)

    Shapes: ``series (n_systems, n_steps, 2)``, ``params (n_systems, 4)`` -> ``(n_systems, n_steps)``.
    """
    x, y = series[..., 0], series[..., 1]
    alpha, beta, delta, gamma = (column[:, None] for column in params.T)
    return delta * x - gamma * np.log(x) + beta * y - alpha * np.log(y)


def split_systems(n_systems: int, fractions=SPLIT_FRACTIONS, seed: int = 0) -> dict[str, np.ndarray]:
    """Deal the system indices 0..n_systems-1 into ``SPLITS`` by a seeded permutation.

    Split sizes are ``round(fraction * n_systems)`` for train and validation, and the rest for
    test. Each split's indices are sorted, so the order of systems within a split is the order
    in which they were simulated.

    Raises:
        ValueError: ``fractions`` are not three numbers >= 0 that sum to 1.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (len(SPLITS),) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be {len(SPLITS)} numbers >= 0 for {SPLITS} summing to 1, got {fractions}")
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n_systems)
    n_train, n_validation = (round(fraction * n_systems) for fraction in fractions[:2])
    n_validation = min(n_validation, n_systems - n_train)
    bounds = np.cumsum([0, n_train, n_validation, n_systems - n_train - n_validation])
    return {name: np.sort(order[start:stop]) for name, start, stop in zip(SPLITS, bounds[:-1], bounds[1:])}


@dataclass(eq=False)
class LotkaVolterraData:
    """Simulated systems and their split into train/validation/test.

    Attributes:
        times: ``(n_steps,)`` sample times.
        series: ``(n_systems, n_steps, 2)`` populations as observed, ``[..., 0]`` prey and ``[..., 1]`` predator.
        params: ``(n_systems, 4)`` columns alpha, beta, delta, gamma.
        splits: split name -> sorted indices of its systems; together they hold every system once.
        clean: the populations without observation noise; None when there is none (then ``series``).
        noise: the observation noise (``observe``); 0 for noise-free series.
    """

    times: np.ndarray
    series: np.ndarray
    params: np.ndarray
    splits: dict[str, np.ndarray]
    clean: np.ndarray | None = None
    noise: float = 0.0

    def split(self, name: str, clean: bool = False) -> np.ndarray:
        """The series of one split's systems, ``(n_in_split, n_steps, 2)``: as observed, or ``clean``."""
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; the splits are {list(self.splits)}")
        series = self.clean if clean and self.clean is not None else self.series
        return series[self.splits[name]]


def create_dataset(
    n_systems: int = N_SYSTEMS,
    n_steps: int = N_STEPS,
    seed: int = 0,
    dt: float = DT,
    fractions=SPLIT_FRACTIONS,
    noise: float = 0.0,
) -> LotkaVolterraData:
    """Simulate ``n_systems`` systems and split them by system; the same arguments give the same bytes.

    ``noise`` > 0 observes them with multiplicative log-normal noise (``observe``); the systems,
    their split and the clean series are those of ``noise = 0``.
    """
    check_noise(noise)
    times, series, params = simulate(n_systems, n_steps, dt=dt, seed=seed)
    splits = split_systems(n_systems, fractions, seed)
    if noise == 0:
        return LotkaVolterraData(times, series, params, splits)
    return LotkaVolterraData(times, observe(series, noise, seed), params, splits, clean=series, noise=float(noise))


def save_dataset(data: LotkaVolterraData, path: str | os.PathLike) -> Path:
    """Write ``data`` to one ``.npz`` file at ``path`` (its folder created if needed); return the path.

    The write is atomic: a crash leaves the old file or the new one, never half of one.
    """
    path = Path(path)
    arrays = {"times": data.times, "series": data.series, "params": data.params}
    arrays.update({f"split_{name}": indices for name, indices in data.splits.items()})
    if data.clean is not None:
        arrays.update(clean=data.clean, noise=np.array(data.noise))
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary: Path) -> None:
        # Through a file object: given a name, np.savez would append ".npz" to the temporary one.
        with open(temporary, "wb") as file:
            np.savez(file, **arrays)

    write_atomically(path, write)
    return path


def load_dataset(path: str | os.PathLike) -> LotkaVolterraData:
    """Read a dataset written by ``save_dataset``; nothing is unpickled.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an ``.npz`` archive, lacks one of ``ARRAYS``, its arrays'
            shapes disagree, or its splits do not hold every system exactly once.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; write it with save_dataset(create_dataset(), path)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        # numpy reads a file that is not .npy/.npz as a pickle, and refuses: say what the file should be.
        raise ValueError(f"{path}: not a readable .npz file; series data is the .npz that save_dataset writes "
                         "(instruction data, .json or .jsonl, is for the instruct task)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, not the .npz archive that save_dataset writes")
    with archive:
        for name in ARRAYS:
            if name not in archive.files:
                raise ValueError(f"{path}: array {name!r} is missing; the file holds {archive.files}")
        try:
            arrays = {name: archive[name] for name in (*ARRAYS, *NOISY_ARRAYS) if name in archive.files}
        except ValueError as error:  # an object array, which would need unpickling
            raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    series = arrays["series"]
    if series.ndim != 3 or series.shape[2] != 2:
        raise ValueError(f"{path}: array 'series' has shape {series.shape}, expected (n_systems, n_steps, 2)")
    n_systems, n_steps, _ = series.shape
    for name, shape in (("times", (n_steps,)), ("params", (n_systems, 4))):
        if arrays[name].shape != shape:
            raise ValueError(f"{path}: array {name!r} has shape {arrays[name].shape}, expected {shape}")
    splits = {name: arrays[f"split_{name}"] for name in SPLITS}
    every_system = np.sort(np.concatenate(list(splits.values())))
    if not np.array_equal(every_system, np.arange(n_systems)):
        raise ValueError(f"{path}: the split_* arrays must hold each system index 0..{n_systems - 1} exactly once")
    if ("clean" in arrays) != ("noise" in arrays) or ("clean" in arrays and arrays["clean"].shape != series.shape):
        raise ValueError(f"{path}: a noisy dataset holds 'clean' of the shape of 'series' {series.shape} and 'noise'; "
                         "write it with save_dataset")
    noise = float(arrays["noise"]) if "noise" in arrays else 0.0
    return LotkaVolterraData(arrays["times"], series, arrays["params"], splits, arrays.get("clean"), noise)
