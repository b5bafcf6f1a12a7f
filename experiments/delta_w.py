"""Is ΔW really low-rank? The LoRA paper's §7, measured on SmolLM2.

LoRA bets that the change fine-tuning makes to a weight, ΔW = W_after - W0, has a low
"intrinsic rank", so that B·A with a small r can stand in for it. This command checks the bet
on the embedded model and the instruct task, in four parts:

1. Fully fine-tune q_proj and v_proj alone (every weight of them; everything else frozen) and
   take ΔW per layer. Its singular values σ_1 >= σ_2 >= ... say how low-rank it is: the
   energy in the top k, ``sum_{i<=k} σ_i² / sum σ_i²``, and the best rank-r approximation's
   relative error (Eckart-Young), set against a random Gaussian matrix of the same shape.
2. Train LoRA at r = 8 and r = 32 (``training.loop.train``, two ordinary runs) and compare the
   subspaces their A matrices span (the paper's normalised subspace similarity, eq. 4, Figure 3).
3. The amplification factor (§7.3, Table 7): how much ΔW amplifies directions W already has.
4. The Markdown report, with the command, date and machine, and the pictures.

    python -m experiments.delta_w                        # about 3 min on 2 quiet CPU cores (24 on busy ones)
    python -m experiments.delta_w --steps 10 --lora-steps 5 --model tiny-llama --out /tmp/delta_w

writes ``delta_w.md``, ``spectra.png``, ``energy.png``, ``subspace_similarity.png`` and
``delta_w.json`` (the numbers) into ``--out``. The LoRA run folders go to ``--runs-folder``, a
temporary folder by default.

The measurements are the small pure functions of ``experiments/spectrum.py``
(``singular_spectrum``, ``energy``, ``eckart_young_error``, ``subspace_similarity``,
``amplification_factor``, ...), and the full fine-tune is ``experiments/full_finetune.py``; the
tests and the tutorial (``tutorials/E_is_delta_w_low_rank.md``) call them directly. This module
runs them and writes what they find.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from data.tasks import build_task
from eval.provenance import provenance, rerun_command
from experiments.full_finetune import KINDS, FullFineTune, full_finetune
from experiments.spectrum import (amplification_row, eckart_young_error, energy, gaussian_like, rank_for_energy,
                                  singular_spectrum, subspace_similarity)
from lora.adapter import CONFIG_NAME, WEIGHTS_NAME, adapter_key, read_adapter_config
from models.loader import EMBEDDED, load_model
from training.config import TrainConfig
from training.loop import train


ENERGY = 0.9  # the report's "rank that holds 90% of ΔW's energy"


# ---------------------------------------------------------------------------------------------
# The pieces: LoRA's A and B read back from disk, module names, medians.
# ---------------------------------------------------------------------------------------------


def adapter_factors(folder: str | Path, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module name: (A (r, in), B (out, r), alpha / r)}`` read from an adapter folder (peft's format)."""
    folder = Path(folder)
    config = read_adapter_config(folder / CONFIG_NAME)
    tensors = load_file(folder / WEIGHTS_NAME)
    scaling = config["lora_alpha"] / config["r"]
    missing = [name for name in names if adapter_key(name, "lora_A") not in tensors]
    if missing:
        raise ValueError(f"{folder}: no LoRA on {missing[0]}; train the adapter with --targets {','.join(KINDS)}")
    return {name: (tensors[adapter_key(name, "lora_A")].double(), tensors[adapter_key(name, "lora_B")].double(),
                   scaling) for name in names}


def kind_of(name: str) -> str:
    """``q_proj`` of ``model.layers.3.self_attn.q_proj``."""
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> int:
    """3 of ``model.layers.3.self_attn.q_proj``."""
    return int(name.split("layers.", 1)[1].split(".", 1)[0])


def median(values) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------


@dataclass
class DeltaConfig:
    steps: int = 120  # full fine-tuning steps (batch 2) of q_proj and v_proj
    lr: float = 1e-4  # full fine-tuning's peak lr: a tenth of LoRA's, as usual for whole weights
    lora_steps: int = 120  # steps of each LoRA run (training.loop.train, its defaults otherwise)
    ranks: str = "8,32"  # the two LoRA ranks whose A subspaces are compared (the paper: 8 and 64)
    alpha: float = 16.0  # LoRA's alpha for both runs (the training loop's default)
    r: int = 8  # the rank of the Eckart-Young error, the amplification factor and the energy marks
    model: str = EMBEDDED  # tiny-llama for a quick check
    out: str = "results/delta_w"  # where delta_w.md and the PNGs go
    runs_folder: str | None = None  # the LoRA run folders; default a temporary folder, deleted at the end
    seed: int = 0  # seeds the data order and the first LoRA run; the second run takes seed + 1

    def rank_list(self) -> list[int]:
        return [int(r) for r in self.ranks.split(",") if r.strip()]


