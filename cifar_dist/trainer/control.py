"""The control work after every step, the same in training and in the benchmark.

Each step ends with one collective that carries the BatchNorm statistics, the
step's non-finite flag and, on a step whose flags will be read, this rank's stop
request. The flags stay on the device; the host reads them in one transfer every
``CONTROL_EVERY`` steps, and on any step where the loop must know (before a
checkpoint, at the end of an epoch). Between reads no step waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cifar_dist.distributed.collectives import all_reduce_sum
from cifar_dist.distributed.exact import tree_all_reduce
from cifar_dist.errors import NonFiniteError
from cifar_dist.model.batchnorm import sync_bn_statistics
from cifar_dist.trainer.profiling import span

CONTROL_EVERY = 10  # steps between host reads of the stop / non-finite flags


@dataclass
class Reading:
    """What the host learns at a control read."""

    loss_sum: float  # the epoch's summed training loss so far (this rank), in units of LOSS_UNIT
    stop_votes: float  # ranks that asked to stop
    skipped: int  # fp16 steps skipped by the loss scaler in the whole run so far


class Control:
    """Device-side flags of the running loop and their amortized host read."""

    def __init__(
        self,
        model,
        precision,
        device,
        global_step: int = 0,
        exact_reduce: bool = False,
        collective: bool = True,
        skipped_steps: int = 0,
    ):
        self.model, self.precision = model, precision
        # the precision counts skips since it was built; a resumed run adds the earlier ones
        self.skipped_before = skipped_steps - int(precision.skipped_count())
        # ``collective=False``: this process alone (the benchmark's single-process reference)
        self.reduce = None if not collective else tree_all_reduce if exact_reduce else all_reduce_sum
        self.first_bad = torch.full((), -1.0, device=device)  # the first non-finite step, -1: none
        self.step = torch.full((), float(global_step), device=device)
        self.no, self.yes = torch.zeros((), device=device), torch.ones((), device=device)
        self.votes = self.no

    @staticmethod
    def due(steps_done: int, must: bool = False) -> bool:
        """Whether the flags are read after ``steps_done`` optimizer steps."""
        return must or steps_done % CONTROL_EVERY == 0

    def after_step(
        self,
        bad: torch.Tensor,
        steps_done: int,
        loss_sum: torch.Tensor,
        must_read: bool = False,
        stop_asked=lambda: False,
        where: str = "",
    ) -> Reading | None:
        """The step's collective (BatchNorm statistics, non-finite flag and, on a step whose flags
        will be read, this rank's stop vote: ``stop_asked()``), then the host read when it is due:
        every ``CONTROL_EVERY`` steps and whenever ``must_read`` (before a checkpoint, at the end
        of an epoch). Returns the reading, or None between reads."""
        reading = self.due(steps_done, must_read)
        with span("control"):
            flags = torch.stack([bad, self.yes if reading and stop_asked() else self.no])
            summed = sync_bn_statistics(self.model, self.reduce, extra=flags)
            self.first_bad = torch.where((summed[0] > 0) & (self.first_bad < 0), self.step, self.first_bad)
            self.votes = summed[1]
            self.step += 1
            return self.read(loss_sum, where) if reading else None

    def read(self, loss_sum: torch.Tensor, where: str = "") -> Reading:
        """One device-to-host transfer; raises NonFiniteError if any step so far was not finite."""
        bad_at, loss, votes, skipped = torch.stack(
            [self.first_bad, loss_sum.float(), self.votes.float(), self.precision.skipped_count().float()]
        ).tolist()
        if bad_at >= 0:
            raise NonFiniteError(
                f"loss or gradients became NaN/Inf at step {int(bad_at)}{where}; the last good checkpoint is kept"
            )
        return Reading(loss, votes, self.skipped_before + int(skipped))
