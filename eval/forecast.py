"""Forecasting held-out predator-prey systems with the LLM, against baselines that need no model.

For each held-out system: the first ``context`` steps are written as LLMTIME text (scaled on
the context alone), followed by ";", and the model writes on. The first ``horizon`` steps it
writes are read back with ``decode`` and compared with the truth, in the original units.

    python -m eval.forecast --adapter runs/NAME/adapter     # the adapter, the base model, the baselines
    python -m eval.forecast                                 # the base model zero-shot and the baselines

With ``--samples K`` the model writes K continuations (temperature and top-p sampling) and
the point forecast is their median, with the 5-95% band of the samples as its spread;
``--greedy`` writes one, deterministically. A continuation that does not hold ``horizon``
well-formed steps is *malformed*: it is counted, and left out of the median.

Baselines on the same systems: persistence (the last context value, repeated) and linear
extrapolation (a least-squares line through the last few context steps). A model that does
not beat persistence has learned nothing useful about the dynamics.
"""

import argparse
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.llmtime import decode, encode, fit_scaler
from data.tasks import task_split
from eval.cli import add_model_arguments, load_model_and_adapter
from eval.generate import generate
from lora import disable_lora

LINEAR_WINDOW = 5  # context steps the linear baseline fits; few enough to follow the current trend


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


@dataclass
class ModelForecast:
    """The K decoded continuations of one system that held ``horizon`` steps, and how many did not."""

    samples: np.ndarray  # (k_well_formed, horizon, n_vars), original units
    malformed: int

    @property
    def median(self) -> np.ndarray | None:
        return np.median(self.samples, axis=0) if len(self.samples) else None


