"""A paper model of data-parallel scaling (docs/scaling.md): how many GPUs one run uses well.

    python scripts/plan.py                                   # the paper's model, assumed throughput
    python scripts/plan.py --bench runs/bench/bench.json     # your own `cifar-dist bench`'s figures

Weak scaling: every GPU keeps the per-GPU batch, so N GPUs train on N x batch images
per step. A step costs the compute t_c = batch / images_per_s plus a ring all-reduce
of the gradients, t_ar = 2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency, of which a
fraction `overlap` of t_c can hide behind the backward pass. Nothing here is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cifar_dist.config.numbers import OneLineParser, count, real
from cifar_dist.errors import UserError, guarded
from cifar_dist.storage.files import no_missing_folder, write_text_atomic

PAPER_PARAMS = 4_916_284  # the paper's modified ResNet (`cifar-dist summary`)
PAPER_BATCH = 128  # the batch the paper's recipe was tuned at (configs/seed.yaml)
PAPER_EPOCHS = 60  # and its length
TRAIN_IMAGES = 50_000  # CIFAR-10 training set
GPUS_PER_NODE = 8
BACKWARD_SHARE = 2 / 3  # backward ~ 2x forward: the share of compute an all-reduce can hide behind
TARGET = 0.8  # the efficiency the rule asks for
SEARCH_LIMIT = 4096  # the largest GPU count the rule looks at
# ASSUMPTION, not a measurement: the paper's model (0.769 GMAC forward, ~4.6 GFLOP per trained image)
# on one H100-class GPU in bf16 at per-GPU batch 512. 30,000 img/s is ~138 TFLOP/s, ~14% of an H100
# SXM's 989 TFLOP/s dense bf16 peak: a round guess for a small-image ResNet. Replace it with --bench.
ASSUMED_IMAGES_PER_S = 30_000.0


@dataclass(frozen=True)
class Interconnect:
    """A ring link: bus bandwidth per GPU (bytes/s), latency per ring hop (s), GPU count it applies to."""

    name: str
    label: str
    bandwidth: float
    latency: float
    max_gpus: int | None = None  # None: any count (the ring is bounded by this link alone)


# Round, commonly quoted figures, not measurements. A flat ring runs at its slowest link, so a job
# larger than one node (8 GPUs) is modelled with the inter-node preset alone; NVLink rows stop at 8.
PRESETS = {
    p.name: p
    for p in (
        # NVLink 4 + NVSwitch in one H100 node: 900 GB/s per GPU (both directions) on the data sheet;
        # nccl-tests all-reduce bus bandwidth on 8 GPUs is commonly quoted at 400+ GB/s. A few µs per hop.
        Interconnect("nvlink", "NVLink 4, one node", 400e9, 3e-6, GPUS_PER_NODE),
        # InfiniBand NDR, one 400 Gb/s (50 GB/s) NIC per GPU, ~45 GB/s after protocol overhead, ~5 µs.
        Interconnect("infiniband", "InfiniBand NDR 400 Gb/s", 45e9, 5e-6),
        # Ethernet 100 Gb/s (12.5 GB/s line rate), ~11 GB/s effective (RoCE/TCP), ~20 µs.
        Interconnect("ethernet", "Ethernet 100 Gb/s", 11e9, 20e-6),
    )
}


def compute_time(batch: int, images_per_s: float) -> float:
    """Seconds of compute per step for one GPU: its batch at its single-GPU throughput."""
    return batch / images_per_s


def allreduce_time(n: int, nbytes: float, bandwidth: float, latency: float) -> float:
    """Seconds of one ring all-reduce of ``nbytes`` over ``n`` GPUs (0 for one GPU):
    2 (n-1)/n x nbytes / bandwidth + 2 (n-1) x latency."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def step_time(t_c: float, t_ar: float, overlap: float = 0.0) -> float:
    """Seconds per step when a fraction ``overlap`` of the compute hides the all-reduce:
    t_c + max(0, t_ar - overlap x t_c)."""
    return t_c + max(0.0, t_ar - overlap * t_c)


def efficiency(t_c: float, t_ar: float, overlap: float = 0.0) -> float:
    """Scaling efficiency t_c / step time: per-GPU throughput as a share of the single-GPU one."""
    return t_c / step_time(t_c, t_ar, overlap)


