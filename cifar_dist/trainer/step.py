"""One optimizer step: forward, loss, backward (two strategies), clipping, update.

``train_step`` returns the step's non-finite flag as a device tensor; nothing in
here reads a device value on the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cifar_dist.data import normalize
from cifar_dist.distributed.collectives import all_reduce_sum
from cifar_dist.distributed.exact import TreeSum, reduce_across_processes, take_grads
from cifar_dist.model.batchnorm import GroupBatchNorm2d
from cifar_dist.model.loss import smoothed_cross_entropy
from cifar_dist.model.optim import lr_at, set_lr
from cifar_dist.storage.state import LOSS_UNIT
from cifar_dist.trainer.profiling import span

if TYPE_CHECKING:
    from cifar_dist.trainer.build import Parts


@dataclass
class EpochTotals:
    """Running sums of an epoch's training loss and accuracy, on the device (no host sync).

    The loss sum counts whole units of ``LOSS_UNIT`` (2^-24): each micro-batch adds its mean
    loss times its images, rounded to a unit. Integer sums do not depend on their order, so the
    epoch's training loss is the same bits for any process count and across a resume.
    """

    loss: torch.Tensor  # int64, units of LOSS_UNIT
    correct: torch.Tensor  # int64
    count: int  # images so far (a host number: the step knows it)

    @classmethod
    def start(cls, device, partial: dict | None = None, carries_partial: bool = True) -> EpochTotals:
        """Zero sums, or an interrupted epoch's sums over all ranks (state.json's ``partial``),
        carried by one rank (``carries_partial``) so that the epoch's all-reduce counts them once."""
        partial = partial if (partial and carries_partial) else {}
        return cls(
            torch.tensor(int(partial.get("loss_units", 0)), dtype=torch.int64, device=device),
            torch.tensor(int(partial.get("correct", 0)), dtype=torch.int64, device=device),
            int(partial.get("count", 0)),
        )

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.loss += (loss.detach().double() * (target.numel() / LOSS_UNIT)).round().long()
        self.correct += (logits.detach().argmax(1) == target).sum()
        self.count += target.numel()

    def stacked(self) -> torch.Tensor:
        """(loss units, correct, count) as one float64 device tensor, ready for one all-reduce: the
        values are whole numbers below 2^53, so float64 sums of them are exact in any order."""
        return torch.stack(
            [
                self.loss.double(),
                self.correct.double(),
                torch.tensor(float(self.count), dtype=torch.float64, device=self.loss.device),
            ]
        )

    def over_ranks(self) -> dict:
        """The sums over all ranks, as state.json's ``partial`` holds them (one all-reduce, one read)."""
        loss, correct, count = (int(v) for v in all_reduce_sum(self.stacked()).tolist())
        return {"loss_units": loss, "correct": correct, "count": count}


def train_step(parts: Parts, micro_batches, step: int, totals: EpochTotals) -> torch.Tensor:
    """One optimizer step over this process's micro-batches; returns the local
    non-finite flag (a 0-dim tensor on the device, no host synchronization)."""
    cfg = parts.cfg
    set_lr(parts.optimizer, lr_at(step, cfg.train, parts.loader.steps_per_epoch))
    backward = _backward_exact if cfg.train.exact_reduce else _backward_ddp
    bad = backward(parts, micro_batches, step, totals)
    for p in frozen_parameters(parts.model, step // parts.loader.steps_per_epoch):
        p.grad = None  # the optimizer skips a parameter without a gradient: no momentum, no decay
    with span("optimizer"):
        if not parts.deepspeed:  # DeepSpeed clips (its config) and keeps the gradients partitioned
            parts.precision.unscale(parts.optimizer)
            grads = [q.grad for q in parts.model.parameters() if q.grad is not None]
            if cfg.train.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.train.grad_clip)
            else:
                norm = torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros((), device=parts.device)
            if cfg.run.precision != "fp16":  # under fp16 the scaler skips such steps instead
                bad = bad + (~torch.isfinite(norm)).float()
        parts.precision.step(parts.optimizer)
        parts.optimizer.zero_grad(set_to_none=True)
    return bad


