"""The flags each step leaves on the device (non-finite, stop votes) and their amortized host
read: every ``CONTROL_EVERY`` steps, and whenever the loop must know (docs/reproducibility)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cifar_dist.errors import NonFiniteError

CONTROL_EVERY = 10  # steps between host reads of the stop / non-finite flags


@dataclass
class Reading:
    """What the host learns at a control read."""

    loss_sum: float  # the epoch's summed training loss so far (this rank), in units of LOSS_UNIT
    stop_votes: float  # ranks that asked to stop
    skipped: int  # fp16 steps skipped by the loss scaler in the whole run so far


class Control:
    """Device-side flags of the loop: ``flags`` join the step's one collective, ``record`` takes them back."""

    def __init__(self, precision, device, steps_done: int = 0, skipped_steps: int = 0):
        self.precision = precision
        # the precision counts skips since it was built; a resumed run adds the earlier ones
        self.skipped_before = skipped_steps - int(precision.skipped_count())
        self.first_nonfinite = torch.full((), -1.0, device=device)  # the step it happened at, -1: none
        self.step = torch.full((), float(steps_done), device=device)
        self.no, self.yes = torch.zeros((), device=device), torch.ones((), device=device)

    @staticmethod
    def due(steps_done: int, must: bool = False) -> bool:
        """Whether the flags are read after ``steps_done`` optimizer steps."""
        return must or steps_done % CONTROL_EVERY == 0

    def flags(self, nonfinite: torch.Tensor, stop_vote: bool) -> torch.Tensor:
        """This rank's flags of the step just run, to be summed over the ranks."""
        return torch.stack([nonfinite, self.yes if stop_vote else self.no])

    def record(self, summed: torch.Tensor, loss_sum: torch.Tensor, read: bool, where: str = "") -> Reading | None:
        """Keep the step's summed flags; with ``read``, the host read (raises NonFiniteError if any was not)."""
        self.step += 1  # the number of the step just run, counted from 1
        first = (summed[0] > 0) & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(first, self.step, self.first_nonfinite)
        if not read:
            return None
        nonfinite_at, loss, votes, skipped = torch.stack(
            [self.first_nonfinite, loss_sum.float(), summed[1].float(), self.precision.skipped_count().float()]
        ).tolist()
        if nonfinite_at >= 0:
            raise NonFiniteError(
                f"loss or gradients became NaN/Inf at step {int(nonfinite_at)}{where}; the last good checkpoint is kept"
            )
        return Reading(loss, votes, self.skipped_before + int(skipped))
