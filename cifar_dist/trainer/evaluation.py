"""Evaluation: loss, accuracy and confusion matrix, each image counted once on any number of
processes; the test-time augmentation of ``eval.tta`` (its views: ``data.tta``)."""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING

import torch

from cifar_dist.data import CLASSES, eval_batches, normalize
from cifar_dist.data.tta import VIEWS, tta_views
from cifar_dist.distributed.collectives import all_reduce_sum, world_info
from cifar_dist.model.loss import smoothed_cross_entropy

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


@torch.no_grad()
def evaluate_model(
    model, eval_set, cfg, device, autocast=contextlib.nullcontext, tta: str = "none", inputs=lambda x: x
) -> dict:
    """Loss, accuracy and confusion matrix, each image counted once; logits averaged over ``tta``'s views."""
    rank, world = world_info()
    k = 10
    model.eval()
    confusion = torch.zeros(k * k, device=device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    batch = min(cfg.data.eval_batch_size, math.ceil(len(eval_set) / world))
    for x, y, valid in eval_batches(eval_set, rank, world, batch, device):
        x = inputs(normalize(x, cfg.data.mean, cfg.data.std, cfg.run.channels_last))
        with autocast():
            logits = tta_logits(model, x, tta, cfg.run.channels_last)
        losses = smoothed_cross_entropy(
            logits, y, cfg.train.label_smoothing, cfg.train.smoothing_form, reduction="none"
        )
        y, pred = y[:valid], logits[:valid].argmax(1)
        loss_sum += losses[:valid].double().sum()
        confusion += torch.bincount(y * k + pred, minlength=k * k).double()
    stats = all_reduce_sum(torch.cat([confusion, loss_sum.view(1)]))
    confusion = stats[:-1].view(k, k).round().long().cpu()
    total = int(confusion.sum())
    return {
        "loss": float(stats[-1]) / max(total, 1),
        "acc": float(confusion.diag().sum()) / max(total, 1),
        "count": total,
        "tta": tta,
        "views": VIEWS[tta],
        "confusion": confusion.tolist(),
        "per_class_acc": dict(zip(CLASSES, (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist())),
    }


def tta_logits(model, x: torch.Tensor, tta: str, channels_last: bool = False) -> torch.Tensor:
    """The fp32 logits of ``x`` averaged over the weighted views of ``tta``, summed in a fixed order."""
    total = None
    for weight, view in tta_views(x, tta, channels_last):
        logits = model(view).float()
        if tta == "none":
            return logits
        total = weight * logits if total is None else total + weight * logits
    assert total is not None
    return total
