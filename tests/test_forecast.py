"""Forecasting: the baselines' formulas, the text-to-forecast plumbing, the metrics, and bad input."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from transformers import AutoModelForCausalLM, LlamaConfig

from data.generated_tasks import generate_tasks
from data.instructions import save_instructions
from data.lotka_volterra import create_dataset
from eval import forecast
from eval.generate import generate
from eval.baselines import persistence
from eval.forecast import (
    AUTOREGRESSION,
    PHYSICS,
    band_coverage,
    calibrated_coverage,
    crps,
    errors,
    main,
    model_forecasts,
    run_forecasts,
    wrote_horizon,
)
from lora import inject_lora, save_adapter
from models.loader import TINY_SHAPE, char_tokenizer, tiny_model

TOKENIZER = char_tokenizer()
SERIES = create_dataset(n_systems=100, seed=0).split("test")  # 10 held-out systems


def model_forecast(model, tokenizer, context: np.ndarray, horizon: int, **settings):
    """``model_forecasts`` of one context alone: the reference a batch of them is held to."""
    return model_forecasts(model, tokenizer, [context], horizon, **settings)[0]


def prompt_texts(input_ids, attention_mask=None, samples_per_prompt=1, **settings):
    """The text of each generated row's prompt, padding left out: each prompt ``samples_per_prompt`` times."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    texts = [TOKENIZER.decode(ids[row_mask.bool()]) for ids, row_mask in zip(input_ids, mask)]
    return [text for text in texts for _ in range(samples_per_prompt)]


def writes_the_last_step_again(model, input_ids, max_new_tokens, **settings):
    """A stand-in for ``generate`` whose every row writes its prompt's last time step over and over."""
    rows = []
    for prompt in prompt_texts(input_ids, **settings):
        last_step = prompt.rstrip(";").split(";")[-1]
        rows.append(TOKENIZER(";".join([last_step] * 20)).input_ids[:max_new_tokens])
    return torch.tensor(rows)


def writes_nonsense(model, input_ids, max_new_tokens, **settings):
    return torch.tensor([TOKENIZER("hello, world").input_ids] * len(prompt_texts(input_ids, **settings)))


def test_crps_equals_a_direct_computation_on_a_small_example():
    # Samples 1, 2, 4 and truth 3: mean distance (2 + 1 + 1) / 3; pairwise distances 12 over 2 * 3 * 2.
    assert crps(np.array([1.0, 2.0, 4.0]), np.array(3.0)) == pytest.approx(4 / 3 - 12 / 12, abs=1e-15)


def test_crps_of_a_single_sample_is_the_absolute_error():
    assert_allclose(crps(np.array([[1.0, -2.0]]), np.array([3.0, 1.0])), [2.0, 3.0])


def test_crps_rewards_a_spread_that_covers_the_truth():
    truth = np.array(0.0)
    assert crps(np.array([-1.0, 1.0]), truth) < crps(np.array([1.0, 1.0]), truth)


def test_a_calibrated_band_covers_90_percent_only_with_many_samples():
    assert calibrated_coverage(2000, trials=5000) == pytest.approx(0.9, abs=0.01)
    assert calibrated_coverage(5) < 0.65 < calibrated_coverage(20) < 0.85


def test_band_coverage_counts_the_truths_inside_the_5_to_95_percentiles():
    samples = np.repeat(np.arange(101.0)[:, None], 5, axis=1)  # percentiles 5 and 95 are 5 and 95
    assert band_coverage(samples, np.array([0.0, 5.0, 50.0, 95.0, 96.0])) == pytest.approx(3 / 5)


def test_errors_are_mean_absolute_and_squared_differences():
    truth = np.zeros((2, 3, 2))
    guess = np.ones((2, 3, 2)) * np.array([1.0, 3.0])  # errors 1 and 3 in every step
    result = errors(truth, guess)
    assert result["mae"] == 2.0 and result["mse"] == 5.0
    assert result["mae_by_step"] == [2.0, 2.0, 2.0]


