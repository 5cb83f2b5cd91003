"""Which samples each process sees: step ``s`` takes positions [s*B, (s+1)*B) of the epoch's
order, rank ``r`` of ``W`` its r-th slice of B/W, cut into ``accum`` micro-batches; the same
global batch for any W, the last incomplete one dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cifar_dist.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    global_batch: int
    accum: int = 1

    def __post_init__(self):
        if self.global_batch % (self.world * self.accum):
            raise ConfigError(
                f"train.batch_size: {self.global_batch} is not divisible by "
                f"{self.world} processes x train.accum_steps {self.accum}"
            )

    @property
    def per_process(self) -> int:
        return self.global_batch // self.world

    @property
    def micro_batch(self) -> int:
        return self.per_process // self.accum

    def steps_per_epoch(self, n: int) -> int:
        return n // self.global_batch

    def step_positions(self, step: int) -> list[slice]:
        """Positions in the epoch order of this rank's micro-batches at ``step``."""
        base = step * self.global_batch + self.rank * self.per_process
        return [slice(base + m * self.micro_batch, base + (m + 1) * self.micro_batch) for m in range(self.accum)]

    def rank_order(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's sample indices of a whole epoch, in the order it visits them."""
        steps = self.steps_per_epoch(len(order))
        parts = [order[p] for s in range(steps) for p in self.step_positions(s)]
        return torch.cat(parts) if parts else order[:0]


def eval_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice of ``n`` evaluation samples owned by ``rank``: every sample exactly once."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
