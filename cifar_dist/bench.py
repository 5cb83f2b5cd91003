"""Throughput benchmark: images/s per device, MFU, and the speed-up over a plain PyTorch loop.

    cifar-dist bench --out runs/bench --compile off,on --precision fp32,bf16 --channels-last off,on
    cifar-dist bench --loader-only --loaders torch,gpu,ffcv --workers 0,2
    accelerate launch --config_file launch/cpu.yaml --num_processes 2 cifar_dist/bench.py --out runs/bench2

Each row runs the framework's own training step (``engine.train_step``) on
the configured model, followed by the same control work as ``fit`` (the
BatchNorm/flag collective, a host read every ``CONTROL_EVERY`` steps). Warm-up
steps (and compilation) are not timed; each repeat times ``--steps`` steps
between two device synchronizations (throughput, as in training), and each
figure is the median over ``--repeats`` repeats. Every compiled row starts
from a fresh compile state and reports the graphs it compiled; every row
reports the precision it ran in. With several processes each row is also run
by rank 0 alone, which gives the scaling efficiency.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `accelerate launch cifar_dist/bench.py`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Row:
    compile: bool
    precision: str
    channels_last: bool
    batch: int      # per device
    loader: str     # synthetic | torch | gpu | ffcv
    workers: int

    @property
    def label(self) -> str:
        parts = ["compile" if self.compile else "eager", self.precision,
                 "channels_last" if self.channels_last else "NCHW", f"b{self.batch}", self.loader]
        if self.loader in ("torch", "ffcv"):
            parts.append(f"w{self.workers}")
        return " ".join(parts)


class _SyntheticLoader:
    """One fixed uint8 batch resident on the device: the training step alone."""

    name = "synthetic"

    def __init__(self, shard, device, steps_per_epoch=10**9):
        import torch
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (shard.micro, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
        self.y = torch.randint(0, 10, (shard.micro,), generator=g).to(device)
        self.idx = torch.arange(shard.micro)
        self.accum, self.steps_per_epoch = shard.accum, steps_per_epoch

    def iter_epoch(self, epoch, start_step=0):
        while True:
            yield [(self.x, self.y, self.idx)] * self.accum


def _row_config(base, row: Row, world: int):
    cfg = copy.deepcopy(base)
    cfg.run.compile, cfg.run.precision, cfg.run.channels_last = row.compile, row.precision, row.channels_last
    cfg.train.batch_size, cfg.train.accum_steps, cfg.train.exact_reduce = row.batch * world, 1, False
    cfg.train.max_steps, cfg.data.workers = 0, row.workers
    cfg.data.loader = row.loader if row.loader != "synthetic" else "gpu"
    cfg.run.progress, cfg.run.tensorboard = False, False
    return cfg


def _percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def time_steps(step_fn, next_batch, clock, warmup: int, steps: int, repeats: int) -> dict:
    """Run ``warmup`` untimed steps, then ``repeats`` x ``steps`` timed ones.

    The device is synchronized once before the first repeat and once at the end of
    each: no step is waited for on its own, so the figure is throughput, as in
    training (a sync around every step would measure latency). Per repeat: its wall
    time, its mean step time, and the host time spent waiting in ``next_batch``.
    """
    for _ in range(warmup):
        step_fn(next_batch())
    last = clock.now()
    step_times, data_times, repeat_times = [], [], []
    for _ in range(repeats):
        waited = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next_batch()
            waited += time.perf_counter() - t0
            step_fn(batch)
        end = clock.now()
        repeat_times.append(end - last)
        step_times.append((end - last) / steps)
        data_times.append(waited)
        last = end
    return {"repeat_times": repeat_times, "step_times": step_times, "data_times": data_times}


def _peak_memory(device) -> float:
    import resource

    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)


def measure_row(base_cfg, row: Row, accelerator, data, args, distributed: bool) -> dict:
    """Time the framework's training step for one row; ``distributed=False`` runs
    rank 0's model alone, unwrapped: the single-process reference.

    Each step is what ``fit`` runs: ``train_step`` and the control collective
    after it (BatchNorm statistics and flags), with the flags read on the host
    every ``CONTROL_EVERY`` steps. A compiled row starts from a fresh compile
    state, so its figure does not depend on the rows before it.
    """
    import torch

    from cifar_dist import engine
    from cifar_dist.control import Control
    from cifar_dist.data import Shard, build_train_loader
    from cifar_dist.distributed import world_info
    from cifar_dist.metrics import Clock
    from cifar_dist.models import build_model
    from cifar_dist.optim import build_optimizer
    from cifar_dist.precision import Precision, gpu_capability, resolve_precision

    rank, world = world_info() if distributed else (0, 1)
    cfg = _row_config(base_cfg, row, world)
    cfg.run.precision = resolve_precision(cfg.run.precision, gpu_capability())[0]
    device = accelerator.device
    if cfg.run.compile:
        torch._dynamo.reset()  # no code, guards or recompile budget shared with earlier rows
    graphs_before = engine.graph_count()
    torch.manual_seed(cfg.run.seed)
    model, eval_model, train_model, optimizer = engine.prepare_model(
        cfg, accelerator, build_model(cfg.model), build_optimizer, wrap=distributed)
    shard = Shard(rank, world, cfg.train.batch_size)
    loader = (_SyntheticLoader(shard, device) if row.loader == "synthetic"
              else build_train_loader(cfg, data, shard, device))
    precision = Precision(cfg.run.precision, device, accelerator if distributed and _deepspeed(accelerator) else None)
    parts = engine.Parts(cfg=cfg, accelerator=accelerator, model=model, train_model=train_model,
                         eval_model=eval_model, optimizer=optimizer, loader=loader, eval_set=None,
                         shard=shard, run_dir=Path("."), precision=precision)
    totals = {"loss": torch.zeros((), device=device), "correct": torch.zeros((), device=device,
              dtype=torch.long), "count": 0}
    control = Control(model, precision, device, collective=distributed)
    state = {"step": 0}
    stream = _forever(loader)

    def step(micro):
        bad = engine.train_step(parts, micro, state["step"], totals)
        state["step"] += 1
        control.after_step(bad)
        if control.due(state["step"]):
            control.read(totals["loss"])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_steps(step, lambda: next(stream), Clock(device), args.warmup, args.steps, args.repeats)
    if distributed and world > 1:  # the slowest rank sets the pace
        times = torch.tensor(timing["repeat_times"], dtype=torch.float64, device=device)  # NCCL: device tensors only
        torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
        timing["repeat_times"] = times.tolist()
    fig = _figures(timing, args.steps, cfg.train.batch_size, world, _peak_memory(device))
    fig["precision_used"] = cfg.run.precision
    fig["compiled_graphs"] = engine.graph_count() - graphs_before if cfg.run.compile else 0
    return fig


def _deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.value == "DEEPSPEED"


def _forever(loader):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from loader.iter_epoch(epoch)
        epoch += 1


def _figures(timing: dict, steps: int, global_batch: int, world: int, peak_mib: float) -> dict:
    per_repeat = [steps * global_batch / t for t in timing["repeat_times"]]
    images_per_s = statistics.median(per_repeat)
    return {"world_size": world, "global_batch": global_batch,
            "images_per_s": images_per_s, "images_per_s_per_device": images_per_s / world,
            "step_time_median_s": statistics.median(timing["step_times"]),
            "step_time_p90_s": _percentile(timing["step_times"], 0.9),
            "data_wait_share": sum(timing["data_times"]) / max(sum(timing["repeat_times"]), 1e-12),
            "peak_memory_mib": peak_mib, "repeats_images_per_s": per_repeat}


def run_bench(args) -> int:
    """`cifar-dist bench`: rows of the matrix, the baseline, and the outputs."""
    from cifar_dist.config import load_config

    base = load_config(args.config, args.overrides)
    import torch

    from cifar_dist import bench_baseline, report
    from cifar_dist.distributed import barrier, make_accelerator, print0, share_from_main, world_info
    from cifar_dist.errors import ConfigError
    from cifar_dist.hardware import device_peak
    from cifar_dist.models import build_model
    from cifar_dist.repro import apply_tf32, device_name, git_sha, versions
    from cifar_dist.summary import count_flops

    for loader in args.loaders:
        if loader not in ("synthetic", "torch", "gpu", "ffcv"):
            raise ConfigError(f"--loaders: unknown loader {loader!r} (synthetic, torch, gpu, ffcv)")
    for p in args.precision:
        if p not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision: unknown precision {p!r} (fp32, bf16, fp16)")
    for b in args.batch_sizes:
        if base.model.bn_group and b % base.model.bn_group:
            raise ConfigError(f"--batch-sizes: {b} is not a multiple of model.bn_group={base.model.bn_group}")
    if base.run.threads:
        torch.set_num_threads(base.run.threads)
    accelerator = make_accelerator(base)
    rank, world = world_info()
    device = accelerator.device
    # fp32 rows (and the plain loop) run on TF32 tensor cores when the run's settings say so
    tf32 = apply_tf32(base.run) and device.type == "cuda"
    out = Path(args.out) if args.out else share_from_main(
        lambda: Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or [base.data.workers]
    data = None
    if any(loader != "synthetic" for loader in args.loaders) or args.loader_only:
        from cifar_dist.data import build_datasets
        data = build_datasets(base)[0]
    name = device_name(device)
    hw = {"device": name, "device_type": device.type, "world_size": world, "tf32": tf32,
          "torch_threads": torch.get_num_threads(), "git_sha": git_sha(), "versions": versions()}
    if args.loader_only:
        rows = bench_loaders(base, data, args, workers, device)
    else:
        rows = []
        flops = count_flops(build_model(base.model).to(device), train=True)
        peaks = {p: device_peak(device, name, p, tf32) for p in args.precision}
        matrix = [Row(c, p, cl, b, ld, w) for c in args.compile for p in args.precision
                  for cl in args.channels_last for b in args.batch_sizes for ld in args.loaders
                  for w in (workers if ld in ("torch", "ffcv") else [0])]
        baseline = {}
        if not args.no_baseline and rank == 0:
            for b in args.batch_sizes:
                print0(f"baseline b{b} ...")
                baseline[b] = bench_baseline.measure(base, b, args, device, data if "torch" in args.loaders else None)
                baseline[b].update(_mfu(baseline[b], flops,
                                        peaks.get("fp32") or device_peak(device, name, "fp32", tf32)))
                baseline[b].update(precision_used="fp32", compiled_graphs=0)
                rows.append({"label": f"baseline b{b} (plain PyTorch loop)", "baseline": True,
                             "settings": {"batch": b, "precision": "fp32", "compile": False,
                                          "channels_last": False, "loader": baseline[b]["loader"]},
                             **baseline[b], "speedup_vs_baseline": 1.0})
        for row in matrix:
            print0(f"{row.label} ...")
            fig = measure_row(base, row, accelerator, data, args, distributed=True)
            fig.update(_mfu(fig, flops, peaks[row.precision]))
            if world > 1:
                single = share_from_main(lambda r=row: measure_row(base, r, accelerator, data, args, False))
                fig["single_process_images_per_s"] = single["images_per_s"]
                fig["scaling_efficiency"] = fig["images_per_s_per_device"] / single["images_per_s"]
            ref = baseline.get(row.batch)
            fig["speedup_vs_baseline"] = (fig["images_per_s_per_device"] / ref["images_per_s_per_device"]
                                          if ref else None)
            rows.append({"label": row.label, "baseline": False, "settings": asdict(row), **fig})
        hw["flops_per_image_train"] = flops
        hw["peak_flops"] = {p: {"flops": v, "source": s} for p, (v, s) in peaks.items()}
    barrier()
    if rank == 0:
        result = {"hardware": hw, "model": base.model.name, "config": base.name,
                  "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "rows": rows}
        (out / "bench.json").write_text(json.dumps(result, indent=1))
        table = report.bench_table(result)
        (out / "bench.md").write_text(table + "\n")
        report.plot_bench(result, out / "bench.png")
        print(table)
        print(f"written {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    accelerator.end_training()
    return 0


def _mfu(fig: dict, flops_per_image: float, peak) -> dict:
    value, source = peak
    achieved = fig["images_per_s_per_device"] * flops_per_image
    return {"flops_per_image": flops_per_image, "achieved_flops_per_device": achieved,
            "peak_flops": value, "peak_source": source, "mfu": achieved / value}


def bench_loaders(base, data, args, workers, device) -> list[dict]:
    """Images/s of each input pipeline alone (augmentation included, batches on the device)."""
    from cifar_dist.data import Shard, build_train_loader
    from cifar_dist.metrics import Clock

    rows = []
    for loader in args.loaders:
        for w in (workers if loader in ("torch", "ffcv") else [0]):
            if loader == "synthetic":
                continue
            cfg = _row_config(base, Row(False, "fp32", False, args.batch_sizes[0], loader, w), 1)
            shard = Shard(0, 1, cfg.train.batch_size)
            ld = build_train_loader(cfg, data, shard, device)
            timing = time_steps(lambda b: None, _forever(ld).__next__, Clock(device),
                                args.warmup, args.steps, args.repeats)
            fig = _figures(timing, args.steps, cfg.train.batch_size, 1, 0.0)
            rows.append({"label": f"{loader} w{w}" if loader in ("torch", "ffcv") else loader,
                         "baseline": False, "settings": {"loader": loader, "workers": w,
                                                         "batch": args.batch_sizes[0]}, **fig})
    torch_rows = [r for r in rows if r["settings"]["loader"] == "torch"]
    if torch_rows:
        ref = max(r["images_per_s"] for r in torch_rows)
        for r in rows:
            r["speedup_vs_torch"] = r["images_per_s"] / ref
    return rows


def main(argv=None) -> int:
    from cifar_dist.bench_args import add_bench_arguments
    from cifar_dist.train import guarded

    ap = argparse.ArgumentParser(prog="cifar_dist/bench.py", description=__doc__.split("\n\n")[0])
    add_bench_arguments(ap)
    return guarded(run_bench, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
