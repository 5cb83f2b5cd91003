"""Collectives that are no-ops for one process, and the rank-0 helpers built on them."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from cifar_dist.errors import EnvironmentFault, UserError


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over all processes."""
    if world_info()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``t`` over all processes, in place."""
    if world_info()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def print0(line: str) -> None:
    """The run's log: ``line`` on stdout from rank 0, without breaking a progress bar (errors: ``errors.say``)."""
    if world_info()[0] != 0:
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line, flush=True)
        return
    tqdm.write(line)
    sys.stdout.flush()


def share_from_main(fn):
    """Run ``fn`` on rank 0 and give every rank its result; an error there is raised everywhere,
    so no rank is left waiting at the next collective."""
    rank, world = world_info()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (UserError, EnvironmentFault) as e:
            error = e
    if world > 1:
        box = [result, None if error is None else (type(error), str(error))]
        dist.broadcast_object_list(box, src=0)
        result, shared_error = box
        if shared_error is not None and error is None:
            error = shared_error[0](shared_error[1])
    if error is not None:
        raise error
    return result


def barrier() -> None:
    if world_info()[1] > 1:
        dist.barrier()