def test_model_text_becomes_a_forecast_in_original_units(monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    context = SERIES[0, :50]
    result = model_forecast(tiny_model(), TOKENIZER, context, horizon=10, samples=3)
    assert result.samples.shape == (3, 10, 2) and result.malformed == 0
    # The text holds the last step rounded to 2 decimals of the scaled value: persistence, up to that rounding.
    scale = forecast.fit_scaler(context).scale
    assert np.all(np.abs(result.median - persistence(context, 10)) <= 0.5e-2 * scale + 1e-12)


def test_continuations_that_are_not_numbers_are_counted_as_malformed(monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_nonsense)
    result = model_forecast(tiny_model(), TOKENIZER, SERIES[0, :50], horizon=10, samples=4)
    assert result.malformed == 4 and result.median is None


def test_a_continuation_is_done_once_it_holds_horizon_steps():
    assert [wrote_horizon(text, 2) for text in ("0.1,0.2", "0.1,0.2;0.3,0.4", "0.1,0.2;0.3,0.4;", "0.1;0.2;0.3;")] \
        == [False, False, True, True]


def test_batched_forecasts_give_each_system_its_own(monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    contexts = [SERIES[i, :50] for i in range(5)]
    batched = model_forecasts(tiny_model(), TOKENIZER, contexts, horizon=10, samples=3)
    for context, result in zip(contexts, batched):
        alone = model_forecast(tiny_model(), TOKENIZER, context, horizon=10, samples=3)
        assert result.samples.shape == (3, 10, 2) and result.malformed == alone.malformed == 0
        assert_allclose(result.samples, alone.samples, rtol=0, atol=0)


def recording(texts: list):
    """The real ``generate``, which also appends the decoded new text of every row to ``texts``."""
    def generate_and_record(*arguments, **settings):
        new = generate(*arguments, **settings)
        texts.extend(TOKENIZER.batch_decode(new, skip_special_tokens=True))
        return new

    return generate_and_record


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_batched_greedy_forecasts_equal_one_system_at_a_time(monkeypatch, name):
    model, contexts = tiny_model(name), [SERIES[i, :40 + i] for i in range(4)]  # prompts of different lengths
    batched_texts, alone_texts = [], []
    monkeypatch.setattr(forecast, "generate", recording(batched_texts))
    batched = model_forecasts(model, TOKENIZER, contexts, horizon=2, temperature=0.0)
    monkeypatch.setattr(forecast, "generate", recording(alone_texts))
    alone = [model_forecast(model, TOKENIZER, context, horizon=2, temperature=0.0) for context in contexts]
    assert batched_texts == alone_texts and len(batched_texts) == 4  # the tokens each system's row wrote
    for ours, reference in zip(batched, alone):
        assert ours.malformed == reference.malformed
        assert_allclose(ours.samples, reference.samples, rtol=0, atol=0)


def test_sampled_forecasts_repeat_with_the_same_seed():
    model, contexts = tiny_model("tiny-llama"), [SERIES[i, :50] for i in range(3)]
    texts = [[], [], []]
    for seed, record in zip((0, 0, 1), texts):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(forecast, "generate", recording(record))
            model_forecasts(model, TOKENIZER, contexts, horizon=2, samples=4, seed=seed)
    assert texts[0] == texts[1] != texts[2] and len(texts[0]) == 12


def test_table_scores_every_method_on_the_same_systems(monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    results, _, scored = run_forecasts(tiny_model(), TOKENIZER, SERIES[:6], context=50, horizon=10, adapter=False,
                                       samples=2, temperature=0.7, top_p=0.9, seed=0)
    assert scored == list(range(6))
    model, baseline = results["base model, zero-shot"], results["persistence"]
    assert model["well_formed"] == 1.0
    assert model["mae"] == pytest.approx(baseline["mae"], abs=0.05)


def test_a_method_with_no_well_formed_forecast_is_reported_not_scored(monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_nonsense)
    results, _, scored = run_forecasts(tiny_model(), TOKENIZER, SERIES[:3], context=50, horizon=10, adapter=False,
                                       samples=1, temperature=0.0, top_p=1.0, seed=0)
    assert results["base model, zero-shot"] == {"well_formed": 0.0, "malformed_samples": 3}
    assert scored == [0, 1, 2] and "mae" in results["persistence"]


def test_command_writes_a_markdown_table_opening_with_the_command_that_reruns_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = ["--model", "tiny-llama", "--systems", "3", "--samples", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = (tmp_path / "forecast.md").read_text()
    assert table.startswith(f"`python -m eval.forecast {' '.join(argv)}`, ")
    for method in ("persistence", "linear extrapolation", "base model, zero-shot", AUTOREGRESSION, PHYSICS):
        assert f"| {method} |" in table


def test_crps_and_coverage_are_given_for_distributions_of_at_least_20_samples(monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    for samples, spread in ((20, True), (5, False)):
        results, forecasts, scored = run_forecasts(tiny_model(), TOKENIZER, SERIES[:2], context=50, horizon=10,
                                                   adapter=False, samples=samples, temperature=0.7, top_p=0.9, seed=0)
        for method in ("base model, zero-shot", AUTOREGRESSION):
            assert ("crps" in results[method]) == spread and ("coverage" in results[method]) == spread
        for method in ("persistence", "linear extrapolation", PHYSICS):
            assert "crps" not in results[method]
        if spread:  # the stand-in writes the same continuation in every sample: CRPS is then the absolute error
            assert results["base model, zero-shot"]["crps"] == pytest.approx(results["base model, zero-shot"]["mae"])


def test_the_physics_fit_is_the_limit_on_noise_free_systems(monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    results, _, _ = run_forecasts(tiny_model(), TOKENIZER, SERIES[:2], context=50, horizon=10, adapter=False,
                                  samples=1, temperature=0.0, top_p=1.0, seed=0)
    assert results[PHYSICS]["mae"] < 1e-6 < min(result["mae"] for result in results.values() if result is not
                                                results[PHYSICS])


def test_no_zero_shot_leaves_the_base_model_out_of_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    model = tiny_model("tiny-llama")
    inject_lora(model, ["q_proj", "v_proj"], r=2)
    save_adapter(model, tmp_path / "adapter")
    argv = ["--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--systems", "2", "--samples", "1"]
    assert main([*argv, "--no-zero-shot", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "forecast.md").read_text()
    assert "| LoRA adapter |" in table and "| persistence |" in table and "| base model, zero-shot |" not in table


def write_wrong_inputs(folder):
    """Instruction data (the other task's file) and an adapter saved for a wider model, in ``folder``."""
    save_instructions(generate_tasks(4, seed=0), folder / "tasks.jsonl")
    wider = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_SHAPE, "hidden_size": 32}))
    inject_lora(wider, ["q_proj", "v_proj"], r=2)
    save_adapter(wider, folder / "wider_adapter")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--context", "95", "--horizon", "10"], "--context 95 + --horizon 10 must fit in the series' 100 steps"),
        (["--adapter", "missing"], "missing/adapter_config.json: no such file"),
        (["--adapter", "wider_adapter"], "has shape (2, 32) but the model needs (2, 64)"),
        (["--data", "missing.npz"], "missing.npz: no such data file"),
        (["--data", "tasks.jsonl"], "tasks.jsonl: not a readable .npz file; series data is the .npz"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    write_wrong_inputs(tmp_path)
    assert main(["--model", "tiny-llama", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_noisy_systems_are_scored_against_the_observations_with_the_clean_mae_beside(monkeypatch, tmp_path):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    noisy = create_dataset(n_systems=100, seed=0, noise=0.15)
    results, _, _ = run_forecasts(tiny_model(), TOKENIZER, noisy.split("test")[:3], context=50, horizon=10,
                                  adapter=False, samples=1, temperature=0.0, top_p=1.0, seed=0,
                                  clean=noisy.split("test", clean=True)[:3])
    # The physics fit forecasts the clean trajectory: nearer the truth than the noisy values are.
    assert results[PHYSICS]["mae_clean"] < results[PHYSICS]["mae"]
    assert main(["--model", "tiny-llama", "--systems", "2", "--samples", "1", "--noise", "0.05",
                 "--out", str(tmp_path)]) == 0
    table = (tmp_path / "forecast.md").read_text()
    assert "0.05 observation noise" in table and "| MAE against the clean truth |" in table
