"""train_step, evaluate and fit: the training loop, the same for every launcher.

``Parts`` holds what the loop needs; it is built once by ``train.py``. No
globals: everything a step depends on is in ``Parts`` or ``TrainState``.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cifar_dist.control import CONTROL_EVERY, Control, NonFiniteError  # noqa: F401 (re-exported)
from cifar_dist.data import eval_batches, normalize
from cifar_dist.distributed import all_reduce_sum, barrier, print0, share_from_main, world_info
from cifar_dist.errors import EnvironmentFault
from cifar_dist.exact import TreeSum, reduce_across_processes, take_grads
from cifar_dist.models import GroupBatchNorm2d
from cifar_dist.optim import lr_at, set_lr, smoothed_cross_entropy

FAULT_VAR = "CIFAR_DIST_TEST_FAULT"  # tests inject faults: KIND@STEP[:RANK] (see parse_fault)
FAULT_KINDS = ("raise", "kill", "killsave", "nan", "overflow", "wait")


def parse_fault(spec: str | None) -> tuple[str, int, int | None] | None:
    """``kill@12:1`` -> ("kill", 12, 1): what the reliability tests inject, and where.

    raise: an exception at step STEP; kill: SIGKILL before step STEP; killsave: SIGKILL
    half-way through writing the checkpoint of step STEP; nan: a NaN loss at step STEP;
    overflow: a finite loss whose gradients overflow (what fp16 loss scaling absorbs);
    wait: hold at step STEP until a stop is requested. A fault fires in the first
    attempt only: a process restarted by torchrun (--max-restarts) runs clean.
    """
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return None
    kind, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if kind not in FAULT_KINDS or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"{FAULT_VAR}={spec!r}: expected {'|'.join(FAULT_KINDS)}@STEP[:RANK]")
    return kind, int(step), int(rank) if rank else None


def graph_count() -> int:
    """Graphs torch.compile has produced in this process (recompiles add to it)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


class Preempted(Exception):
    """A stop was requested (signal or STOP file); a checkpoint has been written."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint's state.json."""

    epoch: int = 0            # the epoch in progress
    step_in_epoch: int = 0    # the next step to run within it
    global_step: int = 0      # optimizer steps done
    skipped_steps: int = 0    # fp16 steps skipped by the loss scaler
    history: list = field(default_factory=list)  # one metrics row per finished epoch
    partial: dict = field(default_factory=dict)  # training-loss sums of an interrupted epoch
    scaler: dict = field(default_factory=dict)   # fp16 loss-scaler state


@dataclass
class Parts:
    cfg: object
    accelerator: object
    model: torch.nn.Module        # the plain module: weights, checkpoints, export
    train_model: torch.nn.Module  # compiled and wrapped (DDP / DeepSpeed) for training
    eval_model: torch.nn.Module   # compiled, not wrapped: evaluation needs no gradient sync
    optimizer: object
    loader: object
    eval_set: object
    shard: object
    run_dir: Path
    checkpoints: object = None    # CheckpointWriter (None: never save)
    metrics: object = None        # MetricsLog on rank 0
    stop_file: Path | None = None
    last_eval: dict | None = None  # the latest evaluate() result
    precision: object = None       # Precision: autocast, backward, scaler
    fault: tuple | None = None     # an injected fault (tests only), see parse_fault
    stop: object = None            # the StopRequest of the running fit()
    graphs_after_warmup: int | None = None  # compiled graphs after the first epoch

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type.value == "DEEPSPEED"


