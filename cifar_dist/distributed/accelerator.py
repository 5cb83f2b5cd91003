"""The Accelerator of a run and the process group beneath it (the launcher's variables: ``launcher``)."""

from __future__ import annotations

import gc
import importlib
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cifar_dist.config.registry import PRECISIONS
from cifar_dist.distributed.launcher import (
    env_rank,
    launcher_world_size,
    local_world_size,
    master_address,
    restart_attempt,
    using_deepspeed,
)
from cifar_dist.errors import ConfigError, UserError

if TYPE_CHECKING:
    from cifar_dist.config.schema import Config


def check_world(num_processes: int) -> None:
    """Refuse the silent trap: N processes that each believe they are rank 0 of 1."""
    launched = launcher_world_size()
    if launched > 1 and num_processes == 1:
        raise UserError(
            f"the launcher started {launched} processes but each one sees a world of 1 "
            "(they would train unsynchronized); on CPU use `accelerate launch --config_file "
            "launch/cpu.yaml`, `torchrun`, or ACCELERATE_USE_CPU=1 with --multi_gpu"
        )


def check_gpu_count(local_processes: int, visible_gpus: int) -> None:
    """Refuse more processes on a node than it has visible GPUs: two ranks would share one, and NCCL fails."""
    if visible_gpus and local_processes > visible_gpus:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(
            f"{local_processes} processes on this node but {visible_gpus} visible GPU(s)"
            f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}; start at most "
            f"{visible_gpus} (accelerate launch --num_processes, torchrun --nproc_per_node)"
        )


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.value == "DEEPSPEED"


def has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def make_accelerator(cfg: Config):
    """The Accelerator for this run: DDP, or DeepSpeed when launched with its config."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # Imported before any process group exists: its functions bind the default group as a default
    # argument, which would keep it alive past destroy_process_group() (release_process_group).
    importlib.import_module("torch.distributed.nn.functional")

    on_cpu = not has_accelerator()
    if cfg.model.sync_bn and on_cpu:
        raise ConfigError(
            "model.sync_bn: SyncBatchNorm only runs on GPUs; on CPU use "
            "model.bn_group for results independent of the process count"
        )
    timeout = timedelta(seconds=cfg.run.collective_timeout_s)
    if torch.cuda.is_available():
        check_gpu_count(local_world_size(), torch.cuda.device_count())
    # Gradients live in DDP's buckets (no copy in and out of them each step). trainer.build switches
    # off the buffer broadcast on the module: Accelerate only knows the deprecated argument.
    handlers = [DistributedDataParallelKwargs(gradient_as_bucket_view=True), InitProcessGroupKwargs(timeout=timeout)]
    # cifar_dist.trainer.precision owns autocast and loss scaling, except under DeepSpeed.
    kwargs: dict[str, Any] = {"mixed_precision": "no", "kwargs_handlers": handlers}
    if using_deepspeed():
        kwargs["mixed_precision"] = PRECISIONS[cfg.run.precision]["accelerate"]
        if on_cpu:
            _skip_shm_comm_build()  # before anything starts DeepSpeed's communication backend
        if on_cpu and launcher_world_size() > 1:
            # DeepSpeed checks the batch size against the world size when built: the group comes first
            from accelerate import PartialState

            PartialState(backend="gloo")
        os.environ.setdefault("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        _skip_transformers_weakref()
    else:
        # Without cpu=True, CPU processes started by torchrun each become rank 0 of 1.
        kwargs["cpu"] = on_cpu
    init_restarted_process_group(timeout)
    accelerator = Accelerator(**kwargs)
    check_world(accelerator.num_processes)
    return accelerator


def release_process_group() -> None:
    """Leave the process group while Python still runs: torn down at the interpreter's shutdown,
    gloo can abort a run that succeeded (docs/distributed.md)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def init_restarted_process_group(timeout: timedelta) -> bool:
    """Form a torchrun restart's process group under a key prefix of its attempt, so no rank reads an
    address a dead rank published in torchrun's one store (docs/distributed.md). Returns whether it did."""
    attempt = restart_attempt()
    if not attempt or launcher_world_size() < 2 or dist.is_initialized():
        return False
    world = launcher_world_size()
    host, port = master_address()
    store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    backend = "nccl" if torch.cuda.is_available() else "xccl" if has_accelerator() else "gloo"
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"cifar_dist/attempt_{attempt}/", store),
        rank=env_rank(),
        world_size=world,
        timeout=timeout,
    )
    return True


def _skip_transformers_weakref() -> None:
    """Accelerate (1.15) registers the DeepSpeed config with transformers, and fails without it;
    that only serves transformers' ZeRO-3 model construction, so skip it when it is absent."""
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        return
    from accelerate.utils import DeepSpeedPlugin

    def set_deepspeed_weakref(self):
        if self.zero3_init_flag:
            raise ConfigError(
                "deepspeed_config.zero3_init_flag: needs Hugging Face transformers; "
                "set it to false in the launch config"
            )

    DeepSpeedPlugin.set_deepspeed_weakref = set_deepspeed_weakref


def _skip_shm_comm_build() -> None:
    """Declare DeepSpeed's shared-memory all-reduce unavailable: on CPU it is JIT-compiled in
    every fresh environment (minutes, docs/distributed.md), and gloo does the same reductions."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def configure_deepspeed(accelerator, shard, cfg: Config) -> None:
    """Give DeepSpeed the batch geometry (our loaders do not go through prepare())."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = shard.micro_batch
    ds["gradient_accumulation_steps"] = shard.accum
    ds["train_batch_size"] = shard.global_batch
    ds["gradient_clipping"] = cfg.train.grad_clip
    # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32), one allocated per micro-step:
    # 10 s a step on a CPU. Our largest model has 11M parameters: 2e7 is one or two buckets.
    zero = ds.setdefault("zero_optimization", {})
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key) in (None, "auto"):
            zero[key] = int(2e7)
    accelerator.gradient_accumulation_steps = shard.accum
