"""Building a run: what the loop needs, built once, in one order, the one way every run is built.

``build_parts`` seeds, builds the model, prepares it for the launcher
(``prepare_model``), and adds the loader, the evaluator, the checkpointer,
the precision policy, the weight averages and the callbacks. ``Parts`` holds no run-time state:
where training stands is ``storage.state.TrainState``; the loop's own state is
``trainer.loop.Trainer``'s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cifar_dist.config.schema import Config
from cifar_dist.data import Loader, Shard, build_datasets, build_train_loader, normalize
from cifar_dist.distributed.accelerator import configure_deepspeed, is_deepspeed
from cifar_dist.distributed.collectives import world_info
from cifar_dist.distributed.launcher import env_rank
from cifar_dist.errors import ConfigError, UserError, say
from cifar_dist.model.optim import build_optimizer, param_groups
from cifar_dist.model.resnet import build_model
from cifar_dist.runtime.seeding import seed_everything
from cifar_dist.storage.checkpoint import CheckpointWriter, load_optimizer_state, load_weights, read_state
from cifar_dist.storage.metrics import MetricsLog
from cifar_dist.trainer.averaging import WeightAverages
from cifar_dist.trainer.callbacks import Callbacks
from cifar_dist.trainer.checkpointer import Checkpointer
from cifar_dist.trainer.evaluation import Evaluator
from cifar_dist.trainer.precision import CpuBf16, Precision, gpu_capability, resolve_precision
from cifar_dist.trainer.step import frozen_parameters

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Parts:
    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module  # the plain module: weights, checkpoints, export
    train_model: torch.nn.Module  # compiled and wrapped (DDP / DeepSpeed) for training
    eval_model: torch.nn.Module  # compiled, not wrapped: evaluation needs no gradient sync
    optimizer: torch.optim.Optimizer
    loader: Loader  # data.TorchLoader | GpuLoader | FfcvLoader, or the benchmark's batch
    shard: Shard  # this process's share of the global batch
    precision: Precision  # autocast, backward, loss scaler
    deepspeed: bool  # DeepSpeed's engine runs the model (and owns precision, clipping)
    run_dir: Path | None  # None: a run that writes nothing (the benchmark)
    evaluator: Evaluator | None = None
    checkpointer: Checkpointer = field(default_factory=lambda: Checkpointer(None))  # None: never saves
    callbacks: Callbacks = field(default_factory=Callbacks)
    averages: WeightAverages = field(default_factory=WeightAverages)  # EMA, Lookahead (train.ema, .lookahead)
    metrics: MetricsLog | None = None  # rank 0 only
    stop_file: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def evaluated(self) -> torch.nn.Module:
        """The module whose weights are evaluated and exported: the EMA's with eval.use_ema."""
        return self.averages.ema.module if self.cfg.eval.use_ema and self.averages.ema else self.model


def graph_count() -> int:
    """Graphs torch.compile has produced in this process (recompiles add to it)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def prepare_model(cfg: Config, accelerator, model, build_optimizer, wrap: bool = True):
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
    deepspeed = wrap and is_deepspeed(accelerator)
    model = model.to(accelerator.device)
    if cfg.model.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Before prepare(), or DDP warns about gradient strides. DeepSpeed keeps its
    # parameters in flat contiguous buffers (it cannot broadcast channels_last
    # weights), so there only the activations are channels_last (the inputs are).
    if cfg.run.channels_last and not deepspeed:
        model = model.to(memory_format=torch.channels_last)

    def compiled(module):
        return compile_module(cfg, module)

    optimizer = build_optimizer(param_groups(model, cfg.train), cfg.train, accelerator.device)
    if not wrap:
        return model, compiled(model), compiled(model), optimizer
    if deepspeed:
        inner = compiled(model)
        engine, optimizer = accelerator.prepare(inner, optimizer)
        return model, inner, engine, optimizer
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        # No broadcast of buffers before each forward: the BatchNorm statistics are reduced
        # by the control collective, so every rank's running statistics are already equal.
        # (On PyTorch >= 2.13 this property sets forward_sync_buffers, the current name.)
        wrapped.broadcast_buffers = False
    return model, compiled(model), compiled(wrapped), optimizer


def compile_module(cfg: Config, module):
    """``module`` compiled as run.compile and run.compile_mode say (itself when not compiling)."""
    mode = None if cfg.run.compile_mode == "default" else cfg.run.compile_mode
    return torch.compile(module, mode=mode) if cfg.run.compile else module


def resolve_run_precision(cfg: Config, warn: bool = True) -> None:
    """Replace ``run.precision: auto`` by what this process's device runs best (config.yaml
    then records it); warn once about bf16 on a device that runs it slowly (a GPU without
    bf16 tensor cores, a CPU without bf16 units)."""

    requested = cfg.run.precision
    capability = gpu_capability()
    cpu = CpuBf16.of_this_cpu(cfg.run.channels_last) if capability is None else None
    cfg.run.precision, warning = resolve_precision(requested, capability, cpu)
    if warning and warn and env_rank() == 0:
        say(f"cifar-dist: warning: {warning}")
    if cfg.run.precision == "fp16" and cfg.train.exact_reduce:
        raise ConfigError(
            f"train.exact_reduce: not with run.precision=fp16 (loss scaling; run.precision="
            f"{requested} chose fp16 on this GPU); set run.precision=fp32 or bf16"
        )


def build_data(cfg: Config, accelerator):
    """This process's share of the global batch and the datasets: (shard, train, eval, eval name)."""

    rank, world = world_info()
    shard = Shard(rank, world, cfg.train.batch_size, cfg.train.accum_steps)
    if cfg.model.bn_group and shard.micro % cfg.model.bn_group:
        raise UserError(
            f"model.bn_group: {cfg.model.bn_group} does not divide the micro-batch of "
            f"{shard.micro} images (train.batch_size {cfg.train.batch_size} / {world} "
            f"processes / train.accum_steps {cfg.train.accum_steps})"
        )
    if is_deepspeed(accelerator):
        configure_deepspeed(accelerator, shard, cfg)
    train_set, eval_set, eval_name = build_datasets(cfg)
    return shard, train_set, eval_set, eval_name


