"""Plots of a run: loss and accuracy per epoch (the paper's Figures 3-4) and the
confusion matrix (Figure 2)."""
from __future__ import annotations

import json
from pathlib import Path

from cifar_dist.data.cifar import CLASSES
from cifar_dist.errors import UserError
from cifar_dist.metrics import read_metrics


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _curve(rows, keys, labels, ylabel, path, scale=1.0):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key, label in zip(keys, labels):
        pts = [(r["epoch"], r[key] * scale) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(matrix, path, title="confusion matrix"):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > peak / 2 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_run(run_dir: Path) -> list[Path]:
    """(Re)draw plots/loss.png, plots/accuracy.png and plots/confusion_matrix.png."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: no metrics.jsonl with any epoch; is this a run directory?")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    made = [out / "loss.png", out / "accuracy.png"]
    _curve(rows, ["train_loss", "test_loss"], ["train", "test"], "loss", made[0])
    _curve(rows, ["train_acc", "test_acc"], ["train", "test"], "accuracy (%)", made[1], scale=100)
    cm_path = run_dir / "confusion_matrix.json"
    if cm_path.is_file():
        matrix = json.loads(cm_path.read_text())["rows_true_cols_pred"]
        made.append(out / "confusion_matrix.png")
        plot_confusion(matrix, made[-1])
    return made
