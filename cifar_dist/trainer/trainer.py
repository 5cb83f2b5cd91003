"""The Trainer: builds and owns a run's components and trains them, one step at a time. Training,
the benchmark and the GPU check all build a run this way (docs/code-map.md walks through ``fit``)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cifar_dist.config.schema import Config
from cifar_dist.data import Loader, Shard, build_train_loader, normalize
from cifar_dist.distributed.accelerator import is_deepspeed
from cifar_dist.distributed.collectives import all_reduce_max, all_reduce_sum, print0
from cifar_dist.distributed.exact import TreeSum, reduce_across_processes, take_grads, tree_all_reduce
from cifar_dist.errors import ConfigError, say
from cifar_dist.model.batchnorm import GroupBatchNorm2d, sync_bn_statistics
from cifar_dist.model.loss import smoothed_cross_entropy
from cifar_dist.model.optim import lr_at, schedule_steps, set_lr
from cifar_dist.storage.metrics import MetricsLog
from cifar_dist.storage.state import LOSS_UNIT, TrainState
from cifar_dist.trainer.averaging import WeightAverages
from cifar_dist.trainer.build import (
    build_model_seeded,
    compile_module,
    frozen_parameters,
    graph_count,
    init_from_data,
    prepare_model,
)
from cifar_dist.trainer.callbacks import Callbacks
from cifar_dist.trainer.checkpointer import Checkpointer, DeepSpeedWeights, Weights
from cifar_dist.trainer.control import Control
from cifar_dist.trainer.epoch import EpochRun, EpochTotals, epoch_line, measure_throughput
from cifar_dist.trainer.evaluation import Evaluator
from cifar_dist.trainer.precision import Precision
from cifar_dist.trainer.profiling import RunProfile, data_waits, span
from cifar_dist.trainer.progress import progress_bars
from cifar_dist.trainer.stopping import StopReason, StopRequest

if TYPE_CHECKING:
    from accelerate import Accelerator


class Trainer:
    """A run's components and the loop that trains them; what callbacks receive as ``run``. Only the
    trainer changes ``state``. Step k is the k-th optimizer step; ``state.global_step``: steps done."""

    # the run
    cfg: Config
    accelerator: Accelerator
    shard: Shard  # this process's share of the global batch
    run_dir: Path | None  # None: a run that writes nothing (the benchmark)
    # the model and its update
    model: torch.nn.Module  # the plain module: its parameters are the weights
    train_model: torch.nn.Module  # compiled, wrapped by DDP or DeepSpeed
    optimizer: torch.optim.Optimizer
    precision: Precision  # autocast, backward, loss scaler
    deepspeed: bool  # DeepSpeed's engine runs the model (and owns precision, clipping)
    # data and evaluation
    loader: Loader
    evaluator: Evaluator | None  # None: no evaluation set
    # around each step
    control: Control
    averages: WeightAverages  # train.ema, train.lookahead
    callbacks: Callbacks
    checkpointer: Checkpointer
    stop: StopRequest
    metrics: MetricsLog | None  # rank 0 of a run with a directory, once fit starts
    # where training stands
    state: TrainState
    ended: StopReason | None  # why the state it started from had ended, if it had
    stop_reason: StopReason | None

    def __init__(
        self,
        cfg: Config,
        accelerator,
        shard: Shard,
        train_set,
        eval_set=None,
        run_dir: Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        callbacks: Callbacks | None = None,
        loader: Loader | None = None,
        wrap: bool = True,
        stop: StopRequest | None = None,
        progress=None,
    ):
        """``model``: from ``build_model_seeded`` (built here if None). ``loader``: the benchmark's batches.
        ``wrap=False``: this process's model alone, without DDP or DeepSpeed and with no collective."""
        self.cfg, self.accelerator, self.shard, self.run_dir = cfg, accelerator, shard, run_dir
        self.rank, self.world = shard.rank, shard.world
        model = build_model_seeded(cfg) if model is None else model
        if train_set is not None:
            init_from_data(cfg, model, train_set)
        ema_module = copy.deepcopy(model) if cfg.train.ema is not None else None  # before it is wrapped
        self.deepspeed = wrap and is_deepspeed(accelerator)
        if self.deepspeed and frozen_parameters(model, 2**31):  # a fact of the model: known once it is built
            raise ConfigError(
                f"model.name: {cfg.model.name} stops training some parameters after a few epochs, which "
                "DeepSpeed's engine cannot do; train it without DeepSpeed"
            )
        self.model, eval_model, self.train_model, self.optimizer = prepare_model(cfg, accelerator, model, wrap=wrap)
        self.loader = loader or build_train_loader(cfg, train_set, shard, self.device)
        self.precision = Precision(cfg.run.precision, self.device, accelerator if self.deepspeed else None)
        self.averages = WeightAverages.build(cfg, self.model, ema_module, self.loader.steps_per_epoch)
        if cfg.eval.use_ema and self.averages.ema is not None:
            eval_model = compile_module(cfg, self.averages.ema.module)
        self.evaluator = None
        if eval_set is not None:
            self.evaluator = Evaluator(cfg, eval_model, eval_set, self.device, self.precision, self.train_model)
        self.callbacks = callbacks or Callbacks()
        weights = DeepSpeedWeights(accelerator) if self.deepspeed else Weights(self.model, self.optimizer)
        # what a checkpoint holds besides state.json: a new stateful component is one more entry
        components = {"weights": weights, "averages": self.averages, "callbacks": self.callbacks}
        staged = lambda folder, step: self.callbacks.call("on_checkpoint_staged", folder, step)  # noqa: E731
        self.checkpointer = Checkpointer(run_dir, cfg.checkpoint, components, on_staged=staged)
        self.stop = stop or StopRequest(say=say if self.rank == 0 else None)
        self.stop.stop_file = run_dir / "STOP" if run_dir is not None and self.rank == 0 else None
        self.progress = progress or progress_bars(False)
        # None: this process alone (the benchmark's reference); exact_reduce sums in a fixed tree
        self.reduce = None if not wrap else tree_all_reduce if cfg.train.exact_reduce else all_reduce_sum
        self.max_steps = cfg.train.max_steps or schedule_steps(cfg.train, self.loader.steps_per_epoch)
        self.metrics = None
        self.graphs_after_warmup: int | None = None  # compiled graphs after the first epoch
        self.start_from(TrainState())

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def evaluated(self) -> torch.nn.Module:
        """The module whose weights are evaluated and exported: the EMA's with eval.use_ema."""
        return self.averages.ema.module if self.cfg.eval.use_ema and self.averages.ema else self.model

    def start_from(self, state: TrainState) -> None:
        """Train on from ``state``: a fresh run's, or a checkpoint's (``restore``)."""
        self.state = state
        self.control = Control(self.precision, self.device, state.global_step, state.skipped_steps)
        if self._finished():  # a longer train.max_steps lets a finished run go on
            self.ended = StopReason.FINISHED
        elif state.ended and state.ended != StopReason.FINISHED.value:
            self.ended = StopReason(state.ended)
        else:
            self.ended, state.ended = None, ""
            # an epoch that ended early and goes on loses its row (the checkpoint kept its sums)
            if state.step_in_epoch and state.history and state.history[-1]["epoch"] == state.epoch + 1:
                state.history.pop()
        self.stop_reason = self.ended  # a run that has ended trains no further step

    def restore(self, ckpt: Path) -> TrainState:
        """Load checkpoint ``ckpt`` into every component and train on from its state."""
        state = self.checkpointer.load(ckpt)
        self.precision.load_state_dict(state.scaler)
        self.start_from(state)
        return state

    def _finished(self) -> bool:
        return self.state.global_step >= self.max_steps or self.state.epoch >= self.cfg.train.epochs

    @property
    def preempted(self) -> bool:
        """Stopping to be resumed later (a signal, the STOP file)."""
        return self.stop_reason is not None and self.stop_reason.preempts

    def request_stop(self, reason: StopReason = StopReason.REQUESTED) -> None:
        """End the run after the current step, as if it were the last (same on every rank). Every
        stop goes through here; the end of training wins over a preemption asked at its last step."""
        if self.stop_reason is None or (reason is StopReason.FINISHED and self.preempted):
            self.stop_reason = reason

    def _asked_from_outside(self) -> StopReason:
        return StopReason.SIGNAL if self.stop.signalled else StopReason.STOP_FILE

    # the loop

    def fit(self) -> TrainState:
        """Train until a ``StopReason`` (``request_stop``); returns the state where training stands."""
        state = self.state
        self._open_metrics()
        self.throughput = measure_throughput(self.cfg, self.device)
        profile = RunProfile(self.cfg.run.profile, self.run_dir, self.device, state.global_step, self.max_steps)
        with self.stop, profile:
            self.stop.phase = "train"
            self.callbacks.call("on_train_start", self)
            if self.stop_reason is None and self._stop_asked_before_start():
                self.request_stop(self._asked_from_outside())
            while self.stop_reason is None:
                steps = self.loader.steps_per_epoch
                epoch = EpochRun(state, steps, self.shard, self.device, self.progress, self.cfg.train.epochs)
                state.partial = {}
                for batch in data_waits(self.loader.iter_epoch(state.epoch, state.step_in_epoch)):
                    step = state.global_step + 1
                    self.callbacks.call("on_step_start", step)
                    nonfinite = self.train_step(batch, step, epoch.totals)
                    epoch.advance(state)
                    ends_epoch = state.step_in_epoch >= epoch.steps or step >= self.max_steps
                    metrics = self._after_step(step, nonfinite, epoch, ends_epoch)
                    self.callbacks.call("on_step_end", step, metrics)  # before a checkpoint saves their state
                    # at an epoch's last step, the epoch-end checkpoint is the one
                    if not ends_epoch and (self.preempted or self.checkpointer.due(step)):
                        self.checkpointer.save(self._record(partial=epoch.totals.over_ranks()))
                    profile.after_step(step)
                    if ends_epoch or self.stop_reason is not None:
                        break
                epoch.bar.close()
                if self.preempted and not ends_epoch:
                    break  # stopped mid-epoch: its checkpoint holds the epoch's sums; no row yet
                self._end_epoch(epoch)
        return state

    def _open_metrics(self) -> None:
        if self.metrics is None and self.run_dir is not None and self.rank == 0:
            self.metrics = MetricsLog.start(self.run_dir, self.cfg, self.state.global_step, self.state.history)

    def _stop_asked_before_start(self) -> bool:
        """Any rank's stop asked while the run started up (one collective, before the first step)."""
        asked = torch.tensor([float(self.stop.requested())], device=self.device)
        return bool(all_reduce_max(asked).item())

    def _after_step(self, step: int, nonfinite: torch.Tensor, epoch: EpochRun, ends_epoch: bool) -> dict:
        """The BatchNorm sync with the control flags, the host read when due, the averages; the metrics."""
        metrics = {"lr": self.optimizer.param_groups[0]["lr"]}
        read = Control.due(step, must=ends_epoch or self.checkpointer.due(step))
        vote = read and self.stop.requested()
        reading = self._sync(nonfinite, vote, epoch.totals, read, where=f" (epoch {epoch.number})")
        if reading is not None:
            self.state.skipped_steps = reading.skipped
            metrics["train_loss"] = reading.loss_sum * LOSS_UNIT / max(epoch.totals.count, 1)
            epoch.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}")
            if self.metrics is not None:
                self.metrics.log_loss(metrics["train_loss"], step)
            if reading.stop_votes > 0:
                self.request_stop(self._asked_from_outside())
        self.averages.after_step(step)  # EMA, Lookahead: of the weights with synced statistics
        return metrics

    def steady_step(self, batch, step: int, totals: EpochTotals) -> bool:
        """Step ``step`` as ``fit`` runs it mid-epoch (the benchmark's); returns whether the host read."""
        nonfinite = self.train_step(batch, step, totals)
        read = Control.due(step)
        self._sync(nonfinite, False, totals, read)
        self.averages.after_step(step)
        return read

    def _sync(self, nonfinite, stop_vote: bool, totals: EpochTotals, read: bool, where: str = ""):
        """The step's one collective (BatchNorm statistics and control flags), then the host read if ``read``."""
        with span("control"):
            summed = sync_bn_statistics(self.model, self.reduce, extra=self.control.flags(nonfinite, stop_vote))
            return self.control.record(summed, totals.loss, read, where)

    def _end_epoch(self, epoch: EpochRun) -> None:
        state = self.state
        row = epoch.row(state, self.cfg.train, self.throughput)
        complete = state.step_in_epoch >= epoch.steps
        if complete:
            state.epoch, state.step_in_epoch = epoch.number, 0
        if self._finished():
            self.request_stop(StopReason.FINISHED)
        last = self.stop_reason is not None and not self.preempted
        result = self.evaluator.maybe_run(epoch.number, last) if self.evaluator is not None else None
        if result is not None:
            row.update(test_loss=result["loss"], test_acc=result["acc"])
        state.history.append(row)
        if self.metrics is not None:
            self.metrics.log(row)
        print0(epoch_line(row))
        self.callbacks.call("on_epoch_end", row)  # may end the run (run.request_stop())
        reason, partial = self.stop_reason, None
        if reason is not None and not reason.preempts:
            state.ended = reason.value
            if not complete:  # the epoch's sums, for a run extended later (train.max_steps)
                partial = epoch.totals.over_ranks()
        if reason is not None or self.checkpointer.due_after_epoch(state.epoch, complete):
            self.checkpointer.save(self._record(partial))
        if self.graphs_after_warmup is None:
            self.graphs_after_warmup = graph_count()

    def _record(self, partial: dict | None = None) -> dict:
        """state.json: the state, an interrupted epoch's sums over all ranks, the loss scaler, the world size."""
        return {
            **dataclasses.asdict(self.state),
            "partial": partial or {},
            "scaler": self.precision.state_dict(),
            "world_size": self.world,
        }

    # one optimizer step

    def train_step(self, batch, step: int, totals: EpochTotals) -> torch.Tensor:
        """Optimizer step ``step``; returns its non-finite flag, a 0-dim device tensor (no host read)."""
        cfg = self.cfg
        set_lr(self.optimizer, lr_at(step - 1, cfg.train, self.loader.steps_per_epoch))
        backward = self._backward_exact if cfg.train.exact_reduce else self._backward_ddp
        nonfinite = backward(batch, step, totals)
        for p in frozen_parameters(self.model, (step - 1) // self.loader.steps_per_epoch):
            p.grad = None  # the optimizer skips a parameter without a gradient: no momentum, no decay
        with span("optimizer"):
            if not self.deepspeed:  # DeepSpeed clips (its config) and keeps the gradients partitioned
                self.precision.unscale(self.optimizer)
                grads = [q.grad for q in self.model.parameters() if q.grad is not None]
                if cfg.train.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
                elif grads:
                    norm = torch.stack(torch._foreach_norm(grads)).norm()
                else:
                    norm = torch.zeros((), device=self.device)
                if cfg.run.precision != "fp16":  # under fp16 the scaler skips such steps instead
                    nonfinite = nonfinite + (~torch.isfinite(norm)).float()
            self.precision.step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        return nonfinite

    def _forward_loss(self, x, y, step: int, totals: EpochTotals):
        cfg = self.cfg
        with span("forward+loss"):
            x = self.precision.inputs(normalize(x, cfg.data.mean, cfg.data.std, cfg.run.channels_last))
            with self.precision.autocast():
                logits = self.train_model(x)
            loss = smoothed_cross_entropy(logits, y, cfg.train.label_smoothing, cfg.train.smoothing_form)
            loss = self.callbacks.on_loss(loss, step)
            totals.add(loss, logits, y)
        return loss, (~torch.isfinite(loss.detach())).float()

    def _no_sync(self):
        """DDP's ``no_sync()``, not Accelerate's, which does nothing for one process although
        `accelerate launch --num_processes 1` wraps in DDP (whose reduce overwrote the exact path's chunks)."""
        if self.deepspeed:
            return contextlib.nullcontext()  # DeepSpeed keeps its own accumulation
        return getattr(self.train_model, "no_sync", contextlib.nullcontext)()

    def _backward_ddp(self, batch, step: int, totals: EpochTotals) -> torch.Tensor:
        """Gradients averaged by DDP (or DeepSpeed): fast; equal across process counts up to summation order."""
        accum = len(batch)
        nonfinite = torch.zeros((), device=self.device)
        for i, (x, y, _idx) in enumerate(batch):
            with contextlib.nullcontext() if i == accum - 1 else self._no_sync():
                loss, flag = self._forward_loss(x, y, step, totals)
                with span("backward"):  # DDP's gradient all-reduce runs inside it
                    # DeepSpeed divides by its accumulation steps itself
                    self.precision.backward(loss if self.deepspeed else loss / accum)
            nonfinite = nonfinite + flag
        return nonfinite

    def _backward_exact(self, batch, step: int, totals: EpochTotals) -> torch.Tensor:
        """Gradients of fixed-size chunks, summed in a fixed tree (``distributed.exact``)."""
        chunk = self.cfg.model.bn_group
        params = [p for p in self.model.parameters() if p.requires_grad]  # a frozen one gets no gradient
        bns = [m for m in self.model.modules() if isinstance(m, GroupBatchNorm2d)]
        tree = TreeSum()
        nonfinite = torch.zeros((), device=self.device)
        with self._no_sync():
            for x, y, _idx in batch:
                for s in range(0, len(y), chunk):
                    loss, flag = self._forward_loss(x[s : s + chunk], y[s : s + chunk], step, totals)
                    with span("backward"):
                        self.precision.backward(loss)
                    # BatchNorm statistics follow the same tree as the gradients
                    stats = [m.stat_sum.clone() for m in bns]
                    for m in bns:
                        m.stat_sum.zero_()
                    tree.add(take_grads(params) + stats)
                    nonfinite = nonfinite + flag
        summed = tree.result()
        for m, st in zip(bns, summed[len(params) :]):
            m.stat_sum.copy_(st)
        with span("backward"):  # the gradients' all-reduce, which DDP runs inside the backward
            reduced = reduce_across_processes(summed[: len(params)], self.shard.global_batch // chunk)
        for q, g in zip(params, reduced):
            q.grad = g
        return nonfinite