def spectrum_rows(fine_tune: FullFineTune, r: int) -> list[dict]:
    """One row per module: the rank for 90% energy and the rank-r error, of ΔW and of a Gaussian of its shape."""
    rows = []
    for index, (name, delta) in enumerate(fine_tune.deltas.items()):
        sigma, reference = singular_spectrum(delta), singular_spectrum(gaussian_like(delta, seed=index))
        rows.append({"name": name, "kind": kind_of(name), "layer": layer_of(name), "shape": list(delta.shape),
                     "rank90": rank_for_energy(sigma, ENERGY), "rank90_random": rank_for_energy(reference, ENERGY),
                     "error_r": eckart_young_error(sigma, r), "error_r_random": eckart_young_error(reference, r),
                     "energy_r": float(energy(sigma)[r - 1]), "energy_r_random": float(energy(reference)[r - 1])})
    return rows


def run_experiment(config: DeltaConfig, runs_folder: Path, say=print) -> dict:
    """Full fine-tuning, then the LoRA runs; every number the report needs, and the spectra for the plots."""
    model, tokenizer = load_model(config.model, torch.float32)
    data = build_task(TrainConfig(model=config.model, task="instruct"), tokenizer)
    say(f"full fine-tuning of {', '.join(KINDS)}: {config.steps} steps, lr {config.lr:g}")
    fine_tune = full_finetune(model, data, tokenizer, config.steps, config.lr, seed=config.seed)
    say(f"validation loss {fine_tune.val_loss_start:.4f} -> {fine_tune.val_loss_end:.4f} in {fine_tune.seconds:.0f} s")
    del model
    names = list(fine_tune.deltas)
    adapters = {}
    for offset, r in enumerate(config.rank_list()):
        # Each run its own seed: with one seed, the first module's A at r = 8 would be the first 8 rows
        # of its A at r = 32 (the same random draws), and the similarity would measure the initialisation.
        summary = train(TrainConfig(model=config.model, task="instruct", r=r, alpha=config.alpha,
                                    max_steps=config.lora_steps, eval_every=config.lora_steps,
                                    checkpoint_every=config.lora_steps, seed=config.seed + offset,
                                    out=str(runs_folder), name=f"delta_w-r{r}"))
        adapters[r] = {"summary": summary, "factors": adapter_factors(summary["adapter"], names)}
    return {"fine_tune": fine_tune, "adapters": adapters, "spectra": spectrum_rows(fine_tune, config.r)}


def similarity_rows(results: dict) -> list[dict]:
    """Per module, φ at (1, 1) and at i = j = r1 for three pairs of matrices, with the whole φ of the A pair.

    "A": the two LoRA runs' A matrices, as the paper's Figure 3. "BA": the two runs' ΔW = B·A, whose
    right-singular vectors are the input directions the update acts on (A's, weighed by what B made
    of them). "full": the r1 run's B·A against the full fine-tune's ΔW: did LoRA find full
    fine-tuning's top directions? A ΔW (out, in) has min(out, in) right-singular vectors, but only
    its first r carry anything, so only φ up to r is read.
    """
    adapters, deltas = results["adapters"], results["fine_tune"].deltas
    r1, r2 = sorted(adapters)[:2]
    rows = []
    for name, full in deltas.items():
        (A1, B1, _), (A2, B2, _) = adapters[r1]["factors"][name], adapters[r2]["factors"][name]
        phi = subspace_similarity(A1, A2)
        phi_ba = subspace_similarity(B1 @ A1, B2 @ A2)
        phi_full = subspace_similarity(B1 @ A1, full)
        rows.append({"name": name, "kind": kind_of(name), "layer": layer_of(name), "phi": phi,
                     "A_11": float(phi[0, 0]), "A_rr": float(phi[r1 - 1, r1 - 1]),
                     "BA_11": float(phi_ba[0, 0]), "BA_rr": float(phi_ba[r1 - 1, r1 - 1]),
                     "full_11": float(phi_full[0, 0]), "full_rr": float(phi_full[r1 - 1, r1 - 1]),
                     "n": A1.shape[1]})  # the input size: random subspaces give φ(i, j) ≈ max(i, j) / n
    return rows