def plan_point(link: Interconnect, n: int, images_per_s: float, batch: int, nbytes: float, overlap: float) -> dict:
    """One row of the table; ``applies`` is False where the preset does not cover ``n`` GPUs."""
    t_c = compute_time(batch, images_per_s)
    row: dict[str, Any] = {
        "interconnect": link.name,
        "gpus": n,
        "global_batch": n * batch,
        "steps_per_epoch": TRAIN_IMAGES / (n * batch),
        "compute_ms": 1e3 * t_c,
        "applies": link.max_gpus is None or n <= link.max_gpus,
        "overlap": overlap,
    }
    if row["applies"]:
        t_ar = allreduce_time(n, nbytes, link.bandwidth, link.latency)
        for key, o in (("no_overlap", 0.0), ("overlap", overlap)):
            row[f"efficiency_{key}"] = efficiency(t_c, t_ar, o)
            row[f"job_images_per_s_{key}"] = n * images_per_s * row[f"efficiency_{key}"]
        row["allreduce_ms"] = 1e3 * t_ar
    return row


def largest_efficient(
    link: Interconnect,
    images_per_s: float,
    batch: int,
    nbytes: float,
    overlap: float,
    target: float = TARGET,
    limit: int = SEARCH_LIMIT,
) -> int:
    """The largest GPU count (up to ``limit`` and the preset's own cap) whose efficiency is >= ``target``.
    The all-reduce time grows with n, so the efficiency falls with n and the first miss ends the search."""
    t_c, best = compute_time(batch, images_per_s), 1
    for n in range(2, min(limit, link.max_gpus or limit) + 1):
        if efficiency(t_c, allreduce_time(n, nbytes, link.bandwidth, link.latency), overlap) < target:
            break
        best = n
    return best


def solve_bandwidth(eff: float, t_c: float, n: int, nbytes: float, latency: float, overlap: float = 0.0) -> float:
    """The bandwidth (bytes/s) at which the formula gives efficiency ``eff``: the step formula solved
    for t_ar, then t_ar's formula for the bandwidth. ``math.inf`` when the latency term alone (or no
    communication at all, n = 1) already costs more than ``eff`` allows."""
    t_ar = (t_c / eff - t_c) + overlap * t_c
    left = t_ar - 2 * (n - 1) * latency
    if n <= 1 or left <= 0:
        return math.inf
    return 2 * (n - 1) / n * nbytes / left


def check_against_measurement(
    images_per_s_single: float,
    images_per_s_per_process_multi: float,
    world: int,
    params: int,
    reduce_bytes: int,
    bandwidth: float,
    latency: float,
    batch: int = 256,
    overlap: float = 0.0,
) -> dict:
    """The formula against a measured scaling efficiency (e.g. `cifar-dist bench` with 2 processes).

    Returns the measured efficiency (per-process over single-process images/s), the efficiency the
    formula predicts for ``bandwidth`` (bytes/s) and ``latency`` (s), and the bandwidth that would
    explain the measured one. ``batch`` is the per-process batch the measurement used."""
    t_c = compute_time(batch, images_per_s_single)
    nbytes = params * reduce_bytes
    measured = images_per_s_per_process_multi / images_per_s_single
    t_ar = allreduce_time(world, nbytes, bandwidth, latency)
    return {
        "measured_efficiency": measured,
        "predicted_efficiency": efficiency(t_c, t_ar, overlap),
        "predicted_allreduce_s": t_ar,
        "measured_loss_s": batch / images_per_s_per_process_multi - t_c,
        "compute_s": t_c,
        "explaining_bandwidth": solve_bandwidth(measured, t_c, world, nbytes, latency, overlap),
    }


