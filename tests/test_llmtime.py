"""LLMTIME text: the scalers' formulas, the exact format, tolerant decoding, a round trip within half a unit."""

import numpy as np
import pytest

from data.llmtime import PERCENTILE_TARGET, Scaler, decode, encode, fit_scaler
from data.lotka_volterra import simulate

UNIT = Scaler(offset=np.zeros(2), scale=np.ones(2))


def round_trip_bound(x, scaler, decimals):
    """Half a unit of the last written decimal, in x's units, plus float rounding in the scaling and its inverse."""
    half_unit = 0.5 * 10.0**-decimals * scaler.scale
    float_error = 8 * np.finfo(np.float64).eps * (np.abs(x) + np.abs(scaler.offset) + half_unit)
    return half_unit + float_error


def make_series(case, seed):
    """A ``(n_steps, n_vars)`` series of one kind, different for each seed."""
    rng = np.random.default_rng(seed)
    if case == "lotka_volterra":
        return simulate(1, 100, seed=seed)[1][0]
    if case == "normal":
        return rng.normal(size=(60, 2))
    if case == "negative":
        return rng.normal(-50, 3, size=(60, 2))
    if case == "zeros":
        return np.zeros((20, 2))
    if case == "constant":
        return np.full((20, 2), rng.uniform(-10, 10))
    if case == "large":
        return 1e6 + rng.normal(0, 1e4, size=(60, 2))
    if case == "mixed_scales":
        return rng.normal(size=(60, 2)) * np.array([1e-3, 1e6])
    if case == "one_variable":
        return rng.uniform(0, 5, size=(30, 1))
    if case == "three_variables":
        return rng.exponential(size=(30, 3))
    if case == "one_step":
        return rng.normal(size=(1, 2))
    raise AssertionError(case)


CASES = ("lotka_volterra", "normal", "negative", "zeros", "constant", "large", "mixed_scales", "one_variable",
         "three_variables", "one_step")


