"""The benchmark's outputs: bench.md (a table) and bench.png (images/s per row)."""

from __future__ import annotations

from cifar_dist.storage.plots import pyplot, save_figure


def _rate(x: float) -> str:
    """Images/s with three significant figures, thousands separated (0.49, 61.2, 12,345)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _percent(mfu) -> str:
    """MFU as a percentage; n/a where the peak is unknown or implausible (never above 100%)."""
    return "n/a" if mfu is None or not 0 <= mfu <= 1 else f"{100 * mfu:.1f}%"


def _table(head: str, cols: list[str], rows: list[list[str]]) -> str:
    """``head``, then a markdown table with its first column left-aligned and the others right-aligned."""
    lines = [head, "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def bench_table(result: dict) -> str:
    """The benchmark as a markdown table (one row per configuration)."""
    hw = result["hardware"]
    head = (
        f"{result['model']} on {hw['world_size']} x {hw['device']}, {hw['torch_threads']} threads/process; "
        f"medians of {result['repeats']} x {result['steps']} steps after {result['warmup']} warm-up"
    )
    rows = result["rows"]
    if rows and "mfu" not in rows[0]:  # loader-only mode
        loaders = [[r["label"], _rate(r["images_per_s"]), f"{r.get('speedup_vs_torch', 1):.2f}x"] for r in rows]
        return _table(head, ["loader", "images/s", "vs torch DataLoader"], loaders)
    scaling = any("scaling_efficiency" in r for r in rows)
    cols = ["configuration", "ran as", "graphs", "img/s", "img/s/device", "step ms (median / p90)", "data wait"]
    cols += ["peak MiB", "MFU", "vs baseline"] + (["scaling eff."] if scaling else [])
    table = []
    for r in rows:
        speed = r.get("speedup_vs_baseline")
        cells = [
            r["label"],
            r.get("precision_used", "-"),
            str(r.get("compiled_graphs", "-")),
            _rate(r["images_per_s"]),
            _rate(r["images_per_s_per_device"]),
            f"{1000 * r['step_time_median_s']:.1f} / {1000 * r['step_time_p90_s']:.1f}",
            f"{100 * r['data_wait_share']:.0f}%",
            f"{r['peak_memory_mib']:,.0f}",
            _percent(r.get("mfu")),
            f"{speed:.2f}x" if speed else "-",
        ]
        if scaling:
            eff = r.get("scaling_efficiency")
            cells.append(f"{100 * eff:.0f}%" if eff is not None else "-")
        table.append(cells)
    return _table(head, cols, table)


def plot_bench(result: dict, path) -> None:
    plt = pyplot()
    rows = result["rows"]
    labels = [r["label"] for r in rows]
    values = [r["images_per_s_per_device"] if "images_per_s_per_device" in r else r["images_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5), dpi=110)
    colors = ["#999999" if r.get("baseline") else "#1f77b4" for r in rows]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s per device")
    ax.set_title(f"{result['model']} on {result['hardware']['device']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
