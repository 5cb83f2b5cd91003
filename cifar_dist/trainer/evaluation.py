"""The run's evaluations: when one is due, its clock, the latest result (the evaluation itself:
``inference.evaluate``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from cifar_dist.inference.evaluate import evaluate_model

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config


class Evaluator:
    """Owns the evaluation model and set, decides when an evaluation is due, keeps the latest."""

    def __init__(self, cfg: Config, eval_model, eval_set, device, precision, train_model):
        self.cfg, self.model, self.eval_set, self.device = cfg, eval_model, eval_set, device
        self.precision, self.train_model = precision, train_model
        self.last: dict | None = None  # the latest result
        self.plain_time_s: float | None = None  # seconds of the latest evaluation without TTA

    def maybe_run(self, epochs_done: int, last: bool) -> dict | None:
        """Evaluate after every ``eval.every_epochs``-th and the ``last`` epoch (None: not due)."""
        self.last = None
        if not (last or epochs_done % self.cfg.eval.every_epochs == 0):
            return None
        return self.run(self.cfg.eval.tta if self.cfg.eval.tta_every_epoch else "none")

    def run(self, tta: str = "none") -> dict:
        if self.device.type == "cuda":  # the clock starts when the training work queued before is done
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        self.last = evaluate_model(
            self.model, self.eval_set, self.cfg, self.device, self.precision.autocast, tta, inputs=self.precision.inputs
        )
        # evaluate_model ends reading its sums on the host: the device is done, the time is honest.
        self.last["eval_time_s"] = time.perf_counter() - started
        if tta == "none":
            self.plain_time_s = self.last["eval_time_s"]
        self.train_model.train()
        return self.last

    def final(self) -> dict:
        """The run's final evaluation, with ``eval.tta``: the last epoch's when it used that mode."""
        if self.last is not None and self.last["tta"] == self.cfg.eval.tta:
            return self.last
        return self.run(self.cfg.eval.tta)
