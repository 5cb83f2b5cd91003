"""One row of the benchmark matrix: the framework's own step, prepared as training prepares it."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from cifar_dist.bench.timing import Clock, figures, forever, peak_memory, time_steps
from cifar_dist.config.schema import ProfileConfig
from cifar_dist.data import Shard
from cifar_dist.distributed.collectives import world_info
from cifar_dist.trainer.build import build_model_seeded, graph_count, resolve_run_precision
from cifar_dist.trainer.epoch import EpochTotals
from cifar_dist.trainer.profiling import profile_steps
from cifar_dist.trainer.trainer import Trainer

WORKER_LOADERS = ("torch", "ffcv")  # the loaders with worker processes


def worker_counts(loader: str, workers: list[int]) -> list[int]:
    """The worker counts ``loader`` is benchmarked with: ``workers``, or [0] where it has none."""
    return workers if loader in WORKER_LOADERS else [0]


@dataclass(frozen=True)
class Row:
    compile: bool
    precision: str
    channels_last: bool
    batch: int  # per device
    loader: str  # synthetic | torch | gpu | ffcv
    workers: int

    @property
    def loader_label(self) -> str:
        return f"{self.loader} w{self.workers}" if self.loader in WORKER_LOADERS else self.loader

    @property
    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{'compile' if self.compile else 'eager'} {self.precision} {layout} b{self.batch} {self.loader_label}"

    @property
    def slug(self) -> str:
        """The label as a folder name (the row's profile)."""
        return self.label.replace(" ", "_")


class SyntheticLoader:
    """One fixed uint8 batch resident on the device: the training step alone."""

    name = "synthetic"

    def __init__(self, shard, device, steps_per_epoch=10**9):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (shard.micro_batch, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
        self.y = torch.randint(0, 10, (shard.micro_batch,), generator=g).to(device)
        self.idx = torch.arange(shard.micro_batch)
        self.accum, self.steps_per_epoch = shard.accum, steps_per_epoch

    def iter_epoch(self, epoch, start_step=0):
        while True:
            yield [(self.x, self.y, self.idx)] * self.accum


def row_config(base, row: Row, world: int):
    cfg = copy.deepcopy(base)
    cfg.run.compile, cfg.run.precision, cfg.run.channels_last = row.compile, row.precision, row.channels_last
    cfg.train.batch_size, cfg.train.accum_steps, cfg.train.exact_reduce = row.batch * world, 1, False
    cfg.train.max_steps, cfg.data.workers = 0, row.workers
    cfg.data.loader = row.loader if row.loader != "synthetic" else "gpu"
    cfg.run.progress, cfg.run.trackers = False, []
    return cfg


def measure_row(base_cfg, row: Row, accelerator, data, args, distributed: bool, profile: Path | None = None) -> dict:
    """Time one row's ``Trainer.steady_step`` (the step and its control work, as in training);
    ``distributed=False``: rank 0's model alone, unwrapped (the single-process reference).
    ``profile``: the benchmark's folder, where the same steps are profiled after the timed ones."""
    rank, world = world_info() if distributed else (0, 1)
    cfg = row_config(base_cfg, row, world)
    resolve_run_precision(cfg, warn=False)
    device = accelerator.device
    if cfg.run.compile:
        torch._dynamo.reset()  # no code, guards or recompile budget shared with earlier rows
    graphs_before = graph_count()
    shard = Shard(rank, world, cfg.train.batch_size)
    synthetic = SyntheticLoader(shard, device) if row.loader == "synthetic" else None
    trainer = Trainer(cfg, accelerator, shard, data, model=build_model_seeded(cfg), loader=synthetic, wrap=distributed)
    totals, stream = EpochTotals.start(device), forever(trainer.loader)
    step_numbers = itertools.count(1)

    def step(batch):
        trainer.steady_step(batch, next(step_numbers), totals)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_steps(step, lambda: next(stream), Clock(device), args.warmup, args.steps, args.repeats)
    if distributed and world > 1:  # the slowest rank sets the pace
        times = torch.tensor(timing["repeat_times"], dtype=torch.float64, device=device)  # NCCL: device tensors only
        torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
        timing["repeat_times"] = times.tolist()
    fig = figures(timing, args.steps, cfg.train.batch_size, world, peak_memory(device))
    fig["precision_used"] = cfg.run.precision
    fig["compiled_graphs"] = graph_count() - graphs_before if cfg.run.compile else 0
    if profile is not None:
        steps = (cfg.run.profile or ProfileConfig()).steps
        where = profile_steps(step, lambda: next(stream), profile, row.slug, steps, device)
        fig["profile"] = str(where.relative_to(profile))
    return fig
