"""When the loop saves, and the save itself: every rank takes part in one atomic checkpoint of
``state.json`` and each stateful component's files (the format: ``storage.checkpoint``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from cifar_dist.config.schema import CheckpointConfig
from cifar_dist.distributed.collectives import barrier, share_from_main
from cifar_dist.errors import EnvironmentFault
from cifar_dist.storage.checkpoint import (
    CheckpointWriter,
    load_optimizer_state,
    load_weights,
    read_state,
    write_tensors,
)
from cifar_dist.storage.state import TrainState


class Stateful(Protocol):
    """What a checkpoint holds of a component: files it writes into the checkpoint's folder (on
    rank 0; on every rank when ``collective``) and reads back on every rank."""

    collective: bool

    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...


class Weights:
    """The model's weights and the optimizer's state, of a run without DeepSpeed."""

    collective = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def save(self, folder: Path) -> None:
        write_tensors(self.model.state_dict(), folder / "model.safetensors")
        try:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        except RuntimeError as e:  # torch's zip writer reports a failed write this way
            raise OSError(f"optimizer.pt: {str(e).strip().splitlines()[0][:200]}") from None

    def load(self, folder: Path) -> None:
        load_weights(folder / "model.safetensors", self.model)
        self.optimizer.load_state_dict(load_optimizer_state(folder / "optimizer.pt"))


class DeepSpeedWeights:
    """DeepSpeed's engine: its weights and partitioned optimizer state, which every rank saves."""

    collective = True

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def save(self, folder: Path) -> None:
        self.accelerator.save_state(str(folder), safe_serialization=True)

    def load(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))


class Checkpointer:
    """The checkpoint schedule and the save of ``components`` ({name: Stateful}); none with ``run_dir`` None."""

    def __init__(self, run_dir: Path | None, cfg: CheckpointConfig, components: dict, on_staged=None):
        self.writer = CheckpointWriter(run_dir, cfg.keep) if run_dir is not None else None
        self.every_steps, self.every_epochs = cfg.every_steps, cfg.every_epochs
        self.components: dict[str, Stateful] = components
        self.on_staged = on_staged

    def due(self, steps_done: int) -> bool:
        return bool(self.every_steps) and steps_done % self.every_steps == 0

    def due_after_epoch(self, epochs_done: int, complete: bool) -> bool:
        return bool(self.every_epochs) and complete and epochs_done % self.every_epochs == 0

    def save(self, record: dict) -> Path | None:
        """Checkpoint ``record`` (state.json) and every component's files."""
        if self.writer is None:
            return None
        writer, step = self.writer, record["global_step"]
        folder = share_from_main(lambda: writer.begin(step))
        barrier()
        for component in self.components.values():
            if component.collective:
                component.save(folder)
                barrier()

        def write():
            try:
                writer.write_state(folder, record)
                for component in self.components.values():
                    if not component.collective:
                        component.save(folder)
            except OSError as e:
                writer.abort(folder)
                raise EnvironmentFault(
                    f"{folder.parent}: cannot write checkpoint of step {step}: "
                    f"{e.strerror or e}; the previous checkpoint is intact"
                ) from None

        share_from_main(write)
        if self.on_staged is not None:
            self.on_staged(folder, step)
        final = share_from_main(lambda: writer.commit(folder, step))
        barrier()
        return final

    def load(self, ckpt: Path) -> TrainState:
        """Every component's state from checkpoint ``ckpt``; returns the TrainState it holds."""
        state = read_state(ckpt)
        for component in self.components.values():
            component.load(ckpt)
        return state