def model_forecast(model, tokenizer, context: np.ndarray, horizon: int, samples: int = 5, temperature: float = 0.7,
                   top_p: float = 0.9, seed: int = 0, decimals: int = 2) -> ModelForecast:
    """Let the model continue the LLMTIME text of ``context``; ``temperature=0`` writes one greedy continuation."""
    scaler = fit_scaler(context)
    prompt = encode(context, scaler, decimals) + ";"
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    # Room for horizon steps as long as the longest context step, plus slack for longer numbers.
    step_length = max(len(step) for step in prompt.split(";")) + 1
    max_new_tokens = horizon * (step_length + 2)
    rows = 1 if temperature == 0 else samples
    device = next(model.parameters()).device
    new = generate(model, input_ids.repeat(rows, 1).to(device), max_new_tokens, temperature=temperature,
                   top_p=top_p, seed=seed, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    parsed = [decode(text, scaler)[:horizon] for text in texts]
    good = [forecast for forecast in parsed if len(forecast) == horizon]
    n_vars = context.shape[1]
    return ModelForecast(np.stack(good) if good else np.empty((0, horizon, n_vars)), rows - len(good))


def errors(truth: np.ndarray, forecast: np.ndarray) -> dict:
    """MAE and MSE over everything and per horizon step; ``truth`` and ``forecast`` are ``(systems, horizon, vars)``."""
    difference = forecast - truth
    return {
        "mae": float(np.abs(difference).mean()),
        "mse": float((difference**2).mean()),
        "mae_by_step": np.abs(difference).mean(axis=(0, 2)).tolist(),
        "mse_by_step": (difference**2).mean(axis=(0, 2)).tolist(),
    }


def markdown_table(results: dict[str, dict], n_systems: int) -> str:
    """One row per method: MAE, MSE, MAE at the first and last horizon step, share of well-formed forecasts."""
    lines = [
        "| method | MAE | MSE | MAE step 1 | MAE last step | well-formed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, result in results.items():
        if "mae" not in result:
            lines.append(f"| {method} | - | - | - | - | {result['well_formed']:.0%} |")
            continue
        lines.append(f"| {method} | {result['mae']:.3f} | {result['mse']:.3f} | {result['mae_by_step'][0]:.3f} | "
                     f"{result['mae_by_step'][-1]:.3f} | {result['well_formed']:.0%} |")
    lines.append(f"\nScored on the {n_systems} held-out systems where every method with any well-formed forecast "
                 "produced one; MAE and MSE in the original units (prey and predator populations).")
    return "\n".join(lines)


def plot_forecasts(path: Path, contexts, truths, forecasts: dict[str, list[ModelForecast]], n_plots: int = 3) -> bool:
    """Context, truth, median forecast and 5-95% sample band for the first systems; False without matplotlib."""
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
            for (method, per_system), color in zip(forecasts.items(), ("tab:blue", "tab:orange")):
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
                  temperature: float, top_p: float, seed: int, zero_shot: bool = True) -> tuple[dict, dict, list[int]]:
    """Forecast every system with the adapter (if ``adapter``), the base model (if ``zero_shot``) and the baselines.

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
        with nullcontext() if use_adapter else disable_lora(model):
            forecasts[method] = [
                model_forecast(model, tokenizer, c, horizon, samples, temperature, top_p, seed=seed + i)
                for i, c in enumerate(tqdm(contexts, desc=method, dynamic_ncols=True))
            ]
    points = {method: [f.median for f in per_system] for method, per_system in forecasts.items()}
    points["persistence"] = [persistence(c, horizon) for c in contexts]
    points["linear extrapolation"] = [linear_extrapolation(c, horizon) for c in contexts]
    # Compare on the same systems: those where every method that forecast anything produced a
    # forecast. A method with no well-formed forecast at all is reported, but not scored.
    producing = [method for method in points if any(point is not None for point in points[method])]
    scored = [i for i in range(len(series)) if all(points[method][i] is not None for method in producing)]
    results = {}
    for method, per_system in points.items():
        well_formed = [point is not None for point in per_system]
        results[method] = errors(truths[scored], np.stack([per_system[i] for i in scored])) if (
            method in producing and scored) else {}
        results[method]["well_formed"] = float(np.mean(well_formed))
        results[method]["malformed_samples"] = sum(f.malformed for f in forecasts.get(method, []))
    return results, forecasts, scored


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.forecast", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", help="a .npz from save_dataset; default: the simulated data of training")
    parser.add_argument("--systems", type=int, default=50, help="held-out test systems to forecast (%(default)s)")
    parser.add_argument("--context", type=int, default=50, help="steps shown to the model (%(default)s)")
    parser.add_argument("--horizon", type=int, default=10, help="steps to forecast (%(default)s)")
    parser.add_argument("--samples", type=int, default=5, help="sampled continuations per system (%(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7, help="(%(default)s, as in the source material)")
    parser.add_argument("--top-p", type=float, default=0.9, help="(%(default)s, as in the source material)")
    parser.add_argument("--greedy", action="store_true", help="one deterministic continuation instead of samples")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="with --adapter, skip the base model (its forecasts do not depend on the adapter)")
    parser.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results/forecast"), help="folder for the table and plot")
    args = parser.parse_args(argv)
    try:
        series = task_split("llmtime", "test", args.data)[: args.systems]
        if args.context < 2 or args.horizon < 1 or args.context + args.horizon > series.shape[1]:
            raise ValueError(f"--context {args.context} + --horizon {args.horizon} must fit in the series' "
                             f"{series.shape[1]} steps, with a context of at least 2")
        if args.samples < 1 or args.systems < 1:
            raise ValueError("--samples and --systems must be at least 1")
        model, tokenizer = load_model_and_adapter(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    temperature = 0.0 if args.greedy else args.temperature
    results, forecasts, scored = run_forecasts(model, tokenizer, series, args.context, args.horizon,
                                               bool(args.adapter), args.samples, temperature, args.top_p, args.seed,
                                               zero_shot=not args.no_zero_shot)
    table = markdown_table(results, len(scored))
    settings = (f"{args.model}, context {args.context}, horizon {args.horizon}, "
                + ("greedy" if args.greedy else f"median of {args.samples} samples (T={args.temperature}, "
                                                f"top-p={args.top_p})"))
    print(settings)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forecast.md").write_text(f"{settings}\n\n{table}\n")
    contexts, truths = series[:, : args.context], series[:, args.context : args.context + args.horizon]
    if plot_forecasts(args.out / "forecast.png", contexts, truths, forecasts):
        print(f"saved {args.out}/forecast.md and {args.out}/forecast.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
