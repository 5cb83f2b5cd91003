"""What the user sees while a run trains: progress bars and the estimated time of the whole run."""

from __future__ import annotations

import time

from cifar_dist.distributed.collectives import print0
from cifar_dist.trainer.callbacks import Callback


def progress_bars(enabled: bool):
    """A factory of tqdm progress bars counting images (so they show images/s); silent ones when off."""
    from tqdm.auto import tqdm

    options = dict(unit="img", unit_scale=True, mininterval=1.0, dynamic_ncols=True, leave=False, disable=not enabled)
    return lambda **kw: tqdm(**options, **kw)


def duration(seconds: float) -> str:
    """3725 -> '1 h 02 min', 95 -> '1 min 35 s', 7.2 -> '7 s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


LONG_CPU_RUN_S = 3600  # a CPU run with more training time left than this is pointed to the demo
DEMO = "cifar-dist train --config configs/cpu_quick.yaml"


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
        if self.run.rank != 0 or left <= 0:
            return
        line = (
            f"estimated time to finish: {duration(left * per_step)} for {left:,} more steps "
            f"({per_step:.3g} s/step over steps {first}-{step}; evaluation not included)"
        )
        if self.run.device.type == "cpu" and left * per_step > LONG_CPU_RUN_S:
            line += f"; for a CPU demo of a few minutes: {DEMO}"
        self.say(line)
