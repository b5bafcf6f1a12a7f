"""Lotka-Volterra series: RK4 solves the equations, V stays constant, seeded and split by system, exact on disk."""

import numpy as np
import pytest

from data import lotka_volterra as lv
from data.lotka_volterra import (
    conserved_quantity,
    create_dataset,
    integrate,
    load_dataset,
    observe,
    rk4_step,
    save_dataset,
    simulate,
    split_systems,
)

# V may be close to 0 when its terms cancel, so its drift is measured against the size of its terms.
DRIFT_TOLERANCE = 1e-9


def relative_drift(series, params):
    """max over each trajectory of |V(t) - V(0)| / (|delta x| + |gamma ln x| + |beta y| + |alpha ln y|)."""
    x, y = series[..., 0], series[..., 1]
    alpha, beta, delta, gamma = (column[:, None] for column in params.T)
    size = np.abs(delta * x) + np.abs(gamma * np.log(x)) + np.abs(beta * y) + np.abs(alpha * np.log(y))
    v = conserved_quantity(series, params)
    return np.max(np.abs(v - v[:, :1]) / size, axis=1)


@pytest.fixture(scope="module")
def simulated():
    """The default systems: 1,000 of 100 time points."""
    return simulate(1000, 100)


def test_rk4_step_matches_the_taylor_series_to_fourth_order():
    # For ds/dt = s one RK4 step multiplies by exactly 1 + h + h^2/2 + h^3/6 + h^4/24.
    h = 0.1
    step = rk4_step(lambda s: s, np.array([1.0, 2.0]), h)
    np.testing.assert_allclose(step, np.array([1.0, 2.0]) * (1 + h + h**2 / 2 + h**3 / 6 + h**4 / 24), rtol=1e-15)