def amplification_rows(fine_tune: FullFineTune, adapters: dict, r: int) -> list[dict]:
    """Table 7's rows per module, for the rank-r LoRA's ΔW = (alpha/r)·B·A and for the full fine-tune's ΔW."""
    rows = []
    for name, weight in fine_tune.weights.items():
        A, B, scaling = adapters[r]["factors"][name]
        for source, delta in ((f"LoRA r={r}", scaling * B @ A), ("full fine-tune", fine_tune.deltas[name])):
            rows.append({"name": name, "kind": kind_of(name), "source": source,
                         **amplification_row(delta, weight, r, seed=layer_of(name))})
    return rows


def plot_report(results: dict, out: Path, r: int) -> list[str]:
    """spectra.png, energy.png and subspace_similarity.png in ``out``; the names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # draw to a file; no display needed
        from matplotlib import pyplot
    except ImportError:
        print("note: no plots: matplotlib is not installed (pip install matplotlib)")
        return []
    deltas = results["fine_tune"].deltas
    layers = sorted({layer_of(name) for name in deltas})
    shown = sorted({layers[0], layers[len(layers) // 2], layers[-1]})

    figure, axes = pyplot.subplots(1, len(KINDS), figsize=(11, 4), sharey=True)
    for axis, kind in zip(axes, KINDS):
        for name, delta in deltas.items():
            if kind_of(name) == kind and layer_of(name) in shown:
                sigma = singular_spectrum(delta)
                axis.plot(range(1, len(sigma) + 1), sigma / sigma[0], label=f"ΔW, layer {layer_of(name)}")
        example = next(delta for name, delta in deltas.items() if kind_of(name) == kind)
        sigma = singular_spectrum(gaussian_like(example))
        axis.plot(range(1, len(sigma) + 1), sigma / sigma[0], "k--", label="Gaussian, same shape")
        axis.set_yscale("log")
        axis.set_xlabel("index i")
        axis.set_title(f"{kind} {tuple(example.shape)}: σ_i / σ_1")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "spectra.png", dpi=100)
    pyplot.close(figure)

    figure, axes = pyplot.subplots(1, len(KINDS), figsize=(11, 4), sharey=True)
    for axis, kind in zip(axes, KINDS):
        curves = torch.stack([energy(singular_spectrum(delta)) for name, delta in deltas.items()
                              if kind_of(name) == kind])
        k = range(1, curves.shape[1] + 1)
        axis.fill_between(k, curves.min(0).values, curves.max(0).values, alpha=0.25, label="ΔW, range over layers")
        axis.plot(k, curves.median(0).values, label="ΔW, median over layers")
        example = next(delta for name, delta in deltas.items() if kind_of(name) == kind)
        axis.plot(k, energy(singular_spectrum(gaussian_like(example))), "k--", label="Gaussian, same shape")
        axis.axhline(ENERGY, color="grey", linestyle=":")
        axis.axvline(r, color="grey", linestyle=":")
        axis.set_xscale("log")
        axis.set_xlabel("k (top singular values kept)")
        axis.set_title(f"{kind}: energy in the top k")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "energy.png", dpi=100)
    pyplot.close(figure)

    written = ["spectra.png", "energy.png"]
    if len(results["adapters"]) >= 2:
        rows = similarity_rows(results)
        r1, r2 = sorted(results["adapters"])[:2]
        figure, axes = pyplot.subplots(len(shown), len(KINDS), figsize=(12, 1.0 + 1.6 * len(shown)), squeeze=False)
        for row in rows:
            if row["layer"] in shown:
                axis = axes[shown.index(row["layer"]), KINDS.index(row["kind"])]
                image = axis.imshow(row["phi"].numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                                    extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
                axis.set_ylabel("i")
                axis.set_title(f"layer {row['layer']} {row['kind']}: φ(A_r={r1}, A_r={r2}, i, j)", fontsize=10)
        for axis in axes[-1]:
            axis.set_xlabel("j")
        figure.tight_layout()
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        figure.savefig(out / "subspace_similarity.png", dpi=100)
        pyplot.close(figure)
        written.append("subspace_similarity.png")
    return written


def report_tables(results: dict, r: int) -> list[str]:
    """The report's Markdown tables (spectra; amplification; subspace similarity), medians over the layers."""
    spectra = results["spectra"]
    lines = [f"| module | shape (out, in) | rank for {ENERGY:.0%} energy: ΔW | same: Gaussian | energy in top {r}: ΔW "
             f"| same: Gaussian | rank-{r} relative error: ΔW | same: Gaussian |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind in KINDS:
        rows = [row for row in spectra if row["kind"] == kind]
        if rows:
            cells = [f"{median(row[key] for row in rows):{form}}" for key, form in
                     (("rank90", "g"), ("rank90_random", "g"), ("energy_r", ".3f"), ("energy_r_random", ".3f"),
                      ("error_r", ".3f"), ("error_r_random", ".3f"))]
            lines.append(f"| {kind} | {tuple(rows[0]['shape'])} | " + " | ".join(cells) + " |")
    parts = ["\n".join(lines)]
    if r in results["adapters"]:
        amplification = amplification_rows(results["fine_tune"], results["adapters"], r)
        lines = ["| module | ΔW from | ‖ΔW‖_F | ‖W‖_F | ‖UᵀWV‖_F, U,V of ΔW | ‖UᵀWV‖_F, U,V of W | "
                 "‖UᵀWV‖_F, random U,V | amplification ‖ΔW‖_F / ‖UᵀWV‖_F |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for kind in KINDS:
            for source in (f"LoRA r={r}", "full fine-tune"):
                rows = [row for row in amplification if row["kind"] == kind and row["source"] == source]
                if rows:
                    lines.append(f"| {kind} | {source} | " + " | ".join(
                        f"{median(row[key] for row in rows):.3g}" for key in
                        ("delta_norm", "w_norm", "projection_delta", "projection_w", "projection_random",
                         "amplification")) + " |")
        parts.append("\n".join(lines))
    if len(results["adapters"]) >= 2:
        r1, r2 = sorted(results["adapters"])[:2]
        rows = similarity_rows(results)
        lines = [f"| module | compared | φ(1, 1) | φ({r1}, {r1}) | random subspaces: φ(1, 1) | random: φ({r1}, {r1}) |",
                 "| --- | --- | --- | --- | --- | --- |"]
        pairs = (("A", f"A of r={r1} and of r={r2} (paper's Figure 3)"), ("BA", f"B·A of r={r1} and of r={r2}"),
                 ("full", f"B·A of r={r1} and full fine-tune's ΔW"))
        for kind in KINDS:
            kind_rows = [row for row in rows if row["kind"] == kind]
            if kind_rows:
                n = kind_rows[0]["n"]
                for key, label in pairs:
                    lines.append(f"| {kind} | {label} | {median(x[key + '_11'] for x in kind_rows):.3f} "
                                 f"| {median(x[key + '_rr'] for x in kind_rows):.3f} | {1 / n:.4f} | {r1 / n:.4f} |")
        parts.append("\n".join(lines))
    return parts


def findings(results: dict, r: int) -> list[str]:
    """Sentences stating what the medians show, per module kind, with the random reference beside each."""
    said = []
    for kind in KINDS:
        rows = [row for row in results["spectra"] if row["kind"] == kind]
        if rows:
            said.append(f"{kind}: the full fine-tune's ΔW holds {median(x['energy_r'] for x in rows):.0%} of its energy "
                        f"in its top {r} directions (a Gaussian: {median(x['energy_r_random'] for x in rows):.0%}); "
                        f"{ENERGY:.0%} takes {median(x['rank90'] for x in rows):g} of {min(rows[0]['shape'])} "
                        f"(a Gaussian: {median(x['rank90_random'] for x in rows):g}).")
    if r in results["adapters"]:
        amplification = amplification_rows(results["fine_tune"], results["adapters"], r)
        for kind in KINDS:
            rows = [row for row in amplification if row["kind"] == kind and row["source"] == "full fine-tune"]
            if rows:
                said.append(f"{kind}: W holds {median(x['projection_delta'] for x in rows):.3g} (‖UᵀWV‖_F) in the "
                            f"full fine-tune's top {r} directions, {median(x['projection_random'] for x in rows):.3g} "
                            f"in random ones and {median(x['projection_w'] for x in rows):.3g} in its own top {r}.")
    if len(results["adapters"]) >= 2:
        r1, r2 = sorted(results["adapters"])[:2]
        rows = similarity_rows(results)
        for kind in KINDS:
            kind_rows = [row for row in rows if row["kind"] == kind]
            if kind_rows:
                said.append(f"{kind}: the top direction of A at r = {r1} and at r = {r2} overlap with φ(1, 1) = "
                            f"{median(x['A_11'] for x in kind_rows):.3f} (two random directions: "
                            f"{1 / kind_rows[0]['n']:.4f}).")
    return said


def write_report(results: dict, config: DeltaConfig, command: str, seconds: float) -> Path:
    """Write delta_w.md, the PNGs and delta_w.json into ``config.out``; return the Markdown file's path."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    fine_tune, r = results["fine_tune"], config.r
    pictures = plot_report(results, out, r)
    tables = report_tables(results, r)
    lora_lines = [f"r = {rank}: validation loss {run['summary']['val_loss_start']:.4f} -> "
                  f"{run['summary']['val_loss_end']:.4f}" for rank, run in results["adapters"].items()]
    parts = [
        "# Is ΔW really low-rank?\n",
        provenance(command, seconds) + " "
        f"Model {config.model}, instruct task, batch 2. Full fine-tuning of every q_proj and v_proj weight "
        f"(everything else frozen): {config.steps} AdamW steps, peak lr {config.lr:g} with warm-up and cosine "
        f"decay, validation loss {fine_tune.val_loss_start:.4f} -> {fine_tune.val_loss_end:.4f}. LoRA "
        f"(`training.loop.train`, alpha {config.alpha:g}, {config.lora_steps} steps each, lr 1e-3): "
        + "; ".join(lora_lines) + f". One seed per run; the medians below are over the "
        f"{len({layer_of(name) for name in fine_tune.deltas})} layers.\n",
        "## The spectrum of the full fine-tune's ΔW (medians over layers)\n",
        tables[0] + "\n",
        "The Gaussian is a random N(0, 1) matrix of the same shape: a matrix with no low-rank structure.\n",
    ]
    parts += [f"![{name}]({name})\n" for name in pictures if name != "subspace_similarity.png"]
    if len(tables) > 1:
        parts += [f"## Amplification (LoRA paper §7.3, Table 7; U, V the top {r} singular vectors; medians)\n",
                  tables[1] + "\n"]
    if len(tables) > 2:
        parts += ["## Subspace similarity (§7.2, eq. 4; medians over layers)\n",
                  tables[2] + "\n"]
        if "subspace_similarity.png" in pictures:
            parts.append("![subspace similarity](subspace_similarity.png)\n")
    parts += ["## What it shows (medians over layers)\n", "\n".join(f"- {line}" for line in findings(results, r)) + "\n"]
    path = out / "delta_w.md"
    path.write_text("\n".join(parts))
    amplification = amplification_rows(fine_tune, results["adapters"], r) if r in results["adapters"] else []
    summary = {"config": asdict(config), "seconds": seconds, "spectra": results["spectra"],
               "amplification": amplification}
    (out / "delta_w.json").write_text(json.dumps(summary, indent=1) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    """One ``--flag`` per ``DeltaConfig`` field."""
    defaults = DeltaConfig()
    parser = argparse.ArgumentParser(prog="python -m experiments.delta_w", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="full fine-tuning steps (batch 2)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="full fine-tuning's peak learning rate")
    parser.add_argument("--lora-steps", type=int, default=defaults.lora_steps, help="steps of each LoRA run")
    parser.add_argument("--ranks", default=defaults.ranks, help="the two LoRA ranks whose A subspaces are compared")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA's alpha for both runs")
    parser.add_argument("--r", type=int, default=defaults.r, help="rank of the Eckart-Young error and amplification")
    parser.add_argument("--model", default=defaults.model, help="the model; tiny-llama for a quick check")
    parser.add_argument("--out", default=defaults.out, help="folder for delta_w.md and the PNGs")
    parser.add_argument("--runs-folder", default=defaults.runs_folder,
                        help="folder for the LoRA run folders; default: a temporary one, deleted")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the data order and LoRA's init")
    return parser


def main(argv=None) -> int:
    config = DeltaConfig(**vars(build_parser().parse_args(argv)))
    ranks = config.rank_list()
    if config.steps < 1 or config.lora_steps < 1 or len(ranks) != 2 or config.r not in ranks:
        print(f"error: --steps and --lora-steps must be at least 1, --ranks must name two ranks and --r "
              f"one of them (got --ranks {config.ranks} --r {config.r}); e.g. --ranks 8,32 --r 8", file=sys.stderr)
        return 2
    start = time.perf_counter()
    command = rerun_command("experiments.delta_w", argv)
    with tempfile.TemporaryDirectory(prefix="delta_w-") as temporary:
        results = run_experiment(config, Path(config.runs_folder or temporary))
    path = write_report(results, config, command, time.perf_counter() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
