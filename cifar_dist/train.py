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
import sys
from pathlib import Path

from cifar_dist.config.loading import load_config, validate
from cifar_dist.config.numbers import OneLineParser
from cifar_dist.config.overrides import parse_with_overrides
from cifar_dist.distributed.launcher import env_rank, rank_prefix, using_deepspeed
from cifar_dist.errors import RunDirError, guarded, say
from cifar_dist.runtime.malloc import tune_malloc
from cifar_dist.storage.trackers import check_trackers
from cifar_dist.trainer.callbacks import load_callbacks


def add_train_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--config",
        help="YAML recipe (configs/seed.yaml is the paper's; without one, the built-in "
        "defaults, which `cifar-dist config` prints; with --resume, the run's saved "
        "config.yaml)",
    )
    ap.add_argument("--out", help="run directory (overrides run.out_dir)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest intact checkpoint, with its saved config "
        "(a fresh start if it has none yet)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.01")


def run_dirs_of(name: str, root: Path = Path("runs")) -> list[Path]:
    """Run directories under ``root`` that a recipe called ``name`` made by default, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{name}-*") if (p / "config.yaml").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_config(args: argparse.Namespace):
    """The config of this run: ``--config`` and the overrides; with ``--resume`` and no
    ``--config``, the run directory's saved config.yaml and the overrides. ``--resume`` needs
    to know the run directory (``--out`` or ``run.out_dir``)."""
    cfg = load_config(args.config, args.overrides)
    if args.out:
        cfg.run.out_dir = args.out
    if not args.resume:
        return cfg
    if not cfg.run.out_dir:
        candidates = run_dirs_of(cfg.name)[:3]
        listed = (
            f"runs of {cfg.name!r}, newest first: {', '.join(map(str, candidates))}"
            if candidates
            else f"no run of {cfg.name!r} under runs/"
        )
        raise RunDirError(f"--resume: name the run to continue with --out DIR ({listed})")
    saved = Path(cfg.run.out_dir) / "config.yaml"
    if args.config is None and saved.is_file():
        cfg = load_config(saved, args.overrides)
        cfg.run.out_dir = args.out or cfg.run.out_dir
    elif args.config is None:
        what = "holds no config.yaml" if Path(cfg.run.out_dir).is_dir() else "does not exist"
        raise RunDirError(f"--resume: {cfg.run.out_dir} {what}: no run to continue (give --config to start one there)")
    return cfg


def run(args: argparse.Namespace) -> int:
    """Check the input, then train (``trainer.run.train``); returns the exit code.

    Everything a user can get wrong is refused before the training stack (torch, Accelerate)
    is imported, which is why that import comes late: a bad config is one line at once."""
    cfg = resolve_config(args)
    if using_deepspeed():  # every rank refuses at once, before any set-up
        validate(cfg, deepspeed=True)
    if args.config is None and not args.resume and env_rank() == 0:
        say(
            "cifar-dist: no --config: training the built-in defaults: the paper's model and optimizer for 60 "
            "epochs, without its colour jitter and rotation (`cifar-dist config` prints them; configs/seed.yaml "
            "is the paper's recipe, configs/cpu_quick.yaml a CPU demo)"
        )
    check_trackers(cfg.run.trackers)  # a tracker not installed: one line, before anything is written
    user_callbacks = load_callbacks(cfg.run.callbacks)  # a bad name fails here, before anything is written
    from cifar_dist.trainer.run import train  # the training stack: heavy, so only for valid input

    return train(cfg, args.resume, args.overwrite, user_callbacks)


def main(argv=None) -> int:
    tune_malloc()
    ap = OneLineParser(
        prog="python -m cifar_dist.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(ap)
    return guarded(run, parse_with_overrides(ap, argv), rank_prefix)


if __name__ == "__main__":
    sys.exit(main())
