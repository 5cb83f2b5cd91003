"""A stateful callback for the resume tests: ``run.callbacks=[tally:Tally]`` with tests/ on
PYTHONPATH (conftest.fault_env). It counts the steps and epochs it has seen and sums their
learning rates and training losses, so a resumed run ends with the same tally as an
uninterrupted one only if its state was saved with each checkpoint and restored."""

from __future__ import annotations

from cifar_dist.trainer.callbacks import Callback


class Tally(Callback):
    def __init__(self):
        self.steps, self.lr_sum, self.epochs, self.loss_sum = 0, 0.0, 0, 0.0

    def on_step_end(self, step: int, metrics: dict) -> None:
        self.steps += 1
        self.lr_sum += metrics["lr"]

    def on_epoch_end(self, row: dict) -> None:
        self.epochs += 1
        self.loss_sum += row["train_loss"]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "lr_sum": self.lr_sum, "epochs": self.epochs, "loss_sum": self.loss_sum}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.lr_sum = state["steps"], state["lr_sum"]
        self.epochs, self.loss_sum = state["epochs"], state["loss_sum"]