def test_series_obey_the_lotka_volterra_equations():
    # Sampled finely, central differences of the series approximate dx/dt and dy/dt to O(dt^2).
    _, series, params = simulate(20, 200, dt=0.001, seed=1, substeps=1)
    x, y = series[..., 0], series[..., 1]
    alpha, beta, delta, gamma = (column[:, None] for column in params.T)
    dx_dt = (x[:, 2:] - x[:, :-2]) / (2 * 0.001)
    dy_dt = (y[:, 2:] - y[:, :-2]) / (2 * 0.001)
    x, y = x[:, 1:-1], y[:, 1:-1]
    np.testing.assert_allclose(dx_dt, alpha * x - beta * x * y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(dy_dt, delta * x * y - gamma * y, rtol=0, atol=1e-5)


def test_a_system_at_equilibrium_stays_there():
    params = np.array([[0.8, 0.2, 0.25, 0.6]])
    equilibrium = np.array([[0.6 / 0.25, 0.8 / 0.2]])  # (gamma / delta, alpha / beta)
    series = integrate(equilibrium, params, n_steps=50)
    np.testing.assert_allclose(series, np.broadcast_to(equilibrium[:, None], series.shape), rtol=1e-14, atol=0)


def test_conserved_quantity_is_constant_along_every_trajectory(simulated):
    _, series, params = simulated
    assert relative_drift(series, params).max() < DRIFT_TOLERANCE


def test_coarse_integration_drifts_beyond_the_tolerance(simulated):
    # The check above can fail: one RK4 step per sample of 1.0 time unit is visibly wrong.
    _, _, params = simulated
    _, coarse_series, coarse_params = simulate(1000, 20, dt=1.0, substeps=1)
    np.testing.assert_array_equal(coarse_params, params)
    assert relative_drift(coarse_series, params).max() > 100 * DRIFT_TOLERANCE


def test_shapes_and_columns(simulated):
    times, series, params = simulated
    assert times.shape == (100,) and series.shape == (1000, 100, 2) and params.shape == (1000, 4)
    assert series.dtype == np.float64 and params.dtype == np.float64
    np.testing.assert_allclose(times, np.arange(100) * lv.DT, rtol=0, atol=0)
    alpha, beta, delta, gamma = params.T
    assert np.all((lv.RATE_RANGE[0] <= alpha) & (alpha <= lv.RATE_RANGE[1]))
    assert np.all((lv.RATE_RANGE[0] <= gamma) & (gamma <= lv.RATE_RANGE[1]))
    assert np.all((lv.INTERACTION_RANGE[0] <= beta) & (beta <= lv.INTERACTION_RANGE[1]))
    assert np.all((lv.INTERACTION_RANGE[0] <= delta) & (delta <= lv.INTERACTION_RANGE[1]))
    ratio = series[:, 0] / np.stack([gamma / delta, alpha / beta], axis=1)  # start / equilibrium
    assert np.all((lv.START_RANGE[0] <= ratio) & (ratio <= lv.START_RANGE[1]))


def test_default_series_oscillate_with_populations_of_order_one_to_ten(simulated):
    _, series, _ = simulated
    assert 0.5 < series.min() and series.max() < 25
    prey = series[..., 0]
    peaks = np.sum((prey[:, 1:-1] > prey[:, :-2]) & (prey[:, 1:-1] > prey[:, 2:]), axis=1)
    assert peaks.min() >= 1 and peaks.max() <= 4  # one to a few cycles in the window


def test_same_seed_gives_identical_bytes_and_another_seed_does_not():
    first, second, other = simulate(30, 40, seed=5), simulate(30, 40, seed=5), simulate(30, 40, seed=6)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
    assert first[1].tobytes() != other[1].tobytes()


@pytest.mark.parametrize(
    "arguments, name",
    [
        (dict(n_systems=0, n_steps=10), "n_systems"),
        (dict(n_systems=2.0, n_steps=10), "n_systems"),
        (dict(n_systems=2, n_steps=1), "n_steps"),
        (dict(n_systems=2, n_steps=10, dt=0.0), "dt"),
        (dict(n_systems=2, n_steps=10, dt=-0.1), "dt"),
        (dict(n_systems=2, n_steps=10, substeps=0), "substeps"),
    ],
)
def test_bad_arguments_name_the_argument(arguments, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        simulate(**arguments)


def test_default_dataset_is_1000_systems_of_100_steps_split_by_system():
    data = create_dataset()
    assert data.series.shape == (1000, 100, 2)
    assert {name: len(indices) for name, indices in data.splits.items()} == {"train": 800, "validation": 100,
                                                                              "test": 100}
    np.testing.assert_array_equal(data.split("test"), data.series[data.splits["test"]])


@pytest.mark.parametrize("n_systems", [1, 7, 10, 1000])
def test_splits_are_disjoint_and_cover_every_system(n_systems):
    splits = split_systems(n_systems)
    every = np.concatenate(list(splits.values()))
    np.testing.assert_array_equal(np.sort(every), np.arange(n_systems))  # each system once: disjoint and covering


def test_splits_are_deterministic_and_depend_on_the_seed():
    first, second, other = split_systems(100, seed=0), split_systems(100, seed=0), split_systems(100, seed=1)
    for name in lv.SPLITS:
        np.testing.assert_array_equal(first[name], second[name])
    assert any(not np.array_equal(first[name], other[name]) for name in lv.SPLITS)


def test_split_sizes_follow_the_fractions():
    sizes = {name: len(indices) for name, indices in split_systems(20, fractions=(0.5, 0.25, 0.25)).items()}
    assert sizes == {"train": 10, "validation": 5, "test": 5}


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_a_one_line_error(fractions):
    with pytest.raises(ValueError, match="^fractions must be 3 numbers >= 0"):
        split_systems(10, fractions)


def test_unknown_split_is_named():
    with pytest.raises(KeyError, match="no split 'tset'"):
        create_dataset(10, 5).split("tset")


def test_save_then_load_is_exact(tmp_path):
    data = create_dataset(50, 20, seed=2)
    loaded = load_dataset(save_dataset(data, tmp_path / "data" / "lv.npz"))
    for name in ("times", "series", "params"):
        assert getattr(loaded, name).tobytes() == getattr(data, name).tobytes()
    assert list(loaded.splits) == list(lv.SPLITS)
    for name in lv.SPLITS:
        np.testing.assert_array_equal(loaded.splits[name], data.splits[name])


def test_save_writes_exactly_the_path_given(tmp_path):
    save_dataset(create_dataset(5, 3), tmp_path / "lv.data")  # no ".npz" appended, no temporary left behind
    assert [path.name for path in tmp_path.iterdir()] == ["lv.data"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz: no such file"):
        load_dataset(tmp_path / "nowhere.npz")


def test_missing_array_is_named(tmp_path):
    data = create_dataset(5, 3)
    np.savez(tmp_path / "lv.npz", times=data.times, series=data.series)
    with pytest.raises(ValueError, match=r"lv\.npz: array 'params' is missing"):
        load_dataset(tmp_path / "lv.npz")


def test_not_an_npz_file_is_a_one_line_error(tmp_path):
    (tmp_path / "lv.npz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=r"lv\.npz: not a readable \.npz file"):
        load_dataset(tmp_path / "lv.npz")


def test_pickled_arrays_are_refused(tmp_path):
    data = create_dataset(5, 3)
    arrays = {name: getattr(data, name) for name in ("times", "series", "params")}
    splits = {f"split_{name}": indices for name, indices in data.splits.items()}
    np.savez(tmp_path / "lv.npz", **arrays, **{**splits, "split_test": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match=r"lv\.npz: not a readable \.npz file"):
        load_dataset(tmp_path / "lv.npz")


def test_overlapping_splits_are_refused(tmp_path):
    data = create_dataset(10, 3)
    data.splits["test"] = data.splits["train"][:1]  # a training system in the test split
    with pytest.raises(ValueError, match=r"lv\.npz: the split_\* arrays must hold each system index 0\.\.9"):
        load_dataset(save_dataset(data, tmp_path / "lv.npz"))


def test_observation_noise_is_multiplicative_log_normal_of_the_size_asked():
    data = create_dataset(noise=0.05)
    log_ratio = np.log(data.series / data.clean)
    assert abs(log_ratio.mean()) < 0.001 and log_ratio.std() == pytest.approx(0.05, rel=0.01)
    assert (data.series > 0).all()


def test_noise_changes_no_other_draw():
    clean, noisy = create_dataset(), create_dataset(noise=0.15)
    np.testing.assert_array_equal(noisy.clean, clean.series)
    np.testing.assert_array_equal(noisy.params, clean.params)
    for part in ("train", "validation", "test"):
        np.testing.assert_array_equal(noisy.splits[part], clean.splits[part])
        np.testing.assert_array_equal(noisy.split(part, clean=True), clean.split(part))
    assert noisy.noise == 0.15 and clean.noise == 0 and clean.clean is None


def test_no_noise_observes_the_series_exactly():
    series = simulate(3, 10)[1]
    np.testing.assert_array_equal(observe(series, 0.0), series)


def test_a_noisy_dataset_saves_and_loads_with_its_clean_series(tmp_path):
    data = create_dataset(n_systems=20, n_steps=12, noise=0.05)
    loaded = load_dataset(save_dataset(data, tmp_path / "noisy.npz"))
    np.testing.assert_array_equal(loaded.series, data.series)
    np.testing.assert_array_equal(loaded.clean, data.clean)
    assert loaded.noise == 0.05


@pytest.mark.parametrize("noise", [-0.05, float("nan"), float("inf"), True])
def test_bad_noise_is_a_one_line_error(noise):
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        create_dataset(n_systems=10, n_steps=5, noise=noise)
