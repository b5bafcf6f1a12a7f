"""The loss curve of a run, drawn from its metrics.jsonl (matplotlib is an optional extra)."""

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train, validation)``: (step, loss) pairs from a run's ``metrics.jsonl``."""
    train, validation = [], []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            validation.append((record["step"], record["val_loss"]))
    return train, validation


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """Draw training and validation loss against step into ``png_path``; False (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # draw to a file; no window, no display needed
        from matplotlib import pyplot
    except ImportError:
        print("note: no loss.png: matplotlib is not installed (pip install matplotlib)")
        return False
    train, validation = read_metrics(metrics_path)
    figure, axes = pyplot.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1)
    if validation:
        axes.plot(*zip(*validation), "o-", label="validation")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per token")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    pyplot.close(figure)
    return True
