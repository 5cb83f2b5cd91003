"""When the loop saves, and how every rank takes part in one atomic checkpoint.

The file format (weights, optimizer, state.json, atomic commit, retention) is
``checkpoint.CheckpointWriter``'s; this decides when a checkpoint is due and
runs the save across ranks.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from cifar_dist.distributed.collectives import all_reduce_sum, barrier, share_from_main, world_info
from cifar_dist.errors import EnvironmentFault
from cifar_dist.trainer.step import stacked_totals


class Checkpointer:
    """``writer`` None: this run never saves (a benchmark, a test)."""

    def __init__(self, writer, every_steps: int = 0, every_epochs: int = 0):
        self.writer, self.every_steps, self.every_epochs = writer, every_steps, every_epochs

    def due_mid_epoch(self, steps_done: int, boundary: bool) -> bool:
        """After ``steps_done`` steps, not at an epoch's end (that one is ``due_at_epoch_end``'s)."""
        return bool(self.every_steps) and steps_done % self.every_steps == 0 and not boundary

    def due_at_epoch_end(self, epochs_done: int, finished_epoch: bool, ending: bool) -> bool:
        """At the end of the run (or a stop), and after every ``every_epochs``-th full epoch."""
        return ending or bool(self.every_epochs and finished_epoch and epochs_done % self.every_epochs == 0)

    def save(self, parts, state, totals: dict | None = None) -> Path | None:
        """Checkpoint ``state``; mid-epoch, ``totals`` (the epoch's running sums) go with it,
        summed over all ranks first: a resume on any process count then continues the epoch's
        metrics exactly (one rank carries them on, ``step.new_totals``)."""
        if totals is None:
            return self._save(parts, state)
        loss, correct, count = (int(v) for v in all_reduce_sum(stacked_totals(totals)).tolist())
        state.partial = {"loss_units": loss, "correct": correct, "count": count}
        try:
            return self._save(parts, state)
        finally:
            state.partial = {}

    def _save(self, parts, state) -> Path | None:
        if self.writer is None:
            return None
        writer = self.writer
        state.scaler = parts.precision.state_dict()
        rank, state.world_size = world_info()
        tmp = share_from_main(lambda: writer.begin(state.global_step))
        barrier()

        def write():
            try:
                if rank == 0:
                    writer.write_local(tmp, parts.model, parts.optimizer, asdict(state))
            except OSError as e:
                writer.abort(tmp)
                raise EnvironmentFault(f"{tmp.parent}: cannot write checkpoint of step "
                                       f"{state.global_step}: {e.strerror or e}; the previous "
                                       "checkpoint is intact") from None

        if parts.deepspeed:
            parts.accelerator.save_state(str(tmp), safe_serialization=True)
            barrier()
            share_from_main(lambda: writer.write_state(tmp, asdict(state)))
        else:
            share_from_main(write)
        parts.callbacks.on_checkpoint_staged(tmp, state.global_step)
        final = share_from_main(lambda: writer.commit(tmp, state.global_step))
        barrier()
        return final
