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
from eval.forecast import errors, linear_extrapolation, main, model_forecast, persistence, run_forecasts
from lora import inject_lora, save_adapter
from models.loader import TINY_SHAPE, char_tokenizer, tiny_model

TOKENIZER = char_tokenizer()
SERIES = create_dataset(n_systems=100, seed=0).split("test")  # 10 held-out systems


def writes_the_last_step_again(model, input_ids, max_new_tokens, **settings):
    """A stand-in for ``generate`` whose every row writes the prompt's last time step over and over."""
    prompt = TOKENIZER.decode(input_ids[0])
    last_step = prompt.rstrip(";").split(";")[-1]
    text = ";".join([last_step] * 20)
    return torch.tensor([TOKENIZER(text).input_ids[:max_new_tokens]] * len(input_ids))


def writes_nonsense(model, input_ids, max_new_tokens, **settings):
    return torch.tensor([TOKENIZER("hello, world").input_ids] * len(input_ids))


def test_persistence_repeats_the_last_value():
    context = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert_allclose(persistence(context, 3), [[3.0, 4.0]] * 3)


def test_linear_extrapolation_continues_a_straight_line_exactly():
    t = np.arange(20.0)
    context = np.stack([2.0 + 0.5 * t, 10.0 - 0.25 * t], axis=1)
    future = np.arange(20.0, 26.0)
    assert_allclose(linear_extrapolation(context, 6), np.stack([2.0 + 0.5 * future, 10.0 - 0.25 * future], axis=1))


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


def test_command_writes_a_markdown_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    assert main(["--model", "tiny-llama", "--systems", "3", "--samples", "2", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "forecast.md").read_text()
    assert "| persistence |" in table and "| linear extrapolation |" in table and "| base model, zero-shot |" in table


def test_no_zero_shot_leaves_the_base_model_out_of_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(forecast, "generate", writes_the_last_step_again)
    model = tiny_model("tiny-llama")
    inject_lora(model, ["q_proj", "v_proj"], r=2)
    save_adapter(model, tmp_path / "adapter")
    argv = ["--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--systems", "2", "--samples", "1"]
    assert main([*argv, "--no-zero-shot", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "forecast.md").read_text()
    assert "| LoRA adapter |" in table and "| persistence |" in table and "zero-shot" not in table


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
