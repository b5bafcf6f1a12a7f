"""Rank and alpha, measured: validation loss against LoRA's rank r under two rules for alpha.

Each run is one ordinary training run (``training.loop.train``) on the instruct task; only r,
alpha and the target modules change between runs. Two rules for alpha::

    fixed:  alpha = 16 for every r     scaling = alpha / r = 16 / r   (the LoRA paper, §4.1)
    2r:     alpha = 2 r                 scaling = 2 for every r        (a common rule of thumb)

At r = 8 the two rules give the same alpha (16), so that run is made once and reported under
both. Then the LoRA paper's Table 5, which spends a fixed budget of trainable parameters on
different target sets: q_proj at r = 8, q_proj and v_proj at r = 4, all four attention
projections at r = 2 (alpha fixed). The budgets are equal only where every projection is
square; SmolLM2's k_proj and v_proj map 576 -> 192 (grouped-query attention), so the counts
are computed here, on the model, rather than assumed.

    OMP_NUM_THREADS=1 python -m experiments.rank_study     # 13 runs, about 20 min on 2 shared CPU cores
    python -m experiments.rank_study --ranks 2,8 --steps 20 --no-table5 --out /tmp/study

(On a CPU shared with other jobs, one thread per process: two threads spinning against another
job's made each step about 30 times slower.)

writes ``rank_study.md`` (tables, the command, the date, the machine), ``rank_study.png``
(validation loss against r) and ``rank_study.json`` (the rows) into ``--out``. The run
folders (adapters, metrics) go to ``--runs-folder``, a temporary folder by default.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from eval.provenance import provenance, rerun_command
from lora import count_parameters, inject_lora, parse_targets
from models.loader import EMBEDDED, load_config
from training.config import TrainConfig
from training.loop import train

POLICIES = ("fixed", "2r")
FIXED_ALPHA = 16.0  # the training loop's default alpha (TrainConfig.alpha): 2 r at its default r = 8
# The LoRA paper's Table 5: the same budget (18M parameters on GPT-3) spent on different target sets.
TABLE5 = (("q_proj", 8), ("q_proj,v_proj", 4), ("q_proj,k_proj,v_proj,o_proj", 2))
DEFAULT_TARGETS = "q_proj,v_proj"


def alpha_for(policy: str, r: int, fixed_alpha: float = FIXED_ALPHA) -> float:
    """alpha under ``policy``: ``fixed_alpha`` whatever r ("fixed"), or ``2 r`` ("2r")."""
    if policy == "fixed":
        return float(fixed_alpha)
    if policy == "2r":
        return float(2 * r)
    raise ValueError(f"unknown alpha policy {policy!r}; choose one of {', '.join(POLICIES)}")


def scaling_for(policy: str, r: int, fixed_alpha: float = FIXED_ALPHA) -> float:
    """The factor LoRA multiplies B A x by, ``alpha / r``: ``fixed_alpha / r`` ("fixed") or 2 ("2r")."""
    return alpha_for(policy, r, fixed_alpha) / r


def lora_parameter_count(model_name: str, targets: str, r: int) -> int:
    """Trainable parameters after ``inject_lora(model, targets, r)`` on ``model_name``'s architecture.

    The model is built from its config on the meta device (shapes, no weights: instant, no
    memory), and counted with ``lora.count_parameters``: per adapted module ``r * (in + out)``.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(model_name))
    inject_lora(model, parse_targets(targets), r=r, alpha=FIXED_ALPHA)
    trainable, _ = count_parameters(model)
    return trainable


@dataclass(frozen=True)
class Run:
    """One training run of the study: the rule for alpha, the rank, the target modules."""

    policy: str
    r: int
    targets: str = DEFAULT_TARGETS
    part: str = "sweep"  # "sweep": the rank sweep; "table5": a target set of the paper's Table 5

    @property
    def alpha(self) -> float:
        return alpha_for(self.policy, self.r)

    @property
    def name(self) -> str:
        return f"{self.targets.replace(',', '+')}-r{self.r}-alpha{self.alpha:g}"


def planned_runs(ranks: list[int], policies: list[str], table5: bool) -> list[Run]:
    """The rank sweep (every policy x every rank), then Table 5's target sets; ``Run.name`` tells twins apart.

    Two runs with the same targets, r and alpha (r = 8 under both policies; Table 5's q and v at
    r = 4) have the same name and are trained once (``run_study``).
    """
    runs = [Run(policy, r) for policy in policies for r in ranks]
    if table5:
        runs += [Run("fixed", r, targets, "table5") for targets, r in TABLE5]
    return runs


