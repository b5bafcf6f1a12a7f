"""Forecasting held-out predator-prey systems with the LLM, against baselines that need no model.

For each held-out system: the first ``context`` steps are written as LLMTIME text (scaled on
the context alone), followed by ";", and the model writes on. The first ``horizon`` steps it
writes are read back with ``decode`` and compared with the truth, in the original units.

    python -m eval.forecast --adapter runs/NAME/adapter     # the adapter, the base model, the baselines
    python -m eval.forecast                                 # the base model zero-shot and the baselines

With ``--samples K`` (20 by default) the model writes K continuations (temperature and top-p
sampling) and the point forecast is their median, with the 5-95% band of the samples as its spread;
``--greedy`` writes one, deterministically. A continuation that does not hold ``horizon``
well-formed steps is *malformed*: it is counted, and left out of the median.

The model forecasts ``--batch-systems`` systems at once: their prompts, left-padded, in one
batch, each prompt computed once and shared by its K samples, and each sample stopped as soon
as it has written ``horizon`` steps.

Baselines on the same systems (``eval/baselines.py``): persistence (the last context value,
repeated), linear extrapolation (a least-squares line through the last few context steps), an
autoregression fitted to the context (VAR(p), p by BIC) and the physics fit (the Lotka-Volterra
equations fitted to the context and integrated on). A model that does not beat persistence has
learned nothing useful about the dynamics; the physics fit, which knows the equations, is the
limit on noise-free series.

Point forecasts are scored by MAE and MSE. A method that gives a distribution (the LLM's
samples, the autoregression's sample paths) is also scored as one, with at least
``MIN_SAMPLES_FOR_SPREAD`` samples: by the CRPS (``crps``: how far the whole distribution is from
the truth, in the data's units; for a single point it is the absolute error) and by the coverage
of its 5-95% band (``band_coverage``: the share of true values inside it; 90% for a calibrated
forecast). With 5 samples even a perfect band covers far less than 90%, so fewer samples leave
those columns empty.
"""

import argparse
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.llmtime import decode, encode, fit_scaler
from data.sequences import pad_token_id
from data.tasks import series_dataset
from eval.baselines import autoregression, linear_extrapolation, persistence, physics_fit
from eval.cli import add_model_arguments, held_dtype, load_model_and_adapter
from eval.generate import Sampling, StopOnText, generate, left_pad
from eval.provenance import provenance, rerun_command
from lora import disable_lora

# The fewest samples for the CRPS and coverage columns: the 5-95% band of few samples lies inside
# the distribution's own, so even a calibrated forecast's band covers less than 90%: about 62% with
# 5 samples, 82% with 20 (calibrated_coverage).
MIN_SAMPLES_FOR_SPREAD = 20
BAND = (5, 95)  # percentiles of the band
AUTOREGRESSION, PHYSICS = "autoregression, order by BIC", "physics fit"  # the baselines' names in the table
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")  # the plot's methods, in the order they are given
SAMPLES = MIN_SAMPLES_FOR_SPREAD  # continuations per system by default: enough for the CRPS and coverage columns
# Systems forecast in one batch, chosen by memory: the KV cache of the default run (the embedded
# model, 500 prompt and up to 130 new tokens, 20 samples per system) is 30 layers x 2 (K and V)
# x 3 KV heads x 64 x 630 positions x 100 rows x 2 bytes (bf16) = 1.5 GB at 5 systems.
BATCH_SYSTEMS = 5


@dataclass
class ModelForecast:
    """The K decoded continuations of one system that held ``horizon`` steps, and how many did not."""

    samples: np.ndarray  # (k_well_formed, horizon, n_vars), original units
    malformed: int

    @property
    def median(self) -> np.ndarray | None:
        return np.median(self.samples, axis=0) if len(self.samples) else None


def wrote_horizon(text: str, horizon: int) -> bool:
    """Whether a continuation ``text`` holds ``horizon`` time steps: every step written ends at its ";"."""
    return text.count(";") >= horizon


