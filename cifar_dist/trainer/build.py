"""The pieces a run is built from, each in one place: the precision and data of this process,
the seeded model, and the order build -> device -> channels_last -> wrap -> compile."""

from __future__ import annotations

import torch

from cifar_dist.config.loading import validate
from cifar_dist.config.schema import Config
from cifar_dist.data import Shard, build_datasets, normalize
from cifar_dist.distributed.accelerator import configure_deepspeed, is_deepspeed
from cifar_dist.distributed.collectives import world_info
from cifar_dist.distributed.launcher import env_rank
from cifar_dist.errors import UserError, say
from cifar_dist.model.optim import build_optimizer, param_groups
from cifar_dist.model.resnet import build_model
from cifar_dist.runtime.hardware import cpu_flags, has_bf16_units, resolve_precision
from cifar_dist.runtime.seeding import seed_everything
from cifar_dist.trainer.precision import gpu_capability


def graph_count() -> int:
    """Graphs torch.compile has produced in this process (recompiles add to it)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def prepare_model(cfg: Config, accelerator, model, wrap: bool = True):
    """The one place that orders build -> device -> channels_last -> wrap (DDP) -> compile; returns
    (plain model, evaluation model, training model, optimizer), all sharing the plain model's parameters.
    DDP is compiled wrapped, DeepSpeed's module inside its engine (docs/distributed.md says why)."""
    deepspeed = wrap and is_deepspeed(accelerator)
    model = model.to(accelerator.device)
    if cfg.model.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Before prepare(), or DDP warns about gradient strides. DeepSpeed cannot broadcast channels_last
    # weights (its flat buffers), so there only the activations (the inputs) are channels_last.
    if cfg.run.channels_last and not deepspeed:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(param_groups(model, cfg.train), cfg.train, accelerator.device)
    if not wrap:
        return model, compile_module(cfg, model), compile_module(cfg, model), optimizer
    if deepspeed:
        inner = compile_module(cfg, model)
        engine, optimizer = accelerator.prepare(inner, optimizer)
        return model, inner, engine, optimizer
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        # the control collective already makes every rank's BatchNorm statistics equal
        # (on PyTorch >= 2.13 this property sets forward_sync_buffers, the current name)
        wrapped.broadcast_buffers = False
    return model, compile_module(cfg, model), compile_module(cfg, wrapped), optimizer


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
    units = capability is None and has_bf16_units(cpu_flags())
    cfg.run.precision, warning = resolve_precision(requested, capability, units)
    if warning and warn and env_rank() == 0:
        say(f"cifar-dist: warning: {warning}")
    if cfg.run.precision != requested:
        validate(cfg, auto_precision=True)


def build_data(cfg: Config, accelerator):
    """This process's share of the global batch and the datasets: (shard, train, eval, eval name)."""
    rank, world = world_info()
    shard = Shard(rank, world, cfg.train.batch_size, cfg.train.accum_steps)
    if cfg.model.bn_group and shard.micro_batch % cfg.model.bn_group:
        raise UserError(
            f"model.bn_group: {cfg.model.bn_group} does not divide the micro-batch of "
            f"{shard.micro_batch} images (train.batch_size {cfg.train.batch_size} / {world} "
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
    """Call a model's ``init_from_data(images)`` (airbench94's whitening) with its first ``init_images``
    training images (all without it), normalized, fp32, NCHW, unaugmented, the same on every process."""
    hook = getattr(model, "init_from_data", None)
    if hook is not None:
        images = train_set.images[: getattr(model, "init_images", len(train_set))]
        hook(normalize(images, cfg.data.mean, cfg.data.std, channels_last=False))


def frozen_parameters(model: torch.nn.Module, epoch: int) -> list[torch.Tensor]:
    """The parameters a model's ``frozen_parameters(epoch)`` freezes in ``epoch`` (from 0); they keep
    ``requires_grad``, so that DDP's gradient buckets stay the same in every epoch."""
    hook = getattr(model, "frozen_parameters", None)
    return list(hook(epoch)) if hook is not None else []