@dataclass
class StudyConfig:
    ranks: str = "1,2,4,8,16,32"  # comma-separated ranks for the sweep
    policies: str = "fixed,2r"  # alpha rules, see POLICIES
    steps: int = 150  # optimizer steps per run: the training loop's default
    eval_batches: int = 8  # validation batches of 2, the same ones before and after every run: the loop's default
    table5: bool = True  # also run the LoRA paper's Table 5 target sets
    model: str = EMBEDDED  # tiny-llama for a test run
    out: str = "results/rank_study"  # where rank_study.md/.png/.json go
    runs_folder: str | None = None  # the run folders; default a temporary folder, deleted at the end

    def rank_list(self) -> list[int]:
        """The ranks of ``ranks``; ``ValueError`` naming ``--ranks`` unless they are positive integers."""
        parts = [part.strip() for part in self.ranks.split(",") if part.strip()]
        if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ValueError(f"--ranks must be comma-separated positive integers such as 1,2,4,8, got {self.ranks!r}")
        return [int(part) for part in parts]

    def policy_list(self) -> list[str]:
        """The alpha rules of ``policies``; ``ValueError`` naming the valid ones for any other."""
        policies = [part.strip() for part in self.policies.split(",") if part.strip()]
        for policy in policies or [""]:
            if policy not in POLICIES:
                raise ValueError(f"--policies must be comma-separated rules from {', '.join(POLICIES)}, "
                                 f"got {self.policies!r}")
        return policies

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option that cannot work."""
        self.rank_list()
        self.policy_list()
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.eval_batches < 1:
            raise ValueError(f"--eval-batches must be at least 1, got {self.eval_batches}")


def run_study(config: StudyConfig, runs_folder: Path) -> list[dict]:
    """Train every planned run (each distinct one once); one row per planned run, in plan order."""
    done: dict[str, dict] = {}
    rows = []
    for run in planned_runs(config.rank_list(), config.policy_list(), config.table5):
        if run.name not in done:
            summary = train(TrainConfig(model=config.model, task="instruct", targets=run.targets, r=run.r,
                                        alpha=run.alpha, max_steps=config.steps, eval_every=config.steps,
                                        eval_batches=config.eval_batches,
                                        out=str(runs_folder), name=run.name))
            done[run.name] = {"val_loss_start": summary["val_loss_start"], "val_loss_end": summary["val_loss_end"],
                              "seconds": summary["seconds"]}
        rows.append({"policy": run.policy, "r": run.r, "alpha": run.alpha, "scaling": run.alpha / run.r,
                     "targets": run.targets, "part": run.part,
                     "trainable": lora_parameter_count(config.model, run.targets, run.r), **done[run.name]})
    return rows


def rank_table(rows: list[dict]) -> str:
    """The sweep as Markdown: one row per (policy, r), the validation loss before and after training."""
    lines = ["| alpha rule | r | alpha | scaling alpha/r | trainable params | val loss start | val loss end |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["part"] == "sweep":
            rule = "fixed 16" if row["policy"] == "fixed" else "2r"
            lines.append(f"| {rule} | {row['r']} | {row['alpha']:g} | {row['scaling']:.3g} | {row['trainable']:,} "
                         f"| {row['val_loss_start']:.4f} | {row['val_loss_end']:.4f} |")
    return "\n".join(lines)


def budget_table(rows: list[dict]) -> str:
    """Table 5's target sets as Markdown: targets, r, trainable parameters, validation loss after training."""
    lines = ["| targets | r | alpha | trainable params | val loss end |", "| --- | --- | --- | --- | --- |"]
    for targets, r in TABLE5:
        for row in rows:
            if row["targets"] == targets and row["r"] == r and row["policy"] == "fixed" and row["part"] == "table5":
                lines.append(f"| {targets} | {r} | {row['alpha']:g} | {row['trainable']:,} "
                             f"| {row['val_loss_end']:.4f} |")
    return "\n".join(lines)


