"""Train a CIFAR-10 classifier; the same entry point under every launcher.

    cifar-dist train --config configs/seed.yaml                      # one process (CPU or one GPU)
    python -m cifar_dist.train --config configs/seed.yaml            # the same
    accelerate launch --config_file launch/multi_gpu.yaml --num_processes 8 \
        -m cifar_dist.train --config configs/seed.yaml               # 8 GPUs
    accelerate launch --config_file launch/cpu.yaml --num_processes 2 -m cifar_dist.train --config configs/smoke.yaml
    torchrun --nproc_per_node 4 -m cifar_dist.train --config configs/fast.yaml
    sbatch --nodes 2 slurm/train.sh configs/fast.yaml

``train.batch_size`` is the global batch: N processes each take 1/N of it.
With ``run.seed`` and ``model.bn_group`` set, any number of processes computes
the same run (up to float summation order); ``--resume`` continues it exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
from dataclasses import dataclass
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
    found = [p for p in root.glob(f"{name}-*") if (p / "config.yaml").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_config(args: argparse.Namespace):
    """``--config`` and the overrides; with ``--resume`` and no ``--config``, the saved config.yaml
    of the run directory (``--out`` or ``run.out_dir``) and the overrides."""
    cfg = load_config(args.config, args.overrides)
    if args.out:
        cfg.run.out_dir = args.out
    if not args.resume:
        return cfg
    if not cfg.run.out_dir:
        listed = f"no run of {cfg.name!r} under runs/"
        if candidates := run_dirs_of(cfg.name)[:3]:
            listed = f"runs of {cfg.name!r}, newest first: {', '.join(map(str, candidates))}"
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
    """Check the input, then train (``trainer.run.train``); returns the exit code. The training
    stack is imported late, so that a bad config is reported at once."""
    cfg = resolve_config(args)
    if args.config is None and not args.resume and env_rank() == 0:
        say(
            "cifar-dist: no --config: training the built-in defaults: the paper's model and optimizer for 60 "
            "epochs, without its colour jitter and rotation (`cifar-dist config` prints them; configs/seed.yaml "
            "is the paper's recipe, configs/cpu_quick.yaml a CPU demo)"
        )
    return _train(cfg, args.resume, args.overwrite)


def _train(cfg, resume: bool, overwrite: bool, callbacks=()) -> int:
    """What is left to check (DeepSpeed's rules on every rank, the trackers, the callbacks: before
    anything is written), then the training stack: heavy, so imported for valid input only."""
    if using_deepspeed():
        validate(cfg, deepspeed=True)
    check_trackers(cfg.run.trackers)
    user_callbacks = load_callbacks(cfg.run.callbacks).plus(callbacks)
    from cifar_dist.trainer.run import train as train_run

    return train_run(cfg, resume, overwrite, user_callbacks)


@dataclass
class RunResult:
    """What ``train`` returns: the run directory, its summary.json (None when the run was
    stopped before its end) and the exit code the command would have given."""

    run_dir: Path
    summary: dict | None
    code: int


def train(
    config: str | Path | None = None,
    overrides=(),
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks=(),
) -> RunResult:
    """Train as `cifar-dist train --config CONFIG --out OUT OVERRIDES...` does, in this process,
    with the same bits; ``callbacks``: Callback objects run after those of ``run.callbacks``. Bad
    input raises ``cifar_dist.errors.UserError``. Process-wide state is restored after each run
    (docs/api.md)."""
    cfg = load_config(config, list(overrides))
    if out is not None:
        cfg.run.out_dir = str(out)
    if not cfg.run.out_dir:
        raise RunDirError("out: cifar_dist.train needs the run directory (out=... or run.out_dir)")
    with _process_state_kept():
        code = _train(cfg, resume, overwrite, callbacks)
    run_dir = Path(cfg.run.out_dir)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if code == 0 and summary_file.is_file() else None
    return RunResult(run_dir, summary, code)


@contextlib.contextmanager
def _process_state_kept():
    """Process-wide state a run changes, restored after it (a notebook's next cell sees none)."""
    import random

    import numpy as np
    import torch
    import torch._dynamo
    from accelerate.state import AcceleratorState, GradientState, PartialState

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
            torch.backends.cudnn.benchmark = benchmark
            random.setstate(py_state)
            np.random.set_state(np_state)
            # the next run builds its own Accelerator and compiles from scratch, as a fresh process would
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            PartialState._reset_state()
            torch._dynamo.reset()


def main(argv=None) -> int:
    tune_malloc()
    ap = OneLineParser(
        prog="python -m cifar_dist.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(ap)
    return guarded(run, parse_with_overrides(ap, argv), rank_prefix)


class _CallableModule(types.ModuleType):
    """``cifar_dist.train(...)`` is ``train(...)``: the package names this module, which every launcher runs."""

    def __call__(self, *args, **kwargs) -> RunResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