def model_forecasts(model, tokenizer, contexts: Sequence[np.ndarray], horizon: int, samples: int = 5,
                    temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                    decimals: int = 2) -> list[ModelForecast]:
    """Let the model continue the LLMTIME text of every context, all in one batch; one ``ModelForecast`` each.

    ``contexts`` are ``(n_steps, n_vars)`` arrays; each is scaled on itself, written as text and
    followed by ";". The prompts are left-padded into one batch, each computed once and its
    cache copied to its ``samples`` rows (``temperature=0``: one greedy row), and a row stops
    once it has written ``horizon`` steps. The sampled rows depend on the whole batch and
    ``seed``: the same contexts and seed give the same forecasts.
    """
    scalers = [fit_scaler(context) for context in contexts]
    prompts = [encode(context, scaler, decimals) + ";" for context, scaler in zip(contexts, scalers)]
    input_ids, attention_mask = left_pad([tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts],
                                         pad_token_id(tokenizer))
    # Room for horizon steps as long as the longest context step, plus slack for longer numbers.
    step_length = max(len(step) for prompt in prompts for step in prompt.split(";")) + 1
    max_new_tokens = horizon * (step_length + 2)
    rows = 1 if temperature == 0 else samples
    device = next(model.parameters()).device
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    done = StopOnText(tokenizer, stop_when=partial(wrote_horizon, horizon=horizon))
    new = generate(model, input_ids.to(device), max_new_tokens, sampling=sampling, eos_token_id=tokenizer.eos_token_id,
                   stop=done, attention_mask=attention_mask.to(device), samples_per_prompt=rows)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    forecasts = []
    for index, (context, scaler) in enumerate(zip(contexts, scalers)):
        parsed = [decode(text, scaler)[:horizon] for text in texts[index * rows : (index + 1) * rows]]
        good = [forecast for forecast in parsed if len(forecast) == horizon]
        samples_array = np.stack(good) if good else np.empty((0, horizon, context.shape[1]))
        forecasts.append(ModelForecast(samples_array, rows - len(good)))
    return forecasts


def errors(truth: np.ndarray, forecast: np.ndarray) -> dict:
    """MAE and MSE over everything and per horizon step; ``truth`` and ``forecast`` are ``(systems, horizon, vars)``."""
    difference = forecast - truth
    return {
        "mae": float(np.abs(difference).mean()),
        "mse": float((difference**2).mean()),
        "mae_by_step": np.abs(difference).mean(axis=(0, 2)).tolist(),
        "mse_by_step": (difference**2).mean(axis=(0, 2)).tolist(),
    }


