"""Time to accuracy: how long training took to first reach ``eval.target_acc`` (DAWNBench, airbench).

Training time only: the epochs' own wall time up to and including the first
evaluated epoch at or above the target, evaluation excluded. With
``eval.stop_at_target`` the run ends there.
"""
from __future__ import annotations

from cifar_dist.callbacks import Callback


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
            self.run.request_stop()
