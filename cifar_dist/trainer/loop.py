"""The training loop: the same for every launcher, in one ``fit`` that reads top to bottom.

Each step is followed by what its components find due: the control collective and, when
due, its host read (``Control.after_step``); the weight averages (``WeightAverages.after_step``);
the callbacks; a mid-epoch checkpoint (``Checkpointer.maybe_save_mid_epoch``), which so holds
the averages and the callbacks' state of the step it is taken at. Each epoch ends with its metrics row,
an evaluation when due (``Evaluator.maybe_run``) and an epoch-end checkpoint when due. The
run ends for one ``StopReason``, the same way for each kind:

    FINISHED, REQUESTED, TARGET   the epoch is closed (its row, an evaluation), a checkpoint is
                                  written that records the end (``TrainState.ended``, with an
                                  unfinished epoch's sums), then the run's final evaluation and
                                  its results. A run resumed from it trains no further step
                                  (``Trainer.ended``), unless train.max_steps now lies further on
    SIGNAL, STOP_FILE             (preemption, Ctrl-C, the STOP file) a checkpoint is written where
                                  the run stands, mid-epoch with the epoch's sums; nothing else:
                                  ``--resume`` continues it exactly
"""

from __future__ import annotations

import time

import torch

from cifar_dist.distributed.collectives import all_reduce_max, all_reduce_sum, print0
from cifar_dist.errors import say
from cifar_dist.model.optim import lr_at, schedule_steps
from cifar_dist.storage.state import LOSS_UNIT, TrainState
from cifar_dist.trainer.build import Parts, graph_count
from cifar_dist.trainer.control import Control
from cifar_dist.trainer.profiling import RunProfile, data_waits
from cifar_dist.trainer.step import EpochTotals, train_step
from cifar_dist.trainer.stopping import StopReason, StopRequest
from cifar_dist.trainer.throughput import Throughput, peak_memory_gb


class EpochRun:
    """One epoch as it runs: its number, running sums, clock and progress bar."""

    def __init__(self, parts: Parts, state: TrainState, progress, epochs: float):
        self.number, self.steps = state.epoch + 1, parts.loader.steps_per_epoch
        self.totals = EpochTotals.start(parts.device, state.partial, carries_partial=parts.shard.rank == 0)
        self.start, self.steps_run = time.perf_counter(), 0
        self.images = parts.shard.global_batch  # per step: the bar counts images, so it shows images/s
        self.bar = progress(
            total=self.steps * self.images,
            initial=state.step_in_epoch * self.images,
            desc=f"epoch {self.number}/{epochs:g}",
        )

    def row(self, parts: Parts, state: TrainState, throughput: Throughput) -> dict:
        """The epoch's metrics row: training loss and accuracy over all ranks, speed, learning
        rate, FLOP/s and MFU per device, and the most memory any process used."""
        elapsed = time.perf_counter() - self.start
        sums = all_reduce_sum(self.totals.stacked())
        memory = all_reduce_max(torch.tensor([peak_memory_gb(parts.device)], device=sums.device, dtype=sums.dtype))
        loss, correct, count, peak_gb = torch.cat([sums, memory]).tolist()  # one host read
        count = max(count, 1.0)
        images_per_s = self.steps_run * self.images / max(elapsed, 1e-9)
        return {
            "epoch": self.number,
            "step": state.global_step,
            "train_loss": loss * LOSS_UNIT / count,
            "train_acc": correct / count,
            "lr": lr_at(max(state.global_step - 1, 0), parts.cfg.train, self.steps),
            "epoch_time_s": elapsed,
            "images_per_s": images_per_s,
            **throughput.figures(images_per_s / parts.shard.world),
            "peak_memory_gb": peak_gb,
            "skipped_steps": state.skipped_steps,
        }