def build_model_seeded(cfg: Config) -> torch.nn.Module:
    """The run's model with its seeded initial weights (every process builds the same)."""

    seed_everything(cfg.run.seed)
    return build_model(cfg.model)


def init_from_data(cfg: Config, model: torch.nn.Module, train_set) -> None:
    """A model whose initial weights depend on the training data says so with an
    ``init_from_data(images)`` method (airbench94's whitening layer): it is given the first
    ``model.init_images`` training images (all without that attribute) as the model sees them
    (normalized, fp32, NCHW, unaugmented), the same on every process. A resumed run then loads
    the checkpoint's weights over them."""
    hook = getattr(model, "init_from_data", None)
    if hook is not None:
        images = train_set.images[: getattr(model, "init_images", len(train_set))]
        hook(normalize(images, cfg.data.mean, cfg.data.std, channels_last=False))


def build_parts(
    cfg: Config,
    accelerator,
    shard,
    train_set,
    eval_set,
    run_dir: Path | None,
    model=None,
    callbacks: Callbacks | None = None,
    *,
    loader: Loader | None = None,
    wrap: bool = True,
) -> Parts:
    """Everything the loop needs, the one way every run is built (training, the benchmark, the
    GPU check). ``model``: from ``build_model_seeded`` (built here if None). ``loader``: batches
    to use instead of a loader of ``train_set`` (the benchmark's device-resident batch).
    ``eval_set`` None: no evaluator. ``run_dir`` None: nothing is saved. ``wrap=False``: this
    process's model alone, without the launcher's DDP or DeepSpeed wrapper."""
    model = build_model_seeded(cfg) if model is None else model
    if train_set is not None:
        init_from_data(cfg, model, train_set)
    # the EMA's module: a copy taken before prepare_model moves, wraps or hooks the model
    ema_module = copy.deepcopy(model) if cfg.train.ema is not None else None
    if wrap and is_deepspeed(accelerator) and frozen_parameters(model, 2**31):
        raise ConfigError(
            f"model.name: {cfg.model.name} stops training some parameters after a few epochs, which DeepSpeed's "
            "engine cannot do; train it without DeepSpeed"
        )
    model, eval_model, train_model, optimizer = prepare_model(cfg, accelerator, model, build_optimizer, wrap=wrap)
    loader = loader or build_train_loader(cfg, train_set, shard, accelerator.device)
    deepspeed = wrap and is_deepspeed(accelerator)
    precision = Precision(cfg.run.precision, accelerator.device, accelerator if deepspeed else None)
    averages = WeightAverages.build(cfg, model, ema_module, loader.steps_per_epoch)
    if cfg.eval.use_ema and averages.ema is not None:
        eval_model = compile_module(cfg, averages.ema.module)
    evaluator = (
        Evaluator(cfg, eval_model, eval_set, accelerator.device, precision, train_model)
        if eval_set is not None
        else None
    )
    writer = CheckpointWriter(run_dir, cfg.checkpoint.keep) if run_dir is not None else None
    return Parts(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        train_model=train_model,
        eval_model=eval_model,
        optimizer=optimizer,
        loader=loader,
        shard=shard,
        precision=precision,
        deepspeed=deepspeed,
        run_dir=run_dir,
        evaluator=evaluator,
        checkpointer=Checkpointer(writer, cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs),
        callbacks=callbacks or Callbacks(),
        averages=averages,
        stop_file=run_dir / "STOP" if run_dir is not None else None,
    )


def restore(parts: Parts, ckpt: Path):
    """Load checkpoint ``ckpt`` into ``parts``; returns the TrainState it holds."""

    state = read_state(ckpt)
    if parts.deepspeed:
        parts.accelerator.load_state(str(ckpt))
    else:
        load_weights(ckpt / "model.safetensors", parts.model)
        parts.optimizer.load_state_dict(load_optimizer_state(ckpt / "optimizer.pt"))
    parts.precision.load_state_dict(state.scaler)
    parts.averages.load(ckpt)
    parts.callbacks.load_state(ckpt)
    return state