def plot_study(rows: list[dict], png_path: Path) -> bool:
    """Validation loss after training against r (log scale), one line per policy; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # draw to a file; no display needed
        from matplotlib import pyplot
    except ImportError:
        print("note: no plot: matplotlib is not installed (pip install matplotlib)")
        return False
    sweep = [row for row in rows if row["part"] == "sweep"]
    figure, axes = pyplot.subplots(figsize=(7, 4))
    for policy, label, marker in (("fixed", f"alpha = {FIXED_ALPHA:g} (scaling 16/r)", "o-"),
                                  ("2r", "alpha = 2r (scaling 2)", "s--")):
        points = sorted((row["r"], row["val_loss_end"]) for row in sweep if row["policy"] == policy)
        if points:
            axes.plot(*zip(*points), marker, label=label)
    if sweep:  # a title, not a line: at 4.17 against ~1.5 a line would squash the curves flat
        axes.set_title(f"validation loss before training: {sweep[0]['val_loss_start']:.4f}", fontsize=10)
        ranks = sorted({row["r"] for row in sweep})
        axes.set_xscale("log", base=2)
        axes.set_xticks(ranks, [str(r) for r in ranks])
    axes.set_xlabel("rank r (LoRA on q_proj, v_proj)")
    axes.set_ylabel("validation loss after training")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    pyplot.close(figure)
    return True


def findings(rows: list[dict]) -> list[str]:
    """Sentences stating what the numbers show, computed from them: each rule's range over r, where
    the two rules part, and the order of the Table 5 target sets."""
    said = []
    curves = {policy: sorted((row["r"], row["val_loss_end"]) for row in rows
                             if row["part"] == "sweep" and row["policy"] == policy) for policy in POLICIES}
    for policy, rule in (("fixed", f"alpha fixed at {FIXED_ALPHA:g}"), ("2r", "alpha = 2r")):
        points = curves[policy]
        if len(points) > 1:
            best = min(points, key=lambda point: point[1])
            falling = all(later < earlier for (_, earlier), (_, later) in zip(points, points[1:]))
            said.append(f"With {rule}, the validation loss ends between {min(p[1] for p in points):.4f} and "
                        f"{max(p[1] for p in points):.4f} over r = {', '.join(str(p[0]) for p in points)}; "
                        f"lowest at r = {best[0]}" + ("; it falls with every larger r." if falling else "."))
    both = sorted(set(dict(curves["fixed"])) & set(dict(curves["2r"])))
    if both:
        fixed, doubled = dict(curves["fixed"]), dict(curves["2r"])
        lower = [r for r in both if doubled[r] < fixed[r]]
        higher = [r for r in both if doubled[r] > fixed[r]]
        said.append(f"alpha = 2r ends lower than alpha fixed at r = {', '.join(map(str, lower)) or 'none'}, and higher "
                    f"at r = {', '.join(map(str, higher)) or 'none'}; its scaling, 2, is the larger of the two "
                    f"exactly when r > {FIXED_ALPHA / 2:g}.")
    budget = sorted((row for row in rows if row["part"] == "table5"), key=lambda row: row["val_loss_end"])
    if budget:
        said.append("Table 5's target sets, lowest loss first: " + "; ".join(
            f"{row['targets']} at r = {row['r']} ({row['trainable']:,} parameters): {row['val_loss_end']:.4f}"
            for row in budget) + ".")
    return said


def write_report(rows: list[dict], config: StudyConfig, command: str, seconds: float) -> Path:
    """Write rank_study.md, .png and .json into ``config.out``; return the Markdown file's path."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_study.json").write_text(json.dumps({"config": asdict(config), "rows": rows}, indent=2) + "\n")
    plotted = plot_study(rows, out / "rank_study.png")
    parts = [
        "# Rank and alpha, measured\n",
        provenance(command, seconds) + " "
        f"Model {config.model}, instruct task, {config.steps} steps of batch 2 per run (the training loop's "
        "defaults otherwise: lr 1e-3 with warm-up and cosine decay, seed 0), validation loss on the same "
        "held-out batches before and after. One seed and one data order per run: a small difference between "
        "two rows may not survive another seed.\n",
        "## Validation loss against r (LoRA on q_proj, v_proj)\n",
        rank_table(rows) + "\n",
        "At r = 8 both rules give alpha = 16: that row is one run, shown under both.\n",
    ]
    if plotted:
        parts.append("![validation loss against r](rank_study.png)\n")
    if any(row["part"] == "table5" for row in rows):
        parts += ["## The LoRA paper's Table 5 budgets (alpha fixed at 16)\n", budget_table(rows) + "\n",
                  "The paper's budgets are equal on GPT-3, whose projections are all square. Here k_proj and "
                  "v_proj map 576 -> 192 (grouped-query attention), so the three sets differ in size; the "
                  "counts above are what `inject_lora` leaves trainable.\n"]
    parts += ["## What it shows\n", "\n".join(f"- {sentence}" for sentence in findings(rows)) + "\n"]
    path = out / "rank_study.md"
    path.write_text("\n".join(parts))
    return path


def build_parser() -> argparse.ArgumentParser:
    """One ``--flag`` per ``StudyConfig`` field; ``--no-table5`` skips the target-set runs."""
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(prog="python -m experiments.rank_study", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ranks", default=defaults.ranks, help="comma-separated ranks for the sweep")
    parser.add_argument("--policies", default=defaults.policies, help=f"alpha rules: {', '.join(POLICIES)}")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per run")
    parser.add_argument("--eval-batches", type=int, default=defaults.eval_batches,
                        help="validation batches of 2 sequences, scored before and after each run")
    parser.add_argument("--table5", action=argparse.BooleanOptionalAction, default=defaults.table5,
                        help="also run the LoRA paper's Table 5 target sets at equal budgets")
    parser.add_argument("--model", default=defaults.model, help="the model; tiny-llama for a quick check")
    parser.add_argument("--out", default=defaults.out, help="folder for rank_study.md, .png and .json")
    parser.add_argument("--runs-folder", default=defaults.runs_folder,
                        help="folder for the run folders (adapters, metrics); default: a temporary one, deleted")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    config = StudyConfig(**vars(parser.parse_args(argv)))
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))  # one line and exit status 2
    start = time.perf_counter()
    command = rerun_command("experiments.rank_study", argv)
    with tempfile.TemporaryDirectory(prefix="rank_study-") as temporary:
        rows = run_study(config, Path(config.runs_folder or temporary))
    path = write_report(rows, config, command, time.perf_counter() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