class Trainer:
    """Trains ``parts`` from ``state``; what callbacks receive as ``run``. Only the trainer
    changes ``state``."""

    def __init__(self, parts: Parts, state: TrainState, progress, stop: StopRequest | None = None):
        self.parts, self.state, self.progress = parts, state, progress
        self.cfg, self.model, self.optimizer = parts.cfg, parts.model, parts.optimizer
        self.rank, self.world, self.run_dir = parts.shard.rank, parts.shard.world, parts.run_dir
        train = parts.cfg.train
        self.max_steps = train.max_steps or schedule_steps(train, parts.loader.steps_per_epoch)
        # the run's own StopRequest (installed since its start-up), or one for this loop alone
        self.stop = stop or StopRequest(None, say=say if self.rank == 0 else None)
        self.stop.stop_file = parts.stop_file if self.rank == 0 else None  # rank 0 alone polls the file
        self.ended = self._ended_before()
        if self.ended is None:
            self._reopen_epoch()
        self.stop_reason: StopReason | None = self.ended  # a run that has ended trains no further step
        self.control = Control(
            parts.model,
            parts.precision,
            parts.device,
            state.global_step,
            train.exact_reduce,
            skipped_steps=state.skipped_steps,
        )
        self.graphs_after_warmup: int | None = None  # compiled graphs after the first epoch
        self.throughput = Throughput.measure(parts.cfg, parts.device)
        self.loss_logged_at = state.global_step  # the step of the last training loss sent to the trackers
        self.profile = RunProfile(self.cfg.run.profile, parts.run_dir, parts.device, state.global_step, self.max_steps)

    def _ended_before(self) -> StopReason | None:
        """Why the run had ended at the state it starts from, if it had: its steps or epochs done
        (a longer train.max_steps lets a finished run go on), or an earlier end it recorded
        (eval.stop_at_target, a callback's request_stop)."""
        state = self.state
        if state.global_step >= self.max_steps or state.epoch >= self.cfg.train.epochs:
            return StopReason.FINISHED
        if state.ended and state.ended != StopReason.FINISHED.value:
            return StopReason(state.ended)
        return None

    def _reopen_epoch(self) -> None:
        """A run that ended inside an epoch and goes on (a longer train.max_steps): the epoch's
        row goes (the checkpoint kept its sums), so that the row written when it ends covers it
        all, as in a run that never stopped."""
        state = self.state
        state.ended = ""
        if state.step_in_epoch and state.history and state.history[-1]["epoch"] == state.epoch + 1:
            state.history.pop()

    @property
    def preempted(self) -> bool:
        """Stopping to be resumed later (a signal, the STOP file)."""
        return self.stop_reason is not None and self.stop_reason.preempts

    def request_stop(self, reason: StopReason = StopReason.REQUESTED) -> None:
        """End the run after the current step, as if it were the last (same on every rank)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def fit(self) -> TrainState:
        """Train until a ``StopReason``; returns the state where training stands."""
        parts, state, callbacks = self.parts, self.state, self.parts.callbacks
        with self.stop, self.profile:
            self.stop.phase = "train"
            callbacks.on_train_start(self)
            if self.stop_reason is None and self._stop_asked_before_start():
                self.request_stop(StopReason.SIGNAL if self.stop.signalled else StopReason.STOP_FILE)
            while self.stop_reason is None:
                epoch, ends_epoch = EpochRun(parts, state, self.progress, self.cfg.train.epochs), False
                state.partial = {}
                for micro in data_waits(parts.loader.iter_epoch(state.epoch, state.step_in_epoch)):
                    callbacks.on_step_start(state.global_step)
                    bad = train_step(parts, micro, state.global_step, epoch.totals)
                    self._advance(epoch)
                    ends_epoch = state.step_in_epoch >= epoch.steps or state.global_step >= self.max_steps
                    metrics = self._control(
                        epoch, bad, must_read=ends_epoch or parts.checkpointer.due_mid_epoch(state.global_step)
                    )
                    parts.averages.after_step(state.global_step)  # EMA, Lookahead: after the BN sync
                    callbacks.on_step_end(state.global_step - 1, metrics)  # before a checkpoint saves their state
                    parts.checkpointer.maybe_save_mid_epoch(
                        parts, state, epoch.totals, ends_epoch, stopping=self.preempted
                    )
                    self.profile.after_step(state.global_step)
                    if ends_epoch or self.stop_reason is not None:
                        break
                epoch.bar.close()
                if self.preempted and not ends_epoch:
                    break  # stopped mid-epoch: its checkpoint holds the epoch's sums; no row yet
                self._end_epoch(epoch)
        return state

    def _stop_asked_before_start(self) -> bool:
        """A stop asked while the run started up (any rank's vote: one collective, before the
        first step); the loop then stops where it stands, before it trains a step."""
        asked = torch.tensor([float(self.stop.requested())], device=self.parts.device)
        return bool(all_reduce_max(asked).item())

    def _advance(self, epoch: EpochRun) -> None:
        self.state.global_step += 1
        self.state.step_in_epoch += 1
        epoch.steps_run += 1
        epoch.bar.update(epoch.images)

    def _control(self, epoch: EpochRun, bad, must_read: bool) -> dict:
        """The control collective after a step and, when due, the host read: a non-finite step
        raises there; a stop vote of any rank sets the stop reason. Returns the step's metrics."""
        state = self.state
        metrics = {"lr": self.optimizer.param_groups[0]["lr"]}
        reading = self.control.after_step(
            bad,
            state.global_step,
            epoch.totals.loss,
            must_read,
            stop_asked=self.stop.requested,
            where=f" (epoch {epoch.number})",
        )
        if reading is not None:
            state.skipped_steps = reading.skipped
            metrics["train_loss"] = reading.loss_sum * LOSS_UNIT / max(epoch.totals.count, 1)
            epoch.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
            self._log_loss(metrics["train_loss"])
            if reading.stop_votes > 0:
                self.request_stop(StopReason.SIGNAL if self.stop.signalled else StopReason.STOP_FILE)
        return metrics

    def _log_loss(self, loss: float) -> None:
        """At a control read: the running training loss to the trackers, every
        ``run.log_every_steps`` steps (the read is already there: no extra one)."""
        every, step = self.cfg.run.log_every_steps, self.state.global_step
        if every and self.parts.metrics is not None and step // every > self.loss_logged_at // every:
            self.loss_logged_at = step
            self.parts.metrics.log_loss(loss, step)

    def _end_epoch(self, epoch: EpochRun) -> None:
        """The epoch's row, an evaluation when due, the log, then an epoch-end checkpoint when due."""
        parts, state = self.parts, self.state
        row = epoch.row(parts, state, self.throughput)
        complete = state.step_in_epoch >= epoch.steps
        if complete:
            state.epoch, state.step_in_epoch = epoch.number, 0
        if state.global_step >= self.max_steps or state.epoch >= self.cfg.train.epochs:
            if self.stop_reason is None or self.preempted:  # a stop asked at the very end: just finish
                self.stop_reason = StopReason.FINISHED
        last = self.stop_reason is not None and not self.preempted
        result = parts.evaluator.maybe_run(epoch.number, last) if parts.evaluator is not None else None
        if result is not None:
            row.update(test_loss=result["loss"], test_acc=result["acc"])
        state.history.append(row)
        if parts.metrics is not None:
            parts.metrics.log(row)
        print0(epoch_line(row))
        parts.callbacks.on_epoch_end(row)  # may end the run (run.request_stop())
        reason = self.stop_reason
        ending, partial = reason is not None, None
        if reason is not None and not reason.preempts:
            state.ended = reason.value
            if not complete:  # the epoch's sums, for a run extended later (train.max_steps)
                partial = epoch.totals.over_ranks()
        parts.checkpointer.maybe_save_at_epoch_end(parts, state, complete, ending=ending, partial=partial)
        if self.graphs_after_warmup is None:
            self.graphs_after_warmup = graph_count()


def epoch_line(row: dict) -> str:
    parts = [
        f"epoch {row['epoch']}",
        f"step {row['step']}",
        f"train loss {row['train_loss']:.4f}",
        f"train acc {100 * row['train_acc']:.2f}%",
    ]
    if "test_acc" in row:
        parts += [f"test loss {row['test_loss']:.4f}", f"test acc {100 * row['test_acc']:.2f}%"]
    parts += [f"lr {row['lr']:.3g}", f"{row['epoch_time_s']:.1f} s", f"{row['images_per_s']:.0f} img/s"]
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    return " | ".join(parts)
