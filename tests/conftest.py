"""Shared fixtures: the real CIFAR-10 copy, subprocess runners, free ports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "build_cifar10.py"
CACHE = REPO / ".cache"
BIN = Path(sys.executable).parent
os.environ.setdefault("MPLBACKEND", "Agg")  # before the warm forkserver (tests/warm.py) starts
# Variables of an enclosing launcher that must not leak into the runs the tests start.
_LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS",
                  "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "CUDA_VISIBLE_DEVICES")


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "inductor"))
    env["PYTHONWARNINGS"] = "ignore"
    env["TQDM_DISABLE"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, timeout=900, env=None, check=True, cwd=REPO):
    """Run a command; on failure show its output."""
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or base_env(), timeout=timeout,
                         capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {res.returncode}\n"
                             f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}")
    return res


def cli(*args, timeout=900, env=None, check=True, cwd=REPO):
    """`cifar-dist ARGS` in a process of its own, forked from a warm forkserver (tests/warm.py).
    CIFAR_DIST_TEST_COLD=1 starts every command from scratch instead."""
    if os.environ.get("CIFAR_DIST_TEST_COLD") == "1":
        return run([BIN / "cifar-dist", *args], timeout=timeout, env=env, check=check, cwd=cwd)
    import tempfile

    argv = [str(a) for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _warm().Process(target=_warm_run, args=(argv, env or base_env(), str(out), str(err), str(cwd)))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["cifar-dist", *argv], timeout)
        res = subprocess.CompletedProcess(["cifar-dist", *argv], proc.exitcode,
                                          out.read_text(errors="replace"), err.read_text(errors="replace"))
    if check and res.returncode != 0:
        raise AssertionError(f"cifar-dist {' '.join(argv)} exited {res.returncode}\n"
                             f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}")
    return res


_WARM = None


def _warm():
    global _WARM
    if _WARM is None:
        import multiprocessing

        _WARM = multiprocessing.get_context("forkserver")
        # Modules importable from the venv: the forkserver does not see tests/ on its path.
        _WARM.set_forkserver_preload(["torch", "torch._dynamo", "matplotlib.pyplot", "accelerate",
                                      "safetensors.torch", "cifar_dist.cli", "cifar_dist.train",
                                      "cifar_dist.engine", "cifar_dist.report"])
    return _WARM


def _warm_run(*args):
    import warm
    warm.run_cli(*args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, **kw):
    return run([BIN / "torchrun", "--nproc_per_node", nproc, "--master_port", free_port(),
                REPO / "cifar_dist" / "train.py", *args], **kw)


def accelerate_launch(config_file, nproc, *args, env=None, **kw):
    return run([BIN / "accelerate", "launch", "--config_file", REPO / "launch" / config_file,
                "--num_processes", nproc, "--main_process_port", free_port(),
                REPO / "cifar_dist" / "train.py", *args], env=env, **kw)


def load_weights(run_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The real CIFAR-10 (this workplace's JPEG-rebuilt copy), built once into .cache/."""
    root = CACHE / "cifar10"
    if (root / "cifar-10-batches-py" / "test_batch").is_file() and \
            (root / "cifar-10-batches-py" / "data_batch_5").is_file():
        return root
    if not SHARED_DATA.is_file():
        pytest.skip(f"real CIFAR-10 not available: {SHARED_DATA} is missing "
                    "(tests that need real images skip outside this workplace)")
    root.mkdir(parents=True, exist_ok=True)
    run([sys.executable, SHARED_DATA, root], timeout=900)
    return root


def rewind(src, dst, step: int) -> Path:
    """A copy of run ``src`` as it was when it stopped after its step-``step``
    checkpoint: later checkpoints and the final outputs are gone. Resuming it must
    give ``src``'s weights; this costs one run instead of a stopped run plus a resume."""
    import shutil

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    kept = dst / "checkpoints" / f"step_{step:08d}"
    assert kept.is_dir(), f"{src} has no checkpoint at step {step}"
    for ckpt in (dst / "checkpoints").iterdir():
        if ckpt.name > kept.name:
            shutil.rmtree(ckpt)
    for name in ("model.safetensors", "summary.json", "confusion_matrix.json"):
        (dst / name).unlink(missing_ok=True)
    return dst