def prepare_model(cfg, accelerator, model, build_optimizer, wrap: bool = True):
    """The one place that orders build -> device -> channels_last -> wrap (DDP) -> compile.

    Returns (plain model, evaluation model, training model, optimizer). The plain
    model shares its parameters with the others, so it always holds the weights.
    The wrapped DDP module is compiled (PyTorch's advice): Dynamo then splits the
    graph at DDP's bucket boundaries and the gradient all-reduce overlaps the
    backward pass. Evaluation gets a compiled module of its own, unwrapped (no
    gradient sync) and with static shapes (eval_batches pads the last batch), so
    switching between training and evaluation never recompiles. DeepSpeed runs its
    own engine around the module, so there the module is compiled inside it.
    ``wrap=False`` leaves the launcher's wrapper out: this process's model alone.
    """
    model = model.to(accelerator.device)
    if cfg.model.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Before prepare(), or DDP warns about gradient strides. DeepSpeed keeps its
    # parameters in flat contiguous buffers (it cannot broadcast channels_last
    # weights), so there only the activations are channels_last (the inputs are).
    if cfg.run.channels_last and not (wrap and accelerator.distributed_type.value == "DEEPSPEED"):
        model = model.to(memory_format=torch.channels_last)
    mode = None if cfg.run.compile_mode == "default" else cfg.run.compile_mode

    def compiled(module):
        return torch.compile(module, mode=mode) if cfg.run.compile else module

    optimizer = build_optimizer(model.parameters(), cfg.train, accelerator.device)
    if not wrap:
        return model, compiled(model), compiled(model), optimizer
    if accelerator.distributed_type.value == "DEEPSPEED":
        inner = compiled(model)
        engine_, optimizer = accelerator.prepare(inner, optimizer)
        return model, inner, engine_, optimizer
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    return model, compiled(model), compiled(wrapped), optimizer


class StopRequest:
    """SIGUSR1 / SIGTERM (Slurm preemption) or a STOP file ask for a checkpoint and exit."""

    def __init__(self, stop_file: Path | None):
        self.stop_file = stop_file
        self.signalled = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self, poll_file: bool = True) -> bool:
        """A signal arrived, or (``poll_file``) the STOP file exists."""
        return self.signalled is not None or bool(poll_file and self.stop_file and self.stop_file.exists())


def train_step(p: Parts, micro_batches, step: int, totals: dict) -> torch.Tensor:
    """One optimizer step over this process's micro-batches; returns the local
    non-finite flag (a 0-dim tensor on the device, no host synchronization)."""
    cfg = p.cfg
    set_lr(p.optimizer, lr_at(step, cfg.train, p.loader.steps_per_epoch))
    if p.fault is not None:
        _inject_fault(p, step)
    if cfg.train.exact_reduce:
        bad = _backward_exact(p, micro_batches, totals)
    else:
        bad = _backward_ddp(p, micro_batches, totals)
    if not p.deepspeed:  # DeepSpeed clips (its config) and keeps the gradients partitioned
        p.precision.unscale(p.optimizer)
        grads = [q.grad for q in p.model.parameters() if q.grad is not None]
        if cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.train.grad_clip)
        else:
            norm = torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros((), device=p.device)
        if cfg.run.precision != "fp16":  # under fp16 the scaler skips such steps instead
            bad = bad + (~torch.isfinite(norm)).float()
    p.precision.step(p.optimizer)
    p.optimizer.zero_grad(set_to_none=True)
    if p.fault is not None and p.fault[0].startswith("active-"):
        p.fault = None
    return bad


def _fault_here(p: Parts, step: int, kinds) -> bool:
    if p.fault is None:
        return False
    kind, at, rank = p.fault
    return kind in kinds and step == at and (rank is None or rank == world_info()[0])


def _inject_fault(p: Parts, step: int) -> None:
    if not _fault_here(p, step, ("raise", "kill", "nan", "overflow", "wait")):
        return
    kind = p.fault[0]
    if kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "wait":  # hold here until a stop is requested: preemption tests signal at a known step
        print(f"cifar-dist test: rank {world_info()[0]}: waiting for a stop request at step {step}", flush=True)
        deadline = time.time() + 900
        while not (p.stop is not None and p.stop.requested()) and time.time() < deadline:
            time.sleep(0.1)
        p.fault = None
        return
    p.fault = ("active-" + kind, step, p.fault[2])  # nan, overflow: this step's loss is altered


