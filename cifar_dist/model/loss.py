"""The training loss: label-smoothed cross entropy in the paper's or PyTorch's form."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, eps: float, form: str, reduction: str = "mean"
) -> torch.Tensor:
    """Label-smoothed cross entropy in fp32: ``paper`` puts eps/(K-1) on each wrong class (its
    SmoothCrossEntropyLoss), ``torch`` eps/K on every class."""
    logits = logits.float()
    if form == "torch" or eps == 0:
        return F.cross_entropy(logits, target, label_smoothing=eps, reduction=reduction)
    logp = F.log_softmax(logits, dim=-1)
    k = logits.shape[-1]
    weight = torch.full_like(logp, eps / (k - 1)).scatter_(-1, target.unsqueeze(-1), 1.0 - eps)
    per_sample = -(weight * logp).sum(-1)
    return per_sample.mean() if reduction == "mean" else per_sample