class BenchFigure(NamedTuple):
    """What the plan takes from a bench.json: its fastest training row and what it ran on."""

    images_per_s: float  # single-process images/s of that row
    batch: int  # its per-device batch
    label: str
    parameters: int | None  # of the benched model (None in a bench.json that does not record it)
    device: str  # e.g. "NVIDIA H100 80GB HBM3", or a CPU's name
    device_type: str  # cuda, cpu, ...


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_bench(path: str | Path) -> BenchFigure:
    """Single-device images/s, its per-device batch and its label from the fastest non-baseline
    training row of a `cifar-dist bench` bench.json (multi-process rows give their single-process
    timing), with the benched model's parameter count and device. A file of any other shape is a
    UserError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--bench {path}: not a readable bench.json ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"--bench {path}: not a bench.json (no list of rows)")
    rows = [
        r
        for r in rows
        if not r.get("baseline") and isinstance(r.get("settings"), dict) and "precision" in r["settings"]
    ]
    if not rows:
        raise UserError(f"--bench {path}: no non-baseline training row (a --loader-only run has none)")

    def rate(r):
        value = r.get("single_process_images_per_s") or r.get("images_per_s_per_device")
        return value if _positive(value) else 0.0

    best = max(rows, key=rate)
    batch = best["settings"].get("batch")
    if not rate(best) or not (isinstance(batch, int) and not isinstance(batch, bool) and batch > 0):
        raise UserError(f"--bench {path}: row {str(best.get('label', '?'))[:60]!r} has no positive images/s and batch")
    hw = data.get("hardware") if isinstance(data.get("hardware"), dict) else {}
    params = hw.get("parameters")
    return BenchFigure(
        float(rate(best)),
        batch,
        str(best.get("label", "?")),
        params if isinstance(params, int) and not isinstance(params, bool) and params > 0 else None,
        str(hw.get("device", "unknown device")),
        str(hw.get("device_type", "cuda")),
    )


def format_table(rows: list[dict], overlap: float) -> str:
    """The Markdown table of ``plan_point`` rows."""
    o = f"overlap {overlap:.2f}"
    lines = [
        f"| interconnect | GPUs | global batch | steps/epoch | compute ms/step | all-reduce ms/step | "
        f"efficiency, no overlap | efficiency, {o} | job img/s, no overlap | job img/s, {o} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = (
            f"| {PRESETS[r['interconnect']].label} | {r['gpus']} | {r['global_batch']:,} | "
            f"{r['steps_per_epoch']:.2f} | {r['compute_ms']:.2f} | "
        )
        if not r["applies"]:
            lines.append(head + f"n/a: one node has {GPUS_PER_NODE} GPUs | | | | |")
            continue
        lines.append(
            head + f"{r['allreduce_ms']:.3f} | {100 * r['efficiency_no_overlap']:.1f}% | "
            f"{100 * r['efficiency_overlap']:.1f}% | {r['job_images_per_s_no_overlap']:,.0f} | "
            f"{r['job_images_per_s_overlap']:,.0f} |"
        )
    return "\n".join(lines)


def _gpu_counts(text: str) -> list[int]:
    """--gpus: comma-separated whole numbers >= 1."""
    one = count(1)
    counts = [one(t) for t in str(text).split(",") if t.strip()]
    if not counts:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU counts, got {text!r}")
    return counts


def add_plan_arguments(ap: argparse.ArgumentParser) -> None:
    """The plan's options."""
    ap.add_argument(
        "--images-per-s",
        type=real(0),
        help="measured single-GPU training images/s at --batch "
        f"(default: {ASSUMED_IMAGES_PER_S:,.0f}, an assumption for the paper's model on an H100-class GPU)",
    )
    ap.add_argument("--bench", metavar="PATH", help="take images/s and batch from a bench.json (its fastest row)")
    ap.add_argument("--batch", type=count(1), help="per-GPU batch (default 512, or the --bench row's)")
    ap.add_argument(
        "--params", type=count(1), help="parameters (default: the benched model's with --bench, else the paper's model)"
    )
    ap.add_argument("--reduce-bytes", type=count(1), default=4, help="bytes per gradient element (4 fp32, 2 bf16)")
    ap.add_argument("--gpus", type=_gpu_counts, default="8,16,64,256", help="comma-separated GPU counts")
    ap.add_argument("--interconnect", default="all", choices=[*PRESETS, "all"])
    ap.add_argument(
        "--overlap",
        type=real(0, 1, low_open=False),
        help="share of the compute that hides the all-reduce "
        "(default 2/3, the backward pass; the no-overlap column is always shown)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the table as JSON")