def _forward_loss(p: Parts, x, y, totals: dict):
    cfg = p.cfg
    x = p.precision.inputs(normalize(x, cfg.data.mean, cfg.data.std, cfg.run.channels_last))
    with p.precision.autocast():
        logits = p.train_model(x)
    loss = smoothed_cross_entropy(logits, y, cfg.train.label_smoothing, cfg.train.smoothing_form)
    fault = p.fault[0] if p.fault is not None else None
    if fault == "active-nan":
        loss = loss * float("nan")
    with torch.no_grad():
        totals["loss"] += loss.detach().float() * y.numel()
        totals["correct"] += (logits.detach().argmax(1) == y).sum()
        totals["count"] += y.numel()
    nonfinite = (~torch.isfinite(loss.detach())).float()
    if fault == "active-overflow":  # after the loss was counted: only the gradients overflow
        loss = loss * 1e30
    return loss, nonfinite


def _backward_ddp(p: Parts, micro_batches, totals: dict) -> torch.Tensor:
    """Gradients averaged by DDP (or DeepSpeed): fast; equal across process
    counts up to float summation order."""
    acc, accum = p.accelerator, len(micro_batches)
    bad = torch.zeros((), device=p.device)
    for i, (x, y, _idx) in enumerate(micro_batches):
        last = i == accum - 1
        sync = contextlib.nullcontext() if (last or p.deepspeed) else acc.no_sync(p.train_model)
        with sync:
            loss, nonfinite = _forward_loss(p, x, y, totals)
            # DeepSpeed divides by its accumulation steps itself.
            p.precision.backward(loss if p.deepspeed else loss / accum)
        bad = bad + nonfinite
    return bad


def _backward_exact(p: Parts, micro_batches, totals: dict) -> torch.Tensor:
    """Gradients of fixed-size chunks, summed in a fixed tree (see ``exact``)."""
    chunk = p.cfg.model.bn_group
    params = list(p.model.parameters())
    bns = [m for m in p.model.modules() if isinstance(m, GroupBatchNorm2d)]
    tree = TreeSum()
    bad = torch.zeros((), device=p.device)
    with p.accelerator.no_sync(p.train_model):
        for x, y, _idx in micro_batches:
            for s in range(0, len(y), chunk):
                loss, nonfinite = _forward_loss(p, x[s:s + chunk], y[s:s + chunk], totals)
                p.precision.backward(loss)
                # BatchNorm statistics follow the same tree as the gradients
                stats = [m.stat_sum.clone() for m in bns]
                for m in bns:
                    m.stat_sum.zero_()
                tree.add(take_grads(params) + stats)
                bad = bad + nonfinite
    summed = tree.result()
    for m, st in zip(bns, summed[len(params):]):
        m.stat_sum.copy_(st)
    num_chunks = p.shard.global_batch // chunk
    for q, g in zip(params, reduce_across_processes(summed[:len(params)], num_chunks)):
        q.grad = g
    return bad


def evaluate(p: Parts, tta: bool = False) -> dict:
    result = evaluate_model(p.eval_model, p.eval_set, p.cfg, p.device, p.precision.autocast, tta,
                            inputs=p.precision.inputs)
    p.train_model.train()
    return result


