"""The launcher's view of the world (torchrun, Accelerate, Slurm, MPI), from its environment
variables: the one place that reads them. Nothing here imports torch, so bad input is refused
before the heavy imports."""

from __future__ import annotations

import os
import sys


def _env_int(names: tuple[str, ...], default: int) -> int:
    """The first of ``names`` set to a whole number, else ``default``."""
    for var in names:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return default


def launcher_world_size() -> int:
    """How many processes the launcher started (1 if none)."""
    return _env_int(("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), 1)


def env_rank() -> int:
    """This process's rank as the launcher set it (0 if none), usable before any set-up."""
    return _env_int(("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"), 0)


def local_rank() -> int:
    """This process's rank on its node: which of the node's GPUs it uses."""
    return _env_int(("LOCAL_RANK",), 0)


def local_world_size() -> int:
    return _env_int(("LOCAL_WORLD_SIZE",), 1)


def restart_attempt() -> int:
    """Which attempt of a torchrun job this is when torchrun keeps one store for all (else 0)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return 0
    return _env_int(("TORCHELASTIC_RESTART_COUNT",), 0)


def master_address() -> tuple[str, int]:
    """The rendezvous host and port the launcher set (MASTER_ADDR, MASTER_PORT)."""
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def using_deepspeed() -> bool:
    """Whether Accelerate was launched with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def rank_prefix() -> str:
    """'rank N: ' when several processes run, '' for one: how a one-line error or warning starts."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"rank {dist.get_rank()}: "
    return f"rank {env_rank()}: " if launcher_world_size() > 1 else ""
