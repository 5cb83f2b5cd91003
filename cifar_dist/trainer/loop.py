"""The training loop: the same for every launcher.

``Trainer.fit`` orders the work of an epoch; each component decides when it
is due: the control read (``control``), the checkpointer, the evaluator and
the stop request (``stopping``). Callbacks (``callbacks``) see every step.
"""
from __future__ import annotations

import time

from cifar_dist.distributed.collectives import all_reduce_sum, print0
from cifar_dist.errors import Preempted, say
from cifar_dist.model.optim import lr_at
from cifar_dist.storage.state import LOSS_UNIT, TrainState
from cifar_dist.trainer.build import Parts, graph_count
from cifar_dist.trainer.control import Control
from cifar_dist.trainer.step import new_totals, stacked_totals, train_step
from cifar_dist.trainer.stopping import StopRequest


class Epoch:
    """One epoch's running sums, clock and progress bar (closed however the epoch ends)."""

    def __init__(self, parts: Parts, state: TrainState, progress, epochs: int):
        self.number, self.steps_per_epoch = state.epoch + 1, parts.loader.steps_per_epoch
        self.totals = new_totals(parts.device, state.partial, carries_partial=parts.shard.rank == 0)
        state.partial = {}
        self.stop_votes = 0.0  # ranks asking to stop, as of the latest control read
        self.start, self.steps_run = time.perf_counter(), 0
        self.batch = parts.shard.global_batch  # the bar counts images: it shows images/s
        self.bar = progress(total=self.steps_per_epoch * self.batch, initial=state.step_in_epoch * self.batch,
                            desc=f"epoch {self.number}/{epochs}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def metrics(self, parts: Parts, state: TrainState) -> dict:
        """The epoch's row: training loss and accuracy over all ranks, speed, learning rate."""
        elapsed = time.perf_counter() - self.start
        t = all_reduce_sum(stacked_totals(self.totals))
        count = max(float(t[2]), 1.0)
        return {"epoch": self.number, "step": state.global_step, "train_loss": float(t[0]) * LOSS_UNIT / count,
                "train_acc": float(t[1]) / count,
                "lr": lr_at(max(state.global_step - 1, 0), parts.cfg.train, self.steps_per_epoch),
                "epoch_time_s": elapsed, "images_per_s": self.steps_run * parts.shard.global_batch / max(elapsed, 1e-9),
                "skipped_steps": state.skipped_steps}


class Trainer:
    """Trains ``parts`` from ``state``; what callbacks receive as ``run``."""

    def __init__(self, parts: Parts, state: TrainState, progress):
        self.parts, self.state, self.progress = parts, state, progress
        self.cfg, self.model, self.optimizer = parts.cfg, parts.model, parts.optimizer
        self.rank, self.world, self.run_dir = parts.shard.rank, parts.shard.world, parts.run_dir
        train = parts.cfg.train
        self.max_steps = train.max_steps or train.epochs * parts.loader.steps_per_epoch
        self.stop = StopRequest(parts.stop_file, poll_file=self.rank == 0, say=say if self.rank == 0 else None)
        self.stop_requested = False          # by a callback: end after the current step
        self.graphs_after_warmup: int | None = None  # compiled graphs after the first epoch

    def request_stop(self) -> None:
        """End the run after the current step, as if it were the last (same on every rank)."""
        self.stop_requested = True

    def finished(self) -> bool:
        s = self.state
        return s.epoch >= self.cfg.train.epochs or s.global_step >= self.max_steps or self.stop_requested

    def fit(self) -> TrainState:
        """Train to the end (epochs or max_steps, or a stop); evaluate, log, checkpoint."""
        parts, state = self.parts, self.state
        with self.stop:
            control = Control(parts.model, parts.precision, parts.device, state.global_step,
                              self.cfg.train.exact_reduce, skipped_steps=state.skipped_steps)
            parts.callbacks.on_train_start(self)
            while not self.finished():
                with Epoch(parts, state, self.progress, self.cfg.train.epochs) as epoch:
                    for micro in parts.loader.iter_epoch(state.epoch, state.step_in_epoch):
                        if self._step(micro, epoch, control):
                            break
                last = self._end_epoch(epoch)
                stopping = epoch.stop_votes > 0 and not last  # read at the epoch's last step
                if parts.checkpointer.due_at_epoch_end(state.epoch, state.step_in_epoch == 0, last or stopping):
                    parts.checkpointer.save(parts, state)
                if self.graphs_after_warmup is None:
                    self.graphs_after_warmup = graph_count()
                if stopping:
                    raise Preempted(self.stop.reason)
                if last:
                    break
        return state

    def _step(self, micro, epoch: Epoch, control: Control) -> bool:
        """One step and what is due after it; True when the epoch ends here."""
        parts, state = self.parts, self.state
        parts.callbacks.on_step_start(state.global_step)
        bad = train_step(parts, micro, state.global_step, epoch.totals)
        done = state.global_step + 1  # optimizer steps done after this one
        boundary = state.step_in_epoch + 1 >= epoch.steps_per_epoch or done >= self.max_steps
        checkpoint_due = parts.checkpointer.due_mid_epoch(done, boundary)
        # the flags are read before anything is saved: a checkpoint never holds NaN weights;
        # a stop is looked for only when it will be read
        reading = control.due(done, boundary or checkpoint_due)
        control.after_step(bad, reading and self.stop.requested())
        metrics = {"lr": parts.optimizer.param_groups[0]["lr"]}
        state.global_step, state.step_in_epoch, epoch.steps_run = done, state.step_in_epoch + 1, epoch.steps_run + 1
        epoch.bar.update(epoch.batch)
        if reading:
            read = control.read(epoch.totals["loss"], f" (epoch {epoch.number})")
            state.skipped_steps, epoch.stop_votes = read.skipped, read.stop_votes
            metrics["train_loss"] = read.loss_sum * LOSS_UNIT / max(epoch.totals["count"], 1)
            epoch.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
            if read.stop_votes > 0 and not boundary:
                parts.checkpointer.save(parts, state, epoch.totals)
                raise Preempted(self.stop.reason)
        if checkpoint_due:
            parts.checkpointer.save(parts, state, epoch.totals)
        parts.callbacks.on_step_end(done - 1, metrics)
        return done >= self.max_steps or self.stop_requested

    def _end_epoch(self, epoch: Epoch) -> bool:
        """Metrics, evaluation and logging of the epoch just run; True if it ends the run."""
        parts, state = self.parts, self.state
        row = epoch.metrics(parts, state)
        finished_epoch = state.step_in_epoch >= epoch.steps_per_epoch
        last = (state.global_step >= self.max_steps or self.stop_requested
                or (finished_epoch and epoch.number >= self.cfg.train.epochs))
        parts.evaluator.last = None
        if parts.evaluator.due(epoch.number, last):
            result = parts.evaluator.run()
            row.update(test_loss=result["loss"], test_acc=result["acc"])
        if finished_epoch:
            state.epoch, state.step_in_epoch = epoch.number, 0
        state.history.append(row)
        if parts.metrics is not None:
            parts.metrics.log(row)
        print0(epoch_line(row))
        parts.callbacks.on_epoch_end(row)
        return last or self.stop_requested


def fit(parts: Parts, state: TrainState, progress) -> TrainState:
    """Train ``parts`` from ``state`` to the end (see ``Trainer``)."""
    return Trainer(parts, state, progress).fit()


def epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"step {row['step']}", f"train loss {row['train_loss']:.4f}",
             f"train acc {100 * row['train_acc']:.2f}%"]
    if "test_acc" in row:
        parts += [f"test loss {row['test_loss']:.4f}", f"test acc {100 * row['test_acc']:.2f}%"]
    parts += [f"lr {row['lr']:.3g}", f"{row['epoch_time_s']:.1f} s", f"{row['images_per_s']:.0f} img/s"]
    return " | ".join(parts)