def frozen_parameters(model: torch.nn.Module, epoch: int) -> list[torch.Tensor]:
    """The parameters a model freezes in ``epoch`` (from 0) by its ``frozen_parameters(epoch)``
    (airbench94's whitening bias after its first epochs); none for a model without it. They keep
    ``requires_grad``, so that DDP's gradient buckets stay the same in every epoch."""
    hook = getattr(model, "frozen_parameters", None)
    return list(hook(epoch)) if hook is not None else []


def _forward_loss(parts: Parts, x, y, step: int, totals: EpochTotals):
    cfg = parts.cfg
    with span("forward+loss"):
        x = parts.precision.inputs(normalize(x, cfg.data.mean, cfg.data.std, cfg.run.channels_last))
        with parts.precision.autocast():
            logits = parts.train_model(x)
        loss = smoothed_cross_entropy(logits, y, cfg.train.label_smoothing, cfg.train.smoothing_form)
        loss = parts.callbacks.on_loss(loss, step)
        totals.add(loss, logits, y)
    return loss, (~torch.isfinite(loss.detach())).float()


def _no_sync(parts: Parts):
    """DDP's ``no_sync()``: gradients stay in this process. Not Accelerate's ``no_sync``, which does
    nothing for one process although `accelerate launch --num_processes 1` still wraps the model in
    DDP: there every backward then reduced the gradients into DDP's buckets, the very memory the
    exact path's chunk gradients alias (``gradient_as_bucket_view``), and the chunk sums came out
    wrong. DeepSpeed keeps its own accumulation."""
    if parts.deepspeed:
        return contextlib.nullcontext()
    return getattr(parts.train_model, "no_sync", contextlib.nullcontext)()


def _backward_ddp(parts: Parts, micro_batches, step: int, totals: EpochTotals) -> torch.Tensor:
    """Gradients averaged by DDP (or DeepSpeed): fast; equal across process
    counts up to float summation order."""
    accum = len(micro_batches)
    bad = torch.zeros((), device=parts.device)
    for i, (x, y, _idx) in enumerate(micro_batches):
        last = i == accum - 1
        sync = contextlib.nullcontext() if last else _no_sync(parts)
        with sync:
            loss, nonfinite = _forward_loss(parts, x, y, step, totals)
            # DeepSpeed divides by its accumulation steps itself.
            with span("backward"):  # DDP's gradient all-reduce runs inside it
                parts.precision.backward(loss if parts.deepspeed else loss / accum)
        bad = bad + nonfinite
    return bad


def _backward_exact(parts: Parts, micro_batches, step: int, totals: EpochTotals) -> torch.Tensor:
    """Gradients of fixed-size chunks, summed in a fixed tree (see ``exact``)."""
    chunk = parts.cfg.model.bn_group
    params = [p for p in parts.model.parameters() if p.requires_grad]  # a frozen one gets no gradient
    bns = [m for m in parts.model.modules() if isinstance(m, GroupBatchNorm2d)]
    tree = TreeSum()
    bad = torch.zeros((), device=parts.device)
    with _no_sync(parts):
        for x, y, _idx in micro_batches:
            for s in range(0, len(y), chunk):
                loss, nonfinite = _forward_loss(parts, x[s : s + chunk], y[s : s + chunk], step, totals)
                with span("backward"):
                    parts.precision.backward(loss)
                # BatchNorm statistics follow the same tree as the gradients
                stats = [m.stat_sum.clone() for m in bns]
                for m in bns:
                    m.stat_sum.zero_()
                tree.add(take_grads(params) + stats)
                bad = bad + nonfinite
    summed = tree.result()
    for m, st in zip(bns, summed[len(params) :]):
        m.stat_sum.copy_(st)
    num_chunks = parts.shard.global_batch // chunk
    with span("backward"):  # the gradients' all-reduce, which DDP runs inside the backward
        reduced = reduce_across_processes(summed[: len(params)], num_chunks)
    for q, g in zip(params, reduced):
        q.grad = g
    return bad