def run_plan(args) -> int:
    """Print the table and the rule, optionally write them as JSON."""
    source = "given with --images-per-s"
    images_per_s, batch, params, device = args.images_per_s, args.batch, args.params, "GPU"
    if args.bench:
        bench = read_bench(args.bench)
        images_per_s = images_per_s or bench.images_per_s
        batch = batch or bench.batch
        params = params or bench.parameters
        source = f"measured: {args.bench}, row '{bench.label}' on {bench.device}"
        if bench.device_type == "cpu":
            device = "CPU process"
            source += "; a CPU bench: the table applies its speed to every GPU of the model"
    params = params or PAPER_PARAMS
    if images_per_s is None:
        images_per_s = ASSUMED_IMAGES_PER_S
        source = "an ASSUMPTION for the paper's model on an H100-class GPU, not a measurement"
    batch = batch or 512
    overlap = BACKWARD_SHARE if args.overlap is None else args.overlap
    gpus = args.gpus  # a list: argparse applies _gpu_counts to the default too
    if not (math.isfinite(images_per_s) and images_per_s > 0 and batch > 0 and params > 0):  # a bench.json's
        raise UserError(f"{args.bench}: its images/s, batch or parameters are not positive numbers")
    if args.json:
        no_missing_folder(args.json, "--json")
    links = list(PRESETS.values()) if args.interconnect == "all" else [PRESETS[args.interconnect]]
    nbytes = params * args.reduce_bytes
    rows = [plan_point(link, n, images_per_s, batch, nbytes, overlap) for link in links for n in gpus]
    rule = {
        link.name: {
            key: largest_efficient(link, images_per_s, batch, nbytes, o)
            for key, o in (("no_overlap", 0.0), ("overlap", overlap))
        }
        for link in links
    }
    print(f"Single-{device} throughput: {images_per_s:,.0f} img/s at batch {batch} per {device} ({source}).")
    print(
        f"Gradients: {params:,} parameters x {args.reduce_bytes} bytes = {nbytes / 1e6:.2f} MB per "
        f"all-reduce; overlap {overlap:.2f} of the compute in the overlap columns.\n"
    )
    print(format_table(rows, overlap) + "\n")
    print(f"Rule: the largest GPU count with efficiency >= {TARGET:.0%} for this model at batch {batch} per GPU:")
    for link in links:
        r = rule[link.name]
        cap = link.max_gpus or SEARCH_LIMIT
        counts = [
            f"{v:,}{' (one node)' if link.max_gpus else ' or more'}" if v == cap else f"{v:,}"
            for v in (r["no_overlap"], r["overlap"])
        ]
        print(f"- {link.label}: {counts[0]} without overlap, {counts[1]} with overlap {overlap:.2f}")
    lo, hi = min(gpus), max(gpus)
    whole = math.ceil(TRAIN_IMAGES / batch)
    epoch_s = TRAIN_IMAGES / images_per_s
    print(
        f"\nLarge global batches: N GPUs step on N x {batch} images: {lo * batch:,} at {lo} GPUs "
        f"({lo * batch / PAPER_BATCH:,.0f}x the paper's {PAPER_BATCH}) to {hi * batch:,} at {hi} "
        f"({hi * batch / PAPER_BATCH:,.0f}x); from {whole} GPUs one step takes all {TRAIN_IMAGES:,} training "
        "images. The efficiency above is throughput only: the recipe was tuned at batch 128, and a larger "
        "global batch needs its learning rate and warm-up retuned and can need more epochs (docs/scaling.md). "
        f"One GPU already trains an epoch in {epoch_s:.1f} s ({PAPER_EPOCHS} epochs: "
        f"{PAPER_EPOCHS * epoch_s / 60:.1f} min); where a bigger batch does not pay, pack the node with "
        "independent one-GPU runs instead (a sweep)."
    )
    if args.json:
        write_text_atomic(
            args.json,
            json.dumps(
                {
                    "images_per_s": images_per_s,
                    "source": source,
                    "batch": batch,
                    "params": params,
                    "reduce_bytes": args.reduce_bytes,
                    "overlap": overlap,
                    "rows": rows,
                    "largest_efficient": rule,
                    "target_efficiency": TARGET,
                },
                indent=1,
            ),
        )
    return 0


def main(argv=None) -> int:
    ap = OneLineParser(prog="scripts/plan.py", description=__doc__.split("\n\n")[0])
    add_plan_arguments(ap)
    return guarded(run_plan, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
