"""`cifar-dist bench`: images/s per device, MFU, and the speed-up over a plain PyTorch loop.

    cifar-dist bench --out runs/bench --compile off,on --precision fp32,bf16 --channels-last off,on
    cifar-dist bench --loader-only --loaders torch,gpu,ffcv --workers 0,2
    accelerate launch --config_file launch/cpu.yaml --num_processes 2 -m cifar_dist.bench --out runs/bench2

What a row runs and how it is timed: docs/benchmarks.md.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cifar_dist.bench import baseline as plain_loop
from cifar_dist.bench.rows import Row, measure_row, row_config, worker_counts
from cifar_dist.bench.table import bench_table, plot_bench
from cifar_dist.bench.timing import Clock, figures, forever, time_steps
from cifar_dist.config.loading import load_config
from cifar_dist.config.registry import LOADERS, PRECISIONS
from cifar_dist.data import Shard, build_datasets, build_train_loader
from cifar_dist.distributed.accelerator import make_accelerator, release_process_group
from cifar_dist.distributed.collectives import barrier, print0, share_from_main, world_info
from cifar_dist.errors import ConfigError
from cifar_dist.model.layer_table import count_flops
from cifar_dist.model.resnet import build_model, count_parameters
from cifar_dist.runtime.hardware import device_peak, mfu
from cifar_dist.runtime.provenance import device_name, git_sha, versions
from cifar_dist.runtime.seeding import apply_tf32
from cifar_dist.storage.files import utf8_path, write_text_atomic


def _check_arguments(args, bn_group: int) -> None:
    for flag, what, values, choices in (
        ("--loaders", "loader", args.loaders, ("synthetic", *LOADERS)),
        ("--precision", "precision", args.precision, tuple(PRECISIONS)),
    ):
        for value in values:
            if value not in choices:
                raise ConfigError(f"{flag}: unknown {what} {value!r} ({', '.join(choices)})")
    for b in args.batch_sizes:
        if bn_group and b % bn_group:
            raise ConfigError(f"--batch-sizes: {b} is not a multiple of model.bn_group={bn_group}")
    if args.profile and args.loader_only:
        raise ConfigError("--profile: profiles the model's rows; --loader-only has none")


def run_bench(args) -> int:
    """`cifar-dist bench`: rows of the matrix, the baseline, and the outputs."""
    base = load_config(args.config, args.overrides)
    _check_arguments(args, base.model.bn_group)
    if base.run.threads:
        torch.set_num_threads(base.run.threads)
    accelerator = make_accelerator(base)
    rank, world = world_info()
    device = accelerator.device
    # fp32 rows (and the plain loop) run on TF32 tensor cores when the run's settings say so
    tf32 = apply_tf32(base.run) and device.type == "cuda"
    out = Path(args.out or share_from_main(lambda: Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"))
    if rank == 0:
        utf8_path(out.absolute())
        out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or [base.data.workers]
    real_data = args.loader_only or any(loader != "synthetic" for loader in args.loaders)
    data = build_datasets(base)[0] if real_data else None
    name = device_name(device)
    hw = {
        "device": name,
        "device_type": device.type,
        "world_size": world,
        "tf32": tf32,
        "torch_threads": torch.get_num_threads(),
        "git_sha": git_sha(),
        "versions": versions(),
    }
    if args.loader_only:
        rows = bench_loaders(base, data, args, workers, device)
    else:
        rows = []
        benched = build_model(base.model).to(device)
        flops = count_flops(benched, train=True)
        hw["parameters"] = count_parameters(benched)
        peaks = {p: device_peak(device, name, p, tf32) for p in args.precision}

        def add_mfu(fig: dict, precision: str) -> None:
            """The row's FLOPs and MFU: None (shown as n/a) when the peak is unknown or below what the row achieved."""
            peak, source = peaks.get(precision) or device_peak(device, name, precision, tf32)
            achieved = fig["images_per_s_per_device"] * flops
            fig.update(flops_per_image=flops, achieved_flops_per_device=achieved, peak_flops=peak, peak_source=source)
            fig["mfu"] = mfu(achieved, peak)

        baseline = {}
        if not args.no_baseline and rank == 0:
            for b in args.batch_sizes:
                print0(f"baseline b{b} ...")
                fig = plain_loop.measure(base, b, args, device, data if "torch" in args.loaders else None)
                add_mfu(fig, "fp32")
                fig.update(precision_used="fp32", compiled_graphs=0)
                settings = dict(batch=b, precision="fp32", compile=False, channels_last=False, loader=fig["loader"])
                label = f"baseline b{b} (plain PyTorch loop)"
                rows.append({"label": label, "baseline": True, "settings": settings, **fig, "speedup_vs_baseline": 1.0})
                baseline[b] = fig
        # Row's fields in order: compile, precision, channels_last, batch, loader, then each worker count
        grid = itertools.product(args.compile, args.precision, args.channels_last, args.batch_sizes, args.loaders)
        for row in (Row(*settings, w) for settings in grid for w in worker_counts(settings[-1], workers)):
            print0(f"{row.label} ...")
            fig = measure_row(base, row, accelerator, data, args, True, out if args.profile else None)
            add_mfu(fig, fig["precision_used"])
            if world > 1:
                single = share_from_main(lambda r=row: measure_row(base, r, accelerator, data, args, False))
                fig["single_process_images_per_s"] = single["images_per_s"]
                fig["scaling_efficiency"] = fig["images_per_s_per_device"] / single["images_per_s"]
            ref = baseline[row.batch]["images_per_s_per_device"] if row.batch in baseline else None
            fig["speedup_vs_baseline"] = fig["images_per_s_per_device"] / ref if ref else None
            rows.append({"label": row.label, "baseline": False, "settings": asdict(row), **fig})
        hw["flops_per_image_train"] = flops
        hw["peak_flops"] = {p: {"flops": v, "source": s} for p, (v, s) in peaks.items()}
    barrier()
    if rank == 0:
        result = {
            "hardware": hw,
            "model": base.model.name,
            "config": base.name,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "rows": rows,
        }
        write_text_atomic(out / "bench.json", json.dumps(result, indent=1))
        table = bench_table(result)
        write_text_atomic(out / "bench.md", table + "\n")
        plot_bench(result, out / "bench.png")
        print(table)
        print(f"written {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
        if args.profile:
            print(f"profiles (one folder per row, a trace per rank): {out / 'profile'}; see docs/observability.md")
    accelerator.end_training()
    release_process_group()  # its gloo threads joined now, not in the interpreter's shutdown
    return 0


def bench_loaders(base, data, args, workers, device) -> list[dict]:
    """Images/s of each input pipeline alone (augmentation included, batches on the device)."""
    rows = []
    for loader in (ld for ld in args.loaders if ld != "synthetic"):
        for w in worker_counts(loader, workers):
            row = Row(False, "fp32", False, args.batch_sizes[0], loader, w)
            cfg = row_config(base, row, 1)
            batches = forever(build_train_loader(cfg, data, Shard(0, 1, cfg.train.batch_size), device))
            timing = time_steps(lambda b: None, batches.__next__, Clock(device), args.warmup, args.steps, args.repeats)
            fig = figures(timing, args.steps, cfg.train.batch_size, 1, 0.0)
            settings = {"loader": loader, "workers": w, "batch": args.batch_sizes[0]}
            rows.append({"label": row.loader_label, "baseline": False, "settings": settings, **fig})
    torch_rows = [r for r in rows if r["settings"]["loader"] == "torch"]
    if torch_rows:
        ref = max(r["images_per_s"] for r in torch_rows)
        for r in rows:
            r["speedup_vs_torch"] = r["images_per_s"] / ref
    return rows
