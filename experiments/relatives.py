"""LoRA's relatives, measured: plain LoRA, rsLoRA, DoRA, PiSSA and LoRA+ on one task, one budget, one seed.

Each run is one ordinary training run (``training.loop.train``) on the instruct task with the
same r (8), alpha (16), targets (q_proj, v_proj), steps, learning rate, data order and seed; only
the one switch that names the variant changes (``VARIANTS``)::

    lora:      h = W x + (alpha / r) B A x                   A random, B zero      (the paper's)
    rslora:    h = W x + (alpha / sqrt(r)) B A x             --use-rslora          (2.83x the scaling at r = 8)
    dora:      h = m (W + s B A) x / ||W + s B A||_c         --use-dora            (a magnitude m per output)
    pissa:     A, B = W's top-r singular part, W -> W_res    --init pissa          (starts at the same output)
    loraplus:  B at 16x A's learning rate                    --loraplus-ratio 16   (the same layer)

Nothing is tuned per variant: the loop's lr 1e-3 suits plain LoRA and is what every variant gets,
so a variant that wants another rate (PiSSA, whose A and B start large; LoRA+, whose B then steps
at 1.6e-2) shows it here rather than being rescued quietly.

Measured per run: the validation loss on the same held-out batches before and after, the mean
seconds of a training step (each step's tokens over its tokens/s in ``metrics.jsonl``, validation
and loading excluded), the trainable parameters, and the peak resident memory of the process
(``VmHWM``). That peak is process-wide and never goes down, so each run trains in a fresh
``python -m experiments.relatives --variant NAME`` subprocess and the number is that whole
process's peak: the frozen model, activations, adapter, gradients and AdamW's state together.

    OMP_NUM_THREADS=2 python -m experiments.relatives            # 5 runs, about 6 min on 2 CPU cores
    python -m experiments.relatives --model tiny-llama --steps 5 --out /tmp/relatives

writes ``relatives.md`` (the table, the command, the date, the machine), ``relatives.png`` (the
training and validation losses of each variant along training) and ``relatives.json`` (the rows) into ``--out``.
The run folders (adapters, metrics) go to ``--runs-folder``, a temporary folder by default.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from data.tasks import build_task
from eval.provenance import provenance, rerun_command
from lora import count_parameters, inject_lora, parse_targets
from models.loader import EMBEDDED, load_config, load_tokenizer
from training.config import TrainConfig
from training.loop import step_plan, train

# Each variant's one change to the training loop's settings (TrainConfig fields); "lora" changes nothing.
VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "loraplus": {"loraplus_ratio": 16.0},  # the LoRA+ paper's rule of thumb
}
LABELS = {"lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA", "pissa": "PiSSA", "loraplus": "LoRA+ (ratio 16)"}


@dataclass
class StudyConfig:
    variants: str = ",".join(VARIANTS)  # comma-separated names from VARIANTS
    steps: int = 150  # optimizer steps per run, batch 2: the loop's default, as in the rank study
    eval_batches: int = 8  # validation batches of 2, the same ones before and after every run: the loop's default
    eval_every: int = 25  # validate every this many steps too, for the curves in the plot
    r: int = 8  # the same rank for every variant: the loop's default
    alpha: float = 16.0  # the same alpha for every variant: the loop's default
    targets: str = "q_proj,v_proj"  # the LoRA paper's choice
    lr: float = 1e-3  # the loop's default, for every variant (LoRA+: A's rate; B's is 16 times it)
    seed: int = 0  # the same data order and A for every run
    model: str = EMBEDDED  # tiny-llama for a test run
    data: str | None = None  # an Alpaca .json/.jsonl for the instruct task; default: the embedded generated tasks
    isolate: bool = True  # each run in its own process, so its peak memory is its own
    out: str = "results/relatives"  # where relatives.md/.png/.json go
    runs_folder: str | None = None  # the run folders; default a temporary folder, deleted at the end

    def variant_list(self) -> list[str]:
        """The variants of ``variants``; ``ValueError`` naming ``--variants`` and the valid names for any other."""
        names = [name.strip() for name in self.variants.split(",") if name.strip()]
        for name in names or [""]:
            if name not in VARIANTS:
                raise ValueError(f"--variants must be comma-separated names from {', '.join(VARIANTS)}, "
                                 f"got {self.variants!r}")
        return names

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option that cannot work."""
        self.variant_list()
        for name in ("steps", "eval_batches", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def train_config(config: StudyConfig, variant: str, runs_folder: Path) -> TrainConfig:
    """The loop's settings for ``variant``: the study's shared ones, plus the variant's one switch."""
    return TrainConfig(model=config.model, task="instruct", data=config.data, targets=config.targets, r=config.r,
                       alpha=config.alpha, lr=config.lr, seed=config.seed, max_steps=config.steps,
                       eval_every=config.eval_every, checkpoint_every=config.steps, eval_batches=config.eval_batches,
                       out=str(runs_folder), name=variant, **VARIANTS[variant])


def trainable_count(config: TrainConfig) -> int:
    """The parameters ``inject_lora`` leaves trainable for ``config``, on the model's shape (meta device).

    PiSSA has LoRA's count (it changes where A and B start, not their shapes); DoRA adds one m per output.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(config.model))
    inject_lora(model, parse_targets(config.targets), r=config.r, alpha=config.alpha, use_dora=config.use_dora)
    return count_parameters(model)[0]


def step_tokens(config: TrainConfig) -> list[int]:
    """The tokens (attention-mask ones) of each optimizer step of the run ``config`` describes.

    The loop's own plan (``step_plan``) over the loop's own data (``build_task``): the same batches it trained on.
    """
    data = build_task(config, load_tokenizer(config.model))
    plan = step_plan([len(example["input_ids"]) for example in data.train], config.batch_size, config.grad_accum,
                     config.seed)
    return [sum(sum(data.train[i].get("attention_mask", [1] * len(data.train[i]["input_ids"])))
                for _, indices in plan(step) for i in indices) for step in range(config.max_steps)]


def seconds_per_step(metrics_path: Path, tokens: list[int]) -> float:
    """The mean time of a training step: each step's tokens over the tokens/s the loop logged for it."""
    entries = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    logged = {entry["step"]: entry["tokens_per_second"] for entry in entries if "tokens_per_second" in entry}
    return sum(tokens[step - 1] / logged[step] for step in logged) / len(logged)


def curve(metrics_path: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every entry of ``metrics.jsonl`` that has ``key`` ("loss", "val_loss")."""
    entries = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [(entry["step"], entry[key]) for entry in entries if key in entry]


def run_variant(config: StudyConfig, variant: str, runs_folder: Path) -> dict:
    """Train ``variant`` in this process; its row: losses, seconds per step, parameters, peak memory so far."""
    settings = train_config(config, variant, runs_folder)
    summary = train(settings)
    metrics, tokens = Path(summary["run"]) / "metrics.jsonl", step_tokens(settings)
    if sum(tokens) != summary["tokens"]:  # the plan re-read here must be the one the loop trained on
        raise RuntimeError(f"{variant}: {sum(tokens)} tokens planned but the loop saw {summary['tokens']}")
    return {"variant": variant, "label": LABELS[variant], "change": VARIANTS[variant],
            "val_loss_start": summary["val_loss_start"], "val_loss_end": summary["val_loss_end"],
            "seconds_per_step": seconds_per_step(metrics, tokens),
            "trainable": trainable_count(settings), "peak_rss_mb": peak_rss_mb(), "isolated": False,
            "seconds": summary["seconds"], "val_curve": curve(metrics, "val_loss"),
            "train_curve": curve(metrics, "loss")}


STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB: Linux's ``VmHWM``, else ``ru_maxrss``.

    ``VmHWM`` is this process's own peak. ``ru_maxrss`` is not always: Linux carries it over
    ``exec``, so a child process may report its parent's peak (as ``benchmarks/lora_step.py`` notes).
    """
    if STATUS.exists():
        line = next(line for line in STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def child_argv(config: StudyConfig, variant: str, runs_folder: Path, row_path: Path) -> list[str]:
    """The command line that trains ``variant`` alone in a new process and writes its row to ``row_path``."""
    argv = ["--variant", variant, "--row-out", str(row_path), "--runs-folder", str(runs_folder)]
    for field in fields(StudyConfig):
        if field.name not in ("variants", "isolate", "out", "runs_folder") and getattr(config, field.name) is not None:
            argv += [f"--{field.name.replace('_', '-')}", str(getattr(config, field.name))]
    return argv


def run_isolated(config: StudyConfig, variant: str, runs_folder: Path) -> dict:
    """Train ``variant`` in a fresh ``python -m experiments.relatives`` process; its row, peak memory its own."""
    row_path = runs_folder / f"{variant}.row.json"
    subprocess.run([sys.executable, "-m", "experiments.relatives",
                    *child_argv(config, variant, runs_folder, row_path)], check=True)
    return json.loads(row_path.read_text())


def run_study(config: StudyConfig, runs_folder: Path) -> list[dict]:
    """Train every variant of ``config`` (each in its own process when ``config.isolate``); one row each, in order."""
    runs_folder.mkdir(parents=True, exist_ok=True)
    run = run_isolated if config.isolate else run_variant
    return [run(config, variant, runs_folder) for variant in config.variant_list()]


def flags(change: dict) -> str:
    """A variant's change as the loop's flags: ``{"use_dora": True}`` -> ``--use-dora``."""
    return ", ".join(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value:g}" if isinstance(value, float)
                                                     else f" {value}") for key, value in change.items())


def relatives_table(rows: list[dict]) -> str:
    """The rows as Markdown: what changed, the validation loss before and after, time, parameters, memory."""
    lines = ["| variant | change to the loop | val loss start | val loss end | s / step | trainable params "
             "| peak RSS (MiB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        change = flags(row["change"]) or "(none)"
        memory = f"{row['peak_rss_mb']:,.0f}" if row["isolated"] else "n/a"
        lines.append(f"| {row['label']} | {change} | {row['val_loss_start']:.4f} | {row['val_loss_end']:.4f} "
                     f"| {row['seconds_per_step']:.2f} | {row['trainable']:,} | {memory} |")
    return "\n".join(lines)


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_study(rows: list[dict], png_path: Path) -> bool:
    """Each variant's training loss against plain LoRA's and its validation loss; False without matplotlib.

    Every run sees the same batches in the same order, so the training loss minus plain LoRA's on
    the same step takes out how hard each batch is, which otherwise swamps the differences; it is
    drawn as a moving average over 10 steps. Without a plain LoRA row, the training loss itself.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # draw to a file; no display needed
        from matplotlib import pyplot
    except ImportError:
        print("note: no plot: matplotlib is not installed (pip install matplotlib)")
        return False
    plain = next((dict(row["train_curve"]) for row in rows if row["variant"] == "lora"), None)
    figure, (training, validation) = pyplot.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        steps, losses = zip(*row["train_curve"])
        if plain is not None:
            losses = [loss - plain[step] for step, loss in zip(steps, losses)]
        training.plot(steps, moving_average(list(losses), 10), label=row["label"])
        validation.plot(*zip(*row["val_curve"]), "o-", label=row["label"])
    what = "training loss − LoRA's on the same batch" if plain is not None else "training loss"
    for axes, label in ((training, f"{what}\n(mean of 10 steps)"), (validation, "validation loss")):
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    validation.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    pyplot.close(figure)
    return True


def findings(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows: the order of the variants, and each one against plain LoRA."""
    said = ["Lowest validation loss first: " + "; ".join(
        f"{row['label']} {row['val_loss_end']:.4f}" for row in sorted(rows, key=lambda row: row["val_loss_end"])) + "."]
    plain = next((row for row in rows if row["variant"] == "lora"), None)
    if plain is not None:
        for row in rows:
            if row["val_loss_start"] != plain["val_loss_start"]:
                said.append(f"{row['label']} starts at a validation loss of {row['val_loss_start']:.4f}, not "
                            f"{plain['val_loss_start']:.4f}: its start equals the base model only up to the rounding "
                            "of its frozen weights to the base's dtype.")
        for row in rows:
            if row is not plain:
                said.append(f"{row['label']}: validation loss {row['val_loss_end'] - plain['val_loss_end']:+.4f} "
                            f"against LoRA's, {row['seconds_per_step'] / plain['seconds_per_step']:.2f}x its time a "
                            f"step, {row['trainable'] - plain['trainable']:+,} trainable parameters.")
    return said


def write_report(rows: list[dict], config: StudyConfig, command: str, seconds: float) -> Path:
    """Write relatives.md, .png and .json into ``config.out``; return the Markdown file's path."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "relatives.json").write_text(json.dumps({"config": asdict(config), "rows": rows}, indent=2) + "\n")
    plotted = plot_study(rows, out / "relatives.png")
    memory = ("Runs shared one process (`--no-isolate`), so no run's own peak memory was measured."
              if not config.isolate else "Peak RSS is each run's own process's peak resident memory (`VmHWM`): the "
              "frozen model, activations, adapter, gradients and AdamW's state, and Python and torch themselves.")
    parts = [
        "# LoRA's relatives, measured\n",
        provenance(command, seconds) + " "
        f"Model {config.model}, instruct task ({config.data or 'the embedded generated tasks'}), {config.steps} "
        f"steps of batch 2 per run, r = {config.r}, "
        f"alpha = {config.alpha:g}, LoRA on {config.targets}, lr {config.lr:g} for every variant (the loop's "
        f"defaults otherwise: warm-up and cosine decay, seed {config.seed}), validation loss on the same "
        f"{2 * config.eval_batches} held-out examples at the start and every {config.eval_every} steps. "
        "One seed and one data order per run: "
        "a small difference between two rows may not survive another seed.\n",
        relatives_table(rows) + "\n",
        "s / step: the mean time of a training step (validation and loading excluded), from the tokens/s the "
        f"loop logs. {memory}\n",
    ]
    if plotted:
        parts.append("![each variant's training loss against plain LoRA's, and its validation loss](relatives.png)\n")
    parts += ["## What it shows\n", "\n".join(f"- {sentence}" for sentence in findings(rows)) + "\n"]
    path = out / "relatives.md"
    path.write_text("\n".join(parts))
    return path


def build_parser() -> argparse.ArgumentParser:
    """One ``--flag`` per ``StudyConfig`` field, and ``--variant``/``--row-out`` for one run in a child process."""
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(prog="python -m experiments.relatives", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", default=defaults.variants, help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per run")
    parser.add_argument("--eval-batches", type=int, default=defaults.eval_batches,
                        help="validation batches of 2 sequences, scored before and after each run")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every,
                        help="also validate every this many steps (the plot's curves)")
    parser.add_argument("--r", type=int, default=defaults.r, help="LoRA's rank, the same for every variant")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA's alpha, the same for every variant")
    parser.add_argument("--targets", default=defaults.targets, help="comma-separated module names to adapt")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="the learning rate of every variant")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data order, A's start, dropout")
    parser.add_argument("--model", default=defaults.model, help="the model; tiny-llama for a quick check")
    parser.add_argument("--data", default=defaults.data,
                        help="an Alpaca .json or .jsonl to train on; default: the embedded generated tasks")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=defaults.isolate,
                        help="train each variant in its own process, so its peak memory is its own")
    parser.add_argument("--out", default=defaults.out, help="folder for relatives.md, .png and .json")
    parser.add_argument("--runs-folder", default=defaults.runs_folder,
                        help="folder for the run folders (adapters, metrics); default: a temporary one, deleted")
    parser.add_argument("--variant", choices=list(VARIANTS), help="train this one variant and write its row "
                        "to --row-out (what the study runs in each child process)")
    parser.add_argument("--row-out", help="with --variant: the JSON file for its row")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    variant, row_out = options.pop("variant"), options.pop("row_out")
    config = StudyConfig(**options)
    try:
        config.validate()
        if (variant is None) != (row_out is None) or (variant and not config.runs_folder):
            raise ValueError("--variant needs --row-out and --runs-folder (the study passes all three)")
    except ValueError as error:
        parser.error(str(error))  # one line and exit status 2
    if variant is not None:  # one run, alone in this process: its peak memory is this process's
        row = {**run_variant(config, variant, Path(config.runs_folder)), "isolated": True}
        Path(row_out).write_text(json.dumps(row) + "\n")
        return 0
    start = time.perf_counter()
    command = rerun_command("experiments.relatives", argv)
    with tempfile.TemporaryDirectory(prefix="relatives-") as temporary:
        rows = run_study(config, Path(config.runs_folder or temporary))
    path = write_report(rows, config, command, time.perf_counter() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
