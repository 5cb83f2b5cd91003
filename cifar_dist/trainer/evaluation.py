"""Evaluation: loss, accuracy and confusion matrix, each image counted once on any number of processes."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from cifar_dist.data import CLASSES, eval_batches, normalize
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

    def due(self, epochs_done: int, last: bool) -> bool:
        """After the ``epochs_done``-th epoch: every ``eval.every_epochs``, and at the end."""
        return last or epochs_done % self.cfg.eval.every_epochs == 0

    def maybe_run(self, epochs_done: int, last: bool) -> dict | None:
        """Evaluate after an epoch when due; ``last`` keeps the result it returns (None: not due)."""
        self.last = None
        return self.run() if self.due(epochs_done, last) else None

    def run(self, tta: bool = False) -> dict:
        self.last = evaluate_model(
            self.model, self.eval_set, self.cfg, self.device, self.precision.autocast, tta, inputs=self.precision.inputs
        )
        self.train_model.train()
        return self.last


@torch.no_grad()
def evaluate_model(
    model, eval_set, cfg, device, autocast=contextlib.nullcontext, tta: bool = False, inputs=lambda x: x
) -> dict:
    """Loss, accuracy and confusion matrix over the whole evaluation set, each
    sample counted exactly once whatever the number of processes."""
    rank, world = world_info()
    k = 10
    model.eval()
    confusion = torch.zeros(k * k, device=device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    batch = min(cfg.data.eval_batch_size, math.ceil(len(eval_set) / world))
    for x, y, valid in eval_batches(eval_set, rank, world, batch, device):
        x = inputs(normalize(x, cfg.data.mean, cfg.data.std, cfg.run.channels_last))
        with autocast():
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
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
        "confusion": confusion.tolist(),
        "per_class_acc": dict(zip(CLASSES, (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist())),
    }