@pytest.mark.parametrize("decimals", [2, 3])
@pytest.mark.parametrize("method", ["llmtime", "percentile"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_decode_of_encode_is_within_half_a_unit_of_the_last_decimal(case, seed, method, decimals):
    x = make_series(case, seed)
    # Fitted on the first three quarters, as for a forecast: the rest may fall outside the context's range.
    scaler = fit_scaler(x[: max(1, 3 * len(x) // 4)], method=method)
    decoded = decode(encode(x, scaler, decimals), scaler)
    assert decoded.shape == x.shape
    assert np.all(np.abs(decoded - x) <= round_trip_bound(x, scaler, decimals))


def test_encode_writes_fixed_decimals_commas_and_semicolons():
    assert encode([[0.5, 1.25], [2, 3]], UNIT) == "0.50,1.25;2.00,3.00"


def test_encode_applies_the_scaler_and_writes_minus_signs():
    scaler = Scaler(offset=np.array([1.0, 10.0]), scale=np.array([2.0, 0.5]))
    # (2 - 1) / 2 = 0.5, (10.5 - 10) / 0.5 = 1; (0 - 1) / 2 = -0.5, (9 - 10) / 0.5 = -2
    assert encode([[2, 10.5], [0, 9]], scaler) == "0.50,1.00;-0.50,-2.00"


def test_encode_rounds_to_the_requested_decimals():
    assert encode([[0.1234, 7]], UNIT, decimals=3) == "0.123,7.000"
    assert encode([[2.4, -3.6]], UNIT, decimals=0) == "2,-4"


def test_values_that_round_to_zero_are_written_without_a_minus():
    assert encode([[-0.001, -0.004], [-0.006, 0]], UNIT) == "0.00,0.00;-0.01,0.00"


def test_encoded_text_uses_only_digits_point_minus_comma_and_semicolon():
    x = make_series("normal", 0)
    assert set(encode(x, fit_scaler(x, method="percentile"))) <= set("0123456789.-,;")


def test_decode_reads_the_text_and_undoes_the_scaling():
    scaler = Scaler(offset=np.array([1.0, 10.0]), scale=np.array([2.0, 0.5]))
    np.testing.assert_array_equal(decode("0.50,1.00;-0.50,-2.00", scaler), np.array([[2.0, 10.5], [0.0, 9.0]]))


def test_decode_ignores_surrounding_whitespace_and_a_trailing_separator():
    np.testing.assert_array_equal(decode("  0.5,1;2,3;\n", UNIT), np.array([[0.5, 1.0], [2.0, 3.0]]))


@pytest.mark.parametrize(
    "text, n_good",
    [
        ("0.5,1;2;3,4", 1),  # too few values
        ("0.5,1;2,3,4;5,6", 1),  # too many values
        ("0.5,1;2,x;3,4", 1),  # not a number
        ("0.5,1;;3,4", 1),  # an empty step
        ("0.5,1;2,3.;4,5", 1),  # a point without decimals
        ("0.5,1;-,3", 1),  # a lone minus
        ("0.5,1;nan,1", 1),  # float() would read these three
        ("0.5,1;1e5,1", 1),
        ("0.5,1;1_0,1", 1),
        ("0.5,1;2,3\n4,5", 1),  # a newline instead of ";"
        ("0.5,1;2,3;4,5;6", 3),  # generation cut off mid-step
        ("oops", 0),
    ],
)
def test_decode_stops_at_the_first_malformed_step(text, n_good):
    good = np.array([[0.5, 1.0], [2.0, 3.0], [4.0, 5.0]])
    np.testing.assert_array_equal(decode(text, UNIT), good[:n_good])


@pytest.mark.parametrize(
    "text, scaler",
    [
        ("0.5,1;2,3;" + "9" * 400 + ",1;4,5", UNIT),  # float() reads 400 nines as inf
        ("0.5,1;2,3;" + "9" * 300 + ",1;4,5", Scaler(np.zeros(2), np.full(2, 1e10))),  # finite until scaled
    ],
    ids=["too_large_to_read", "too_large_once_scaled"],
)
def test_decode_stops_at_a_number_too_large_to_be_finite(text, scaler):
    np.testing.assert_array_equal(decode(text, scaler), scaler.inverse_transform([[0.5, 1.0], [2.0, 3.0]]))


@pytest.mark.parametrize("text", ["", "  ", ";", "x,1;2,3"])
def test_decode_of_nothing_usable_is_an_empty_array_with_n_vars_columns(text):
    decoded = decode(text, UNIT)
    assert decoded.shape == (0, 2) and decoded.dtype == np.float64


def test_decode_with_another_n_vars_than_the_scaler_is_an_error():
    with pytest.raises(ValueError, match="n_vars is 3 but the scaler was fitted to 2 variables"):
        decode("1,2,3", UNIT, n_vars=3)


def test_llmtime_scaler_by_hand():
    # min 0, max 10: offset = 0 - 0.3 * 10 = -3; x - offset = [3, 13, 8]; with alpha = 1 the scale is the max, 13.
    scaler = fit_scaler([[0.0], [10.0], [5.0]], method="llmtime", alpha=1.0, beta=0.3)
    np.testing.assert_allclose(scaler.offset, [-3.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(scaler.scale, [13.0], rtol=0, atol=1e-15)


def test_llmtime_scaler_follows_the_paper_per_variable():
    context = make_series("lotka_volterra", 0)
    alpha, beta = 0.9, 0.2
    scaler = fit_scaler(context, method="llmtime", alpha=alpha, beta=beta)
    for var in range(2):
        x = context[:, var]
        offset = x.min() - beta * (x.max() - x.min())
        np.testing.assert_allclose(scaler.offset[var], offset, rtol=1e-15, atol=0)
        np.testing.assert_allclose(scaler.scale[var], np.quantile(x - offset, alpha), rtol=1e-15, atol=0)


def test_percentile_scaler_by_hand():
    # |x| = [20, 10, 5, 0, 1]: its 100th percentile, 20, is mapped to PERCENTILE_TARGET.
    scaler = fit_scaler([[-20.0], [10.0], [5.0], [0.0], [1.0]], method="percentile", percentile=100)
    np.testing.assert_array_equal(scaler.offset, [0.0])
    np.testing.assert_allclose(scaler.scale, [20.0 / PERCENTILE_TARGET], rtol=1e-15, atol=0)


def test_percentile_scaler_maps_the_90th_percentile_of_abs_x_to_ten():
    context = make_series("normal", 1)
    scaled = fit_scaler(context, method="percentile").transform(context)
    np.testing.assert_allclose(np.percentile(np.abs(scaled), 90, axis=0), [10.0, 10.0], rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "method, context, offset",
    [
        ("llmtime", [[3.0, 1.0], [3.0, 2.0]], [3.0, 1.0 - 0.3 * 1.0]),  # a constant variable
        ("llmtime", [[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0]),
        ("percentile", [[0.0, 1.0], [0.0, 2.0]], [0.0, 0.0]),  # an all-zero variable
    ],
)
def test_degenerate_variable_gets_scale_one(method, context, offset):
    scaler = fit_scaler(context, method=method)
    assert scaler.scale[0] == 1.0
    np.testing.assert_allclose(scaler.offset, offset, rtol=0, atol=1e-15)
    assert np.all(np.isfinite(scaler.transform(context)))


def test_fitting_on_the_context_ignores_what_follows_it():
    series = make_series("lotka_volterra", 2)
    changed = series.copy()
    changed[80:] *= 100  # a very different future
    for method in ("llmtime", "percentile"):
        before, after = fit_scaler(series[:80], method=method), fit_scaler(changed[:80], method=method)
        np.testing.assert_array_equal(after.offset, before.offset)
        np.testing.assert_array_equal(after.scale, before.scale)


def test_unknown_method_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"unknown scaling method 'minmax'; choose one of \('llmtime', 'percentile'\)"):
        fit_scaler([[1.0, 2.0]], method="minmax")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(alpha=0.0), "alpha must be in"),
        (dict(alpha=1.5), "alpha must be in"),
        (dict(beta=-0.1), "beta must be >= 0"),
        (dict(method="percentile", percentile=0), "percentile must be in"),
        (dict(method="percentile", percentile=101), "percentile must be in"),
    ],
)
def test_out_of_range_hyperparameters_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        fit_scaler([[1.0, 2.0], [3.0, 4.0]], **arguments)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_context_is_an_error_naming_the_time_step(bad):
    context = np.ones((5, 2))
    context[3, 1] = bad
    with pytest.raises(ValueError, match="^context has a non-finite value at time step 3"):
        fit_scaler(context)


def test_encode_names_the_first_non_finite_time_step():
    series = np.ones((8, 2))
    series[5, 0], series[2, 1] = np.nan, np.inf
    with pytest.raises(ValueError, match="^series has a non-finite value at time step 2"):
        encode(series, UNIT)


@pytest.mark.parametrize(
    "series, message",
    [
        (np.ones(4), r"series must be \(n_steps, n_vars\)"),
        (np.ones((0, 2)), r"series must be \(n_steps, n_vars\)"),
        (np.ones((4, 3)), "series has 3 variables but the scaler was fitted to 2"),
    ],
)
def test_encode_rejects_series_of_the_wrong_shape(series, message):
    with pytest.raises(ValueError, match=message):
        encode(series, UNIT)


@pytest.mark.parametrize("decimals", [-1, 1.5, True])
def test_encode_rejects_bad_decimals(decimals):
    with pytest.raises(ValueError, match="decimals must be an integer >= 0"):
        encode([[1.0, 2.0]], UNIT, decimals=decimals)


@pytest.mark.slow
def test_embedded_tokenizer_gives_every_digit_its_own_token():
    from models.loader import load_tokenizer

    tokenizer = load_tokenizer()
    series = make_series("lotka_volterra", 0)
    scaler = fit_scaler(series, method="percentile")
    text = encode(series, scaler)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = [tokenizer.decode([token]) for token in ids]
    with_digits = [piece for piece in pieces if any(character.isdigit() for character in piece)]
    assert with_digits and all(len(piece) == 1 and piece.isdigit() for piece in with_digits)
    decoded_text = tokenizer.decode(ids)
    assert decoded_text == text
    np.testing.assert_array_equal(decode(decoded_text, scaler), decode(text, scaler))
