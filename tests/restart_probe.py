"""Run by test_reliability under `torchrun --max-restarts 1`: attempt 0 forms the process
group through cifar_dist's own set-up and rank 1 dies; in attempt 1 rank 1 arrives late, so
rank 0 looks up its peer first. With keys left over from attempt 0 in torchrun's store, rank 0
would read the dead rank's address and fail to connect (see init_restarted_process_group)."""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cifar_dist.config.loading import load_config
from cifar_dist.distributed.accelerator import make_accelerator
from cifar_dist.distributed.collectives import all_reduce_sum, world_info

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank = int(os.environ["RANK"])
if attempt > 0 and rank == 1:
    time.sleep(3)
t0 = time.time()
make_accelerator(load_config(Path(__file__).parent.parent / "configs" / "smoke.yaml", []))
total = all_reduce_sum(torch.ones(()))
print(f"attempt {attempt} rank {world_info()[0]}: group of {int(total)} formed in {time.time() - t0:.1f} s", flush=True)
if attempt == 0 and rank == 1:
    os._exit(1)
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # as train.py ends: no gloo thread outlives the group
