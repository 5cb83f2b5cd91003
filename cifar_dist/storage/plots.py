"""Plots of a run: loss and accuracy per epoch (the paper's Figures 3-4) with the
learning-rate schedule, and the confusion matrix (Figure 2). Each names its run and recipe."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cifar_dist.config.loading import load_config
from cifar_dist.data import train_images
from cifar_dist.data.cifar import CLASSES
from cifar_dist.errors import UserError
from cifar_dist.model.optim import lr_at, schedule_steps
from cifar_dist.storage.files import own_folder, write_bytes_atomic
from cifar_dist.storage.metrics import read_metrics

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config


def save_figure(fig, path, **kwargs) -> None:
    """``fig.savefig`` written atomically: a full disk leaves no torn picture."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    write_bytes_atomic(path, buffer.getvalue())


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def epoch_axis(ax, epochs) -> None:
    """Whole epochs on the x axis, with room around a run of one or two epochs."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if epochs and max(epochs) - min(epochs) < 2:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.set_xlabel("epoch")


def _curve(rows, metric, ylabel, path, title, scale=1.0, schedule=None):
    """``train_<metric>`` and ``test_<metric>`` per epoch, with the learning rate on a second axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    epochs = []
    for split in ("train", "test"):
        key = f"{split}_{metric}"
        points = [(r["epoch"], r[key] * scale) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=split)
            epochs += [e for e, _ in points]
    epoch_axis(ax, epochs)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if schedule:
        lr_ax = ax.twinx()
        (line,) = lr_ax.plot(*schedule, color="0.5", linewidth=1, linestyle="--", label="learning rate")
        lr_ax.set_ylabel("learning rate", color="0.4")
        lr_ax.set_ylim(bottom=0)
        handles, names = handles + [line], names + ["learning rate"]
    ax.legend(handles, names, fontsize="small")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def lr_schedule(cfg: Config, points: int = 400) -> tuple[list[float], list[float]] | None:
    """(epochs, learning rates) of the run's schedule at up to ``points`` steps."""
    steps_per_epoch = train_images(cfg) // cfg.train.batch_size
    if steps_per_epoch < 1:
        return None
    total = schedule_steps(cfg.train, steps_per_epoch)
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    stride = max(1, total // points)
    steps = list(range(0, total, stride)) + [total - 1]
    return [(s + 1) / steps_per_epoch for s in steps], [lr_at(s, cfg.train, steps_per_epoch) for s in steps]


def plot_confusion(matrix, path, title="confusion matrix"):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def read_confusion(path: Path) -> list[list[int]]:
    """The 10 x 10 counts of a run's confusion_matrix.json; anything else is a UserError naming it."""
    try:
        matrix = json.loads(Path(path).read_text())["rows_true_cols_pred"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:80]})") from None
    k = len(CLASSES)
    square = isinstance(matrix, list) and len(matrix) == k and all(isinstance(r, list) and len(r) == k for r in matrix)
    if not square or not all(type(v) is int and v >= 0 for row in matrix for v in row):  # bools are not counts
        raise UserError(f"{path}: rows_true_cols_pred is not a {k} x {k} table of counts")
    return matrix


def draw_run(run_dir: Path) -> list[Path]:
    """(Re)draw plots/loss.png, plots/accuracy.png and plots/confusion_matrix.png."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: no metrics.jsonl with any epoch; is this a run directory?")
    out = own_folder(run_dir / "plots")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except UserError:  # missing or no longer loading: the plots go without the recipe's name and schedule
        cfg = None
    name = f"{run_dir.name} ({cfg.name}, {cfg.model.name})" if cfg else run_dir.name
    drawn = [out / "loss.png", out / "accuracy.png"]
    schedule = lr_schedule(cfg) if cfg else None
    _curve(rows, "loss", "loss", drawn[0], f"loss: {name}")
    _curve(rows, "acc", "accuracy (%)", drawn[1], f"accuracy and learning rate: {name}", scale=100, schedule=schedule)
    cm_path = run_dir / "confusion_matrix.json"
    if cm_path.is_file():
        matrix = read_confusion(cm_path)
        drawn.append(out / "confusion_matrix.png")
        plot_confusion(matrix, drawn[-1], title=f"confusion matrix: {name}")
    return drawn
