"""Plots of a run: loss and accuracy per epoch (the paper's Figures 3-4), the
confusion matrix (Figure 2); and the benchmark chart."""
from __future__ import annotations

import json
from pathlib import Path

from cifar_dist.data.cifar import CLASSES
from cifar_dist.errors import UserError
from cifar_dist.metrics import read_metrics


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _curve(rows, keys, labels, ylabel, path, scale=1.0):
    plt = _pyplot()
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
    plt = _pyplot()
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


def _rate(x: float) -> str:
    """Images/s with three significant figures, thousands separated (0.49, 61.2, 12,345)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def bench_table(result: dict) -> str:
    """The benchmark as a markdown table (one row per configuration)."""
    hw = result["hardware"]
    head = (f"{result['model']} on {hw['world_size']} x {hw['device']}, {hw['torch_threads']} threads/process; "
            f"medians of {result['repeats']} x {result['steps']} steps after {result['warmup']} warm-up")
    rows = result["rows"]
    if rows and "mfu" not in rows[0]:  # loader-only mode
        lines = [head, "", "| loader | images/s | vs torch DataLoader |", "|---|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['label']} | {_rate(r['images_per_s'])} | {r.get('speedup_vs_torch', 1):.2f}x |")
        return "\n".join(lines)
    scaling = any("scaling_efficiency" in r for r in rows)
    cols = ["configuration", "ran as", "graphs", "img/s", "img/s/device", "step ms (median / p90)",
            "data wait", "peak MiB", "MFU", "vs baseline"] + (["scaling eff."] if scaling else [])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" + "---:|" * (len(cols) - 1)]
    for r in rows:
        speed = r.get("speedup_vs_baseline")
        cells = [r["label"], r.get("precision_used", "-"), str(r.get("compiled_graphs", "-")),
                 _rate(r["images_per_s"]), _rate(r["images_per_s_per_device"]),
                 f"{1000 * r['step_time_median_s']:.1f} / {1000 * r['step_time_p90_s']:.1f}",
                 f"{100 * r['data_wait_share']:.0f}%", f"{r['peak_memory_mib']:,.0f}",
                 f"{100 * r['mfu']:.1f}%", f"{speed:.2f}x" if speed else "-"]
        if scaling:
            eff = r.get("scaling_efficiency")
            cells.append(f"{100 * eff:.0f}%" if eff is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bench(result: dict, path) -> None:
    plt = _pyplot()
    rows = result["rows"]
    labels = [r["label"] for r in rows]
    values = [r["images_per_s_per_device"] if "images_per_s_per_device" in r else r["images_per_s"]
              for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5), dpi=110)
    colors = ["#999999" if r.get("baseline") else "#1f77b4" for r in rows]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s per device")
    ax.set_title(f"{result['model']} on {result['hardware']['device']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
