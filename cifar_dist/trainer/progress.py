"""What the user sees while a run trains: progress bars and the estimated time of the whole run."""

from __future__ import annotations

import copy
import time

import torch

from cifar_dist.distributed.collectives import print0
from cifar_dist.trainer.callbacks import Callback


class _Silent:
    def __init__(self, **kw): ...
    def update(self, n=1): ...
    def set_postfix(self, **kw): ...
    def close(self): ...


def progress_bars(enabled: bool):
    """A factory of tqdm progress bars counting images (so they show images/s), or of silent stand-ins."""
    if not enabled:
        return _Silent
    from tqdm.auto import tqdm

    return lambda **kw: tqdm(unit="img", unit_scale=True, mininterval=1.0, dynamic_ncols=True, leave=False, **kw)


def duration(seconds: float) -> str:
    """3725 -> '1 h 02 min', 95 -> '1 min 35 s', 7.2 -> '7 s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class EstimatedTime(Callback):
    """Prints (rank 0) the run's time left, timed between two control reads after the first (warm-up)."""

    MIN_STEPS = 5  # steps between the two reads the estimate is timed over

    def __init__(self, say=None):
        self.say, self.mark, self.done = say or print0, None, False

    def on_train_start(self, run):
        self.run = run

    def on_step_end(self, step: int, metrics: dict) -> None:
        if self.done or "train_loss" not in metrics:  # only at control reads
            return
        now = time.perf_counter()
        if self.mark is None:
            self.mark = (step, now)
            return
        first, then = self.mark
        if step - first < self.MIN_STEPS:
            return
        self.done = True
        per_step = (now - then) / (step - first)
        left = max(self.run.max_steps - step, 0)
        if self.run.rank == 0 and left > 0:
            self.say(
                f"estimated time to finish: {duration(left * per_step)} for {left:,} more steps "
                f"({per_step:.3g} s/step over steps {first}-{step}; evaluation not included)"
            )


LONG_CPU_RUN_S = 3600  # a CPU run estimated to train longer than this is announced before it starts
DEMO = "cifar-dist train --config configs/cpu_quick.yaml"


def seconds_per_image(model, precision, channels_last: bool, batch: int = 8) -> float:
    """Seconds one training image costs this process: the best of two forward and backward passes of
    a copy of ``model`` on ``batch`` random images, after one warm-up; the run's model and generators
    are left untouched."""
    probe = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    best = float("inf")
    for i in range(3):
        t0 = time.perf_counter()
        with precision.autocast():
            out = probe(x)
        out.float().sum().backward()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best / batch


def long_cpu_run_warning(
    steps_left: int, images_per_step: int, per_image_s: float, flops_per_image: float | None = None
) -> str | None:
    """The line announcing a CPU run longer than ``LONG_CPU_RUN_S`` (None for a shorter one)."""
    seconds = steps_left * images_per_step * per_image_s
    if seconds <= LONG_CPU_RUN_S:
        return None
    how = f"{steps_left:,} steps x {images_per_step:,} images"
    if flops_per_image:
        rate = flops_per_image / per_image_s / 1e9
        how += f" x {flops_per_image / 1e9:.2f} GFLOP at {rate:.1f} GFLOP/s measured here"
    else:
        how += f" at {1 / per_image_s:.0f} images/s measured here"
    return (
        f"cifar-dist: this run needs about {duration(seconds)} of training on this CPU ({how}; evaluation not "
        f"included); for a CPU demo of a few minutes: {DEMO}"
    )