def crps(samples: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The fair sample estimate of the continuous ranked probability score, per value.

    For m samples X_1..X_m of a forecast and the true value y (Gneiting and Raftery, 2007;
    the "fair" form, Ferro 2014, which does not reward a forecast for having few samples)::

        CRPS = 1/m Σ_i |X_i - y|  -  1/(2 m (m - 1)) Σ_i Σ_j |X_i - X_j|

    The first term is the samples' mean distance to the truth, the second rewards spread; for a
    single point (m = 1, the second term taken as 0) it is the absolute error. Lower is better,
    in the data's units.

    Shapes: ``samples (m, ...)``, ``truth (...)`` -> ``(...)``.
    """
    m = len(samples)
    to_truth = np.abs(samples - truth).mean(axis=0)
    if m == 1:
        return to_truth
    spread = np.abs(samples[:, None] - samples[None, :]).sum(axis=(0, 1)) / (2 * m * (m - 1))
    return to_truth - spread


def band_coverage(samples: np.ndarray, truth: np.ndarray, band: tuple[float, float] = BAND) -> float:
    """The share of the true values inside the samples' ``band`` percentiles (5-95%: 0.9 when calibrated).

    Shapes: ``samples (m, ...)``, ``truth (...)``.
    """
    low, high = np.percentile(samples, band, axis=0)
    return float(((truth >= low) & (truth <= high)).mean())


def calibrated_coverage(samples: int, band: tuple[float, float] = BAND, trials: int = 100_000, seed: int = 0) -> float:
    """The coverage a perfectly calibrated forecast's band of ``samples`` samples has on average.

    The truth and the samples drawn from one distribution (a standard normal, ``trials`` times,
    seeded): the level to hold ``band_coverage`` to. Below the band's 90% for few samples, since
    the percentiles of a few samples lie inside the distribution's.
    """
    rng = np.random.default_rng(seed)
    return band_coverage(rng.standard_normal((samples, trials)), rng.standard_normal(trials), band)


def spread_scores(truths: np.ndarray, samples: Sequence[np.ndarray]) -> dict:
    """Mean CRPS and 5-95% coverage over systems; ``samples[i]`` is system i's ``(m, horizon, vars)``."""
    return {"crps": float(np.mean([crps(s, truth).mean() for s, truth in zip(samples, truths)])),
            "coverage": float(np.mean([band_coverage(s, truth) for s, truth in zip(samples, truths)]))}


def markdown_table(results: dict[str, dict], n_systems: int, samples: int = MIN_SAMPLES_FOR_SPREAD) -> str:
    """One row per method: MAE, MSE, MAE at the first and last horizon step, CRPS, 5-95% coverage, well-formed share.

    CRPS and coverage are given for the methods that forecast a distribution of at least
    ``MIN_SAMPLES_FOR_SPREAD`` samples; "-" elsewhere. ``samples``: how many each drew, for the
    footnote's calibrated coverage.
    """
    noisy = any("mae_clean" in result for result in results.values())
    lines = [
        "| method | MAE | MSE | MAE step 1 | MAE last step | CRPS | 5-95% coverage |"
        + (" MAE against the clean truth |" if noisy else "") + " well-formed |",
        "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if noisy else "") + " --- |",
    ]
    for method, result in results.items():
        if "mae" not in result:
            lines.append(f"| {method} | - | - | - | - | - | - |{' - |' if noisy else ''} {result['well_formed']:.0%} |")
            continue
        spread = (f"{result['crps']:.3f} | {result['coverage']:.0%}" if "crps" in result else "- | -")
        clean = f" {result['mae_clean']:.3f} |" if noisy else ""
        lines.append(f"| {method} | {result['mae']:.3f} | {result['mse']:.3f} | {result['mae_by_step'][0]:.3f} | "
                     f"{result['mae_by_step'][-1]:.3f} | {spread} |{clean} {result['well_formed']:.0%} |")
    lines.append(f"\nScored on the {n_systems} held-out systems where every method with any well-formed forecast "
                 "produced one"
                 + (", against the noisy observations (the clean truth's MAE beside them)" if noisy else "")
                 + "; MAE, MSE and CRPS in the original units (prey and predator populations). CRPS and "
                 f"coverage for the methods that give at least {MIN_SAMPLES_FOR_SPREAD} samples"
                 + (f" (a calibrated forecast's 5-95% band of {samples} samples covers "
                    f"{calibrated_coverage(samples):.0%} on average)" if samples >= MIN_SAMPLES_FOR_SPREAD else "")
                 + "; the physics fit knows the equations that made the data.")
    return "\n".join(lines)


def plot_forecasts(path: Path, contexts, truths, forecasts: dict[str, list[ModelForecast]], n_plots: int = 3) -> bool:
    """Context, truth, median forecast and 5-95% sample band for the first systems; False without matplotlib.

    ``forecasts`` maps a method to one ``ModelForecast`` per system (a point forecast: one sample);
    the first ``len(COLORS)`` methods are drawn.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print("note: no forecast.png: matplotlib is not installed (pip install matplotlib)")
        return False
    n_plots = min(n_plots, len(contexts))
    figure, axes = pyplot.subplots(n_plots, 2, figsize=(10, 2.6 * n_plots), squeeze=False)
    for row in range(n_plots):
        context, truth = contexts[row], truths[row]
        t_context = np.arange(len(context))
        t_future = np.arange(len(context), len(context) + len(truth))
        for column, variable in enumerate(("prey", "predator")):
            ax = axes[row, column]
            ax.plot(t_context, context[:, column], color="gray", label="context")
            ax.plot(t_future, truth[:, column], color="black", label="truth")
            for (method, per_system), color in zip(forecasts.items(), COLORS):
                forecast = per_system[row]
                if forecast.median is None:
                    continue
                ax.plot(t_future, forecast.median[:, column], color=color, label=method)
                if len(forecast.samples) > 1:
                    low, high = np.percentile(forecast.samples[:, :, column], [5, 95], axis=0)
                    ax.fill_between(t_future, low, high, color=color, alpha=0.2)
            ax.set_title(f"system {row}: {variable}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
    return True


def run_forecasts(model, tokenizer, series: np.ndarray, context: int, horizon: int, adapter: bool, samples: int,
                  temperature: float, top_p: float, seed: int, zero_shot: bool = True,
                  batch_systems: int = BATCH_SYSTEMS, clean: np.ndarray | None = None) -> tuple[dict, dict, list[int]]:
    """Forecast every system with the adapter (if ``adapter``), the base model (if ``zero_shot``) and the baselines.

    The model forecasts ``batch_systems`` systems per batch (``model_forecasts``); the batch
    starting at system i samples with seed ``seed + i``. Forecasts are scored against ``series``,
    the observations; with ``clean`` (the same systems without observation noise) each method's
    MAE against the clean truth is given too (``mae_clean``).

    Returns:
        ``(metrics, forecasts, scored)``: per-method metrics over the ``scored`` systems (those
        where every method produced a forecast), and the model forecasts per method and system.
    """
    contexts, truths = series[:, :context], series[:, context : context + horizon]
    models = {"LoRA adapter": True} if adapter else {}
    if zero_shot or not adapter:
        models["base model, zero-shot"] = False
    forecasts = {}
    for method, use_adapter in models.items():
        forecasts[method] = []
        with nullcontext() if use_adapter else disable_lora(model), \
                tqdm(total=len(contexts), desc=method, unit="system", dynamic_ncols=True) as progress:
            for start in range(0, len(contexts), batch_systems):
                batch = contexts[start : start + batch_systems]
                forecasts[method] += model_forecasts(model, tokenizer, batch, horizon, samples, temperature, top_p,
                                                     seed=seed + start)
                progress.update(len(batch))
    points = {method: [f.median for f in per_system] for method, per_system in forecasts.items()}
    points["persistence"] = [persistence(c, horizon) for c in contexts]
    points["linear extrapolation"] = [linear_extrapolation(c, horizon) for c in contexts]
    autoregressive = [autoregression(c, horizon, samples, seed=seed + i) for i, c in enumerate(contexts)]
    points[AUTOREGRESSION] = [point for point, _ in autoregressive]
    forecasts[AUTOREGRESSION] = [ModelForecast(paths, 0) for _, paths in autoregressive]
    points[PHYSICS] = list(physics_fit(contexts, horizon))  # every system fitted at once
    forecasts[PHYSICS] = [ModelForecast(point[None], 0) for point in points[PHYSICS]]
    # Compare on the same systems: those where every method that forecast anything produced a
    # forecast. A method with no well-formed forecast at all is reported, but not scored.
    producing = [method for method in points if any(point is not None for point in points[method])]
    scored = [i for i in range(len(series)) if all(points[method][i] is not None for method in producing)]
    results = {}
    for method, per_system in points.items():
        well_formed = [point is not None for point in per_system]
        results[method] = {}
        if method in producing and scored:
            forecast = np.stack([per_system[i] for i in scored])
            results[method] = errors(truths[scored], forecast)
            if clean is not None:
                results[method]["mae_clean"] = errors(clean[scored, context : context + horizon], forecast)["mae"]
        # A distribution: samples were asked for, and the method gives more than one (the physics fit gives a point).
        distribution = samples >= MIN_SAMPLES_FOR_SPREAD and any(len(f.samples) > 1 for f in forecasts.get(method, []))
        if results[method] and distribution:
            results[method].update(spread_scores(truths[scored], [forecasts[method][i].samples for i in scored]))
        results[method]["well_formed"] = float(np.mean(well_formed))
        results[method]["malformed_samples"] = sum(f.malformed for f in forecasts.get(method, []))
    return results, forecasts, scored


def main(argv=None) -> int:
    start = time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m eval.forecast", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", help="a .npz from save_dataset; default: the simulated data of training")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="observe the simulated held-out systems with multiplicative log-normal noise (0.05: "
                             "about 5%%), scored against the noisy values, with the clean truth's MAE beside "
                             "(%(default)s)")
    parser.add_argument("--systems", type=int, default=50, help="held-out test systems to forecast (%(default)s)")
    parser.add_argument("--context", type=int, default=50, help="steps shown to the model (%(default)s)")
    parser.add_argument("--horizon", type=int, default=10, help="steps to forecast (%(default)s)")
    parser.add_argument("--samples", type=int, default=SAMPLES,
                        help=f"sampled continuations per system; CRPS and coverage need {MIN_SAMPLES_FOR_SPREAD} "
                             "(%(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7, help="(%(default)s, as in the source material)")
    parser.add_argument("--top-p", type=float, default=0.9, help="(%(default)s, as in the source material)")
    parser.add_argument("--greedy", action="store_true", help="one deterministic continuation instead of samples")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="with --adapter, skip the base model (its forecasts do not depend on the adapter)")
    parser.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    parser.add_argument("--batch-systems", type=int, default=BATCH_SYSTEMS,
                        help="systems forecast per batch, each with its --samples rows; more needs more memory "
                             "(%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results/forecast"), help="folder for the table and plot")
    args = parser.parse_args(argv)
    try:
        dataset = series_dataset(args.data, args.noise)
        series = dataset.split("test")[: args.systems]
        clean = dataset.split("test", clean=True)[: args.systems] if dataset.clean is not None else None
        if args.context < 2 or args.horizon < 1 or args.context + args.horizon > series.shape[1]:
            raise ValueError(f"--context {args.context} + --horizon {args.horizon} must fit in the series' "
                             f"{series.shape[1]} steps, with a context of at least 2")
        if args.samples < 1 or args.systems < 1 or args.batch_systems < 1:
            raise ValueError("--samples, --systems and --batch-systems must be at least 1")
        model, tokenizer = load_model_and_adapter(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    temperature = 0.0 if args.greedy else args.temperature
    results, forecasts, scored = run_forecasts(model, tokenizer, series, args.context, args.horizon,
                                               bool(args.adapter), args.samples, temperature, args.top_p, args.seed,
                                               zero_shot=not args.no_zero_shot, batch_systems=args.batch_systems,
                                               clean=clean)
    table = markdown_table(results, len(scored), 1 if args.greedy else args.samples)
    settings = (f"{args.model} ({held_dtype(model)}), "
                + (f"{dataset.noise:g} observation noise, " if dataset.clean is not None else "")
                + f"context {args.context}, horizon {args.horizon}, "
                + ("greedy" if args.greedy else f"median of {args.samples} samples (T={args.temperature}, "
                                                f"top-p={args.top_p})"))
    print(settings)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    made = provenance(rerun_command("eval.forecast", argv), time.monotonic() - start)  # command, date, machine
    (args.out / "forecast.md").write_text(f"{made}\n\n{settings}\n\n{table}\n")
    contexts, truths = series[:, : args.context], series[:, args.context : args.context + args.horizon]
    if plot_forecasts(args.out / "forecast.png", contexts, truths, forecasts):
        print(f"saved {args.out}/forecast.md and {args.out}/forecast.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