@torch.no_grad()
def evaluate_model(model, eval_set, cfg, device, autocast=contextlib.nullcontext, tta: bool = False,
                   inputs=lambda x: x) -> dict:
    """Loss, accuracy and confusion matrix over the whole evaluation set, each
    sample counted exactly once whatever the number of processes."""
    rank, world = world_info()
    k = 10
    model.eval()
    confusion = torch.zeros(k * k, device=device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    batch = min(cfg.data.eval_batch_size, math.ceil(len(eval_set) / world))
    for x, y, valid in eval_batches(eval_set, rank, world, batch, device):
        x = inputs(normalize(x, cfg.data.mean, cfg.data.std, cfg.run.channels_last))
        with autocast():
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        losses = smoothed_cross_entropy(logits, y, cfg.train.label_smoothing,
                                        cfg.train.smoothing_form, reduction="none")
        y, pred = y[:valid], logits[:valid].argmax(1)
        loss_sum += losses[:valid].double().sum()
        confusion += torch.bincount(y * k + pred, minlength=k * k).double()
    stats = all_reduce_sum(torch.cat([confusion, loss_sum.view(1)]))
    confusion = stats[:-1].view(k, k).round().long().cpu()
    total = int(confusion.sum())
    return {"loss": float(stats[-1]) / max(total, 1),
            "acc": float(confusion.diag().sum()) / max(total, 1),
            "count": total,
            "confusion": confusion.tolist(),
            "per_class_acc": (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()}


def save_checkpoint(p: Parts, state: TrainState) -> Path | None:
    """Write a checkpoint of ``state`` atomically; every rank takes part."""
    if p.checkpoints is None:
        return None
    state.scaler = p.precision.state_dict()
    rank, _ = world_info()
    tmp = share_from_main(lambda: p.checkpoints.begin(state.global_step))
    barrier()

    def write():
        try:
            if rank == 0:
                p.checkpoints.write_local(tmp, p.model, p.optimizer, asdict(state))
        except OSError as e:
            p.checkpoints.abort(tmp)
            raise EnvironmentFault(f"{tmp.parent}: cannot write checkpoint of step "
                                   f"{state.global_step}: {e.strerror or e}; the previous "
                                   "checkpoint is intact") from None

    if p.deepspeed:
        p.accelerator.save_state(str(tmp), safe_serialization=True)
        barrier()
        share_from_main(lambda: p.checkpoints.write_state(tmp, asdict(state)))
    else:
        share_from_main(write)
    if _fault_here(p, state.global_step, ("killsave",)):  # a crash half-way through the write
        weights = tmp / "model.safetensors"
        if weights.exists():
            os.truncate(weights, weights.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    final = share_from_main(lambda: p.checkpoints.commit(tmp, state.global_step))
    barrier()
    return final


def _new_totals(device, partial: dict | None) -> dict:
    """Running sums of the epoch's training loss and accuracy (resumed from a checkpoint)."""
    partial = partial or {}
    return {"loss": torch.tensor(partial.get("loss", 0.0), device=device),
            "correct": torch.tensor(int(partial.get("correct", 0)), device=device),
            "count": int(partial.get("count", 0))}


def _reduce_epoch_totals(totals: dict) -> tuple[float, float]:
    t = torch.stack([totals["loss"].double(), totals["correct"].double(),
                     torch.tensor(float(totals["count"]), dtype=torch.float64, device=totals["loss"].device)])
    all_reduce_sum(t)
    count = max(float(t[2]), 1.0)
    return float(t[0]) / count, float(t[1]) / count


def _checkpoint_mid_epoch(p: Parts, state: TrainState, totals: dict) -> None:
    state.partial = {"loss": float(totals["loss"]), "correct": int(totals["correct"]),
                     "count": totals["count"]}
    save_checkpoint(p, state)
    state.partial = {}


def fit(p: Parts, state: TrainState, progress) -> TrainState:
    """Train from ``state`` to the end (epochs or max_steps); evaluate, log, checkpoint."""
    cfg = p.cfg
    spe = p.loader.steps_per_epoch
    max_steps = cfg.train.max_steps or cfg.train.epochs * spe
    every_steps = cfg.checkpoint.every_steps
    control = Control(p.model, p.precision, p.device, state.global_step, cfg.train.exact_reduce)
    polls_stop_file = world_info()[0] == 0
    skipped_before = state.skipped_steps - int(p.precision.skipped_count())
    with StopRequest(p.stop_file) as stop:
        p.stop = stop
        while state.epoch < cfg.train.epochs and state.global_step < max_steps:
            epoch = state.epoch
            p.last_eval = None
            totals = _new_totals(p.device, state.partial)
            state.partial = {}
            stop_votes = 0.0  # ranks asking to stop, as of the latest read
            t0, steps_run = time.perf_counter(), 0
            bar = progress(total=spe, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}")
            for micro in p.loader.iter_epoch(epoch, state.step_in_epoch):
                bad = train_step(p, micro, state.global_step, totals)
                done = state.global_step + 1  # optimizer steps done after this one
                boundary = state.step_in_epoch + 1 >= spe or done >= max_steps
                checkpoint_due = bool(every_steps) and done % every_steps == 0 and not boundary
                # the flags are read before anything is saved: a checkpoint never holds NaN weights
                reading = control.due(done, boundary or checkpoint_due)
                # a stop is looked for only when it will be read: SIGUSR1/SIGTERM on any rank,
                # the STOP file on rank 0 (no file-system call on every rank at every step)
                control.after_step(bad, reading and stop.requested(poll_file=polls_stop_file))
                state.global_step += 1
                state.step_in_epoch += 1
                steps_run += 1
                bar.update(1)
                if reading:
                    try:
                        read = control.read(totals["loss"], f" (epoch {epoch + 1})")
                    except NonFiniteError:
                        bar.close()
                        raise
                    state.skipped_steps = skipped_before + read.skipped
                    stop_votes = read.stop_votes
                    bar.set_postfix(loss=f"{read.loss_sum / max(totals['count'], 1):.3f}")
                    if stop_votes > 0 and not boundary:
                        bar.close()
                        _checkpoint_mid_epoch(p, state, totals)
                        raise Preempted(stop.signalled or "STOP file")
                if checkpoint_due:
                    _checkpoint_mid_epoch(p, state, totals)
                if state.global_step >= max_steps:
                    break
            bar.close()
            train_time = time.perf_counter() - t0
            train_loss, train_acc = _reduce_epoch_totals(totals)
            finished_epoch = state.step_in_epoch >= spe
            last = state.global_step >= max_steps or (finished_epoch and epoch + 1 >= cfg.train.epochs)
            row = {"epoch": epoch + 1, "step": state.global_step, "train_loss": train_loss,
                   "train_acc": train_acc, "lr": lr_at(max(state.global_step - 1, 0), cfg.train, spe),
                   "epoch_time_s": train_time,
                   "images_per_s": steps_run * p.shard.global_batch / max(train_time, 1e-9),
                   "skipped_steps": state.skipped_steps}
            if last or (epoch + 1) % cfg.eval.every_epochs == 0:
                ev = p.last_eval = evaluate(p)
                row.update(test_loss=ev["loss"], test_acc=ev["acc"])
            if finished_epoch:
                state.epoch, state.step_in_epoch = epoch + 1, 0
            state.history.append(row)
            if p.metrics is not None:
                p.metrics.log(row)
            print0(_epoch_line(row))
            every = cfg.checkpoint.every_epochs
            stopping = stop_votes > 0 and not last  # read at this epoch's last step
            if last or stopping or (every and state.epoch % every == 0 and finished_epoch):
                save_checkpoint(p, state)
            if p.graphs_after_warmup is None:
                p.graphs_after_warmup = graph_count()
            if stopping:
                raise Preempted(stop.signalled or "STOP file")
            if last:
                break
    return state


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"step {row['step']}", f"train loss {row['train_loss']:.4f}",
             f"train acc {100 * row['train_acc']:.2f}%"]
    if "test_acc" in row:
        parts += [f"test loss {row['test_loss']:.4f}", f"test acc {100 * row['test_acc']:.2f}%"]
    parts += [f"lr {row['lr']:.3g}", f"{row['epoch_time_s']:.1f} s", f"{row['images_per_s']:.0f} img/s"]
    return " | ".join(parts)
