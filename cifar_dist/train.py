"""Train a CIFAR-10 classifier; the same entry point under every launcher.

    cifar-dist train --config configs/seed.yaml                      # one process (CPU or one GPU)
    python -m cifar_dist.train --config configs/seed.yaml            # the same
    accelerate launch --config_file launch/multi_gpu.yaml --num_processes 8 \
        -m cifar_dist.train --config configs/seed.yaml               # 8 GPUs
    accelerate launch --config_file launch/cpu.yaml --num_processes 2 -m cifar_dist.train --config configs/smoke.yaml
    torchrun --nproc_per_node 4 -m cifar_dist.train --config configs/fast.yaml
    sbatch --nodes 2 slurm/train.sh configs/fast.yaml

(``python cifar_dist/train.py`` and ``accelerate launch cifar_dist/train.py`` work
too, with the package installed or on PYTHONPATH.)

``train.batch_size`` is the global batch: N processes each take 1/N of it.
With ``run.seed`` and ``model.bn_group`` set, any number of processes computes
the same run (up to float summation order); ``--resume`` continues it exactly.
"""
from __future__ import annotations

import argparse

from cifar_dist.config.overrides import parse_with_overrides
from cifar_dist.errors import guarded
from cifar_dist.trainer.run import run


def add_train_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="YAML recipe (configs/seed.yaml is the paper's; without one, the built-in "
                                     "defaults, which `cifar-dist config` prints; with --resume, the run's saved "
                                     "config.yaml)")
    ap.add_argument("--out", help="run directory (overrides run.out_dir)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its newest intact checkpoint, with its saved config "
                         "(a fresh start if it has none yet)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.01")


def main(argv=None) -> int:
    from cifar_dist.runtime.malloc import tune_malloc

    tune_malloc()
    ap = argparse.ArgumentParser(prog="python -m cifar_dist.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(ap)
    return guarded(run, parse_with_overrides(ap, argv))
