"""A model's loss, accuracy and confusion matrix on an evaluation set, each image counted once on
any number of processes, with the test-time augmentation of ``eval.tta`` (its views: ``data.tta``)."""

from __future__ import annotations

import contextlib
import math

import torch

from cifar_dist.data import CLASSES, eval_batches, normalize
from cifar_dist.data.tta import VIEWS, tta_views
from cifar_dist.distributed.collectives import all_reduce_sum, world_info
from cifar_dist.model.loss import smoothed_cross_entropy


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
