"""What the user sees while a run trains: progress bars and the estimated time of the whole run."""
from __future__ import annotations

import time

from cifar_dist.callbacks import Callback


def progress_bars(enabled: bool):
    """A factory of tqdm progress bars counting images (so they show images/s), or of silent stand-ins."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return lambda **kw: tqdm(unit="img", unit_scale=True, mininterval=1.0, dynamic_ncols=True,
                                     leave=False, **kw)
        except ImportError:
            pass

    class _Silent:
        def __init__(self, **kw):
            pass

        def update(self, n=1):
            pass

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass
    return _Silent


def write_line(text: str) -> None:
    """A line on stdout that does not break a running progress bar."""
    try:
        from tqdm.auto import tqdm
        tqdm.write(text)
    except ImportError:
        print(text, flush=True)


def duration(seconds: float) -> str:
    """3725 -> '1 h 02 min', 95 -> '1 min 35 s', 7.2 -> '7 s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class EstimatedTime(Callback):
    """Prints, early in the run, how long the whole run will take.

    Timed between two control reads (where the host has waited for the device, so the
    figure is honest on a GPU), after the first one, which includes compilation and
    warm-up. Evaluation is not included. Over an hour on a CPU, it suggests the
    one-minute demo. Prints on rank 0 only.
    """

    MIN_STEPS = 5  # steps between the two reads the estimate is timed over

    def __init__(self, say=None):
        self.say, self.mark, self.done = say or write_line, None, False

    def on_train_start(self, run):
        self.run = run

    def on_step_end(self, step: int, metrics: dict) -> None:
        if self.done or "train_loss" not in metrics:  # only at control reads
            return
        now, steps = time.perf_counter(), step + 1
        if self.mark is None:
            self.mark = (steps, now)
            return
        first, then = self.mark
        if steps - first < self.MIN_STEPS:
            return
        self.done = True
        per_step = (now - then) / (steps - first)
        left = max(self.run.max_steps - steps, 0)
        if self.run.rank != 0 or left == 0:
            return
        self.say(f"estimated time to finish: {duration(left * per_step)} for {left:,} more steps "
                 f"({per_step:.3g} s/step over steps {first}-{steps}; evaluation not included)")
        if left * per_step > 3600 and self.run.parts.device.type == "cpu":
            self.say("that is long for a CPU; for a one-minute demo: make train CONFIG=configs/cpu_quick.yaml")
