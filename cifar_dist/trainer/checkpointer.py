"""When the loop saves, and how every rank takes part in one atomic checkpoint.

The file format (weights, optimizer, state.json, manifest, atomic commit, retention) is
``storage.checkpoint.CheckpointWriter``'s; this decides when a checkpoint is due and
runs the save across ranks. Rank 0 adds the weight averages' files and the callbacks' state
(``trainer.averaging``, ``trainer.callbacks``), which every rank holds the same.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from cifar_dist.distributed.collectives import barrier, share_from_main, world_info
from cifar_dist.errors import EnvironmentFault

if TYPE_CHECKING:
    from cifar_dist.storage.state import TrainState
    from cifar_dist.trainer.build import Parts
    from cifar_dist.trainer.step import EpochTotals


class Checkpointer:
    """Owns the checkpoint schedule and the save. ``writer`` None: this run never saves (a
    benchmark, a test). The trainer's TrainState is never changed here: a save serializes a
    copy, with the epoch's partial sums, the loss scaler and the world size added."""

    def __init__(self, writer, every_steps: int = 0, every_epochs: int = 0):
        self.writer, self.every_steps, self.every_epochs = writer, every_steps, every_epochs

    def due_mid_epoch(self, steps_done: int) -> bool:
        """Whether ``checkpoint.every_steps`` falls after ``steps_done`` steps."""
        return bool(self.every_steps) and steps_done % self.every_steps == 0

    def maybe_save_mid_epoch(
        self, parts: Parts, state: TrainState, totals: EpochTotals, ends_epoch: bool, stopping: bool
    ) -> Path | None:
        """After a step inside an epoch: every ``every_steps`` steps, and when the run stops there
        (a signal or the STOP file); the epoch's running sums go with it. At an epoch's last step
        the epoch-end checkpoint is the one (``maybe_save_at_epoch_end``)."""
        if ends_epoch or not (stopping or self.due_mid_epoch(state.global_step)):
            return None
        return self.save(parts, state, partial=totals.over_ranks())

    def maybe_save_at_epoch_end(
        self, parts: Parts, state: TrainState, complete: bool, ending: bool, partial: dict | None = None
    ) -> Path | None:
        """After an epoch: at the end of the run (however it ends; ``partial``: the sums of an
        epoch it ends inside) and after every ``every_epochs``-th complete epoch."""
        if ending or (self.every_epochs and complete and state.epoch % self.every_epochs == 0):
            return self.save(parts, state, partial=partial)
        return None

    def save(self, parts: Parts, state: TrainState, partial: dict | None = None) -> Path | None:
        """Checkpoint ``state`` (with an interrupted epoch's ``partial`` sums over all ranks)."""
        if self.writer is None:
            return None
        writer = self.writer
        rank, world = world_info()
        record = {
            **asdict(state),
            "partial": partial or {},
            "scaler": parts.precision.state_dict(),
            "world_size": world,
        }
        step = state.global_step
        tmp = share_from_main(lambda: writer.begin(step))
        barrier()

        def write():
            try:
                if rank == 0:
                    if parts.deepspeed:  # its engine saved the weights and optimizer
                        writer.write_state(tmp, record)
                    else:
                        writer.write_local(tmp, parts.model, parts.optimizer, record)
                    parts.averages.save(tmp)
                    parts.callbacks.save_state(tmp)
            except OSError as e:
                writer.abort(tmp)
                raise EnvironmentFault(
                    f"{tmp.parent}: cannot write checkpoint of step {step}: "
                    f"{e.strerror or e}; the previous checkpoint is intact"
                ) from None

        if parts.deepspeed:
            parts.accelerator.save_state(str(tmp), safe_serialization=True)
            barrier()
        share_from_main(write)
        parts.callbacks.on_checkpoint_staged(tmp, step)
        final = share_from_main(lambda: writer.commit(tmp, step))
        barrier()
        return final
