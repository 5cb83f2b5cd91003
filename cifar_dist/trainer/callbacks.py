"""Callbacks: the public extension point of the training loop.

    run:
      callbacks: ["mypackage.hooks:EarlyStop"]   # imported at start, built with no arguments

A callback is a class with any of these methods (``Callback`` gives no-op defaults):

    on_train_start(run)               before the first step; ``run`` is the loop (``trainer.loop.Trainer``):
                                      run.cfg, run.state, run.rank, run.world, run.run_dir,
                                      run.model, run.optimizer, run.request_stop()
    on_step_start(step)               before optimizer step ``step`` (global, from 0)
    on_loss(loss, step) -> loss       each micro-batch's loss before backward; returns the loss to use
                                      (None: the loss as it was)
    on_step_end(step, metrics)        after the step; metrics: "lr", and "train_loss" (the epoch's
                                      running mean) on the steps where the loop read the device
    on_checkpoint_staged(path, step)  a checkpoint is written to ``path``, not yet committed
    on_epoch_end(row)                 the epoch's metrics row (with test_acc when it was evaluated)
    on_train_end(summary)             the run's summary (summary.json's contents)

Every rank runs every callback. What changes the run (the loss ``on_loss`` returns,
a ``run.request_stop()``) must be the same on every rank, or the ranks' collectives fall
out of step; decide from values every rank shares (the metrics rows and the summary are
the same on all ranks). A requested stop ends the run after the current step: it is
evaluated, checkpointed and summarized like any finished run. Hooks get host values the
loop already has, so a callback adds no host-device synchronization unless it makes one.
"""

from __future__ import annotations

from cifar_dist.config.plugins import import_object
from cifar_dist.errors import ConfigError
from cifar_dist.trainer.stopping import StopReason


class Callback:
    """Base class with every hook doing nothing; override the ones you need."""

    def on_train_start(self, run) -> None: ...
    def on_step_start(self, step: int) -> None: ...
    def on_loss(self, loss, step: int):
        return loss

    def on_step_end(self, step: int, metrics: dict) -> None: ...
    def on_checkpoint_staged(self, path, step: int) -> None: ...
    def on_epoch_end(self, row: dict) -> None: ...
    def on_train_end(self, summary: dict) -> None: ...


class Callbacks:
    """The run's callbacks, called in the configured order; a hook a callback lacks is skipped."""

    def __init__(self, items=()):
        self.items = list(items)

    def _each(self, hook: str, *args) -> None:
        for callback in self.items:
            method = getattr(callback, hook, None)
            if callable(method):
                method(*args)

    def on_train_start(self, run) -> None:
        self._each("on_train_start", run)

    def on_step_start(self, step: int) -> None:
        self._each("on_step_start", step)

    def on_loss(self, loss, step: int):
        """Each callback's ``on_loss`` in turn; one that returns None leaves the loss as it was."""
        for callback in self.items:
            method = getattr(callback, "on_loss", None)
            if callable(method):
                changed = method(loss, step)
                loss = loss if changed is None else changed
        return loss

    def on_step_end(self, step: int, metrics: dict) -> None:
        self._each("on_step_end", step, metrics)

    def on_checkpoint_staged(self, path, step: int) -> None:
        self._each("on_checkpoint_staged", path, step)

    def on_epoch_end(self, row: dict) -> None:
        self._each("on_epoch_end", row)

    def on_train_end(self, summary: dict) -> None:
        self._each("on_train_end", summary)


def load_callbacks(specs) -> Callbacks:
    """Import and build ``run.callbacks``; a bad name is a ConfigError naming it."""

    items = []
    for spec in specs:
        cls = import_object(spec, "run.callbacks")
        try:
            items.append(cls())
        except Exception as e:
            raise ConfigError(f"run.callbacks: {spec!r} could not be built: {type(e).__name__}: {e}") from None
    return Callbacks(items)


def time_to_target(history: list[dict], target: float) -> dict:
    """``time_to_target_s`` and ``epochs_to_target`` from the metrics rows (None when not reached;
    {} when no target is set). An interrupted epoch counts with its fraction of steps."""
    if not target:
        return {}
    elapsed = 0.0
    for row in history:
        elapsed += row["epoch_time_s"]
        if row.get("test_acc") is not None and row["test_acc"] >= target:
            return {"target_acc": target, "time_to_target_s": elapsed, "epochs_to_target": row["epoch"]}
    return {"target_acc": target, "time_to_target_s": None, "epochs_to_target": None}


class StopAtTarget(Callback):
    """Ends the run after the first evaluation at or above the target (same on every rank:
    the evaluation is)."""

    def __init__(self, target: float):
        self.target = target

    def on_train_start(self, run):
        self.run = run

    def on_epoch_end(self, row: dict) -> None:
        if row.get("test_acc") is not None and row["test_acc"] >= self.target:
            self.run.request_stop(StopReason.TARGET)
