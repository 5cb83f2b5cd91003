"""Stop a run once its test accuracy reaches a target: a cifar_dist callback.

    PYTHONPATH=examples cifar-dist train --config configs/fast.yaml \
        'run.callbacks=[stop_at_accuracy:StopAtAccuracy]' eval.every_epochs=1

The target comes from the environment (STOP_AT_ACCURACY, default 0.94). The
decision uses the epoch's test accuracy, which every rank shares, so every
rank stops after the same epoch; the run then ends like any finished run
(final checkpoint, summary.json, plots).
"""

from __future__ import annotations

import os

from cifar_dist import Callback


class StopAtAccuracy(Callback):
    def __init__(self):
        self.target = float(os.environ.get("STOP_AT_ACCURACY", "0.94"))

    def on_train_start(self, run):
        self.run = run

    def on_epoch_end(self, row):
        if row.get("test_acc", 0.0) >= self.target:
            if self.run.rank == 0:
                print(f"test accuracy {row['test_acc']:.4f} >= {self.target}: stopping after epoch {row['epoch']}")
            self.run.request_stop()
