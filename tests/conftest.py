"""Shared fixtures: the CIFAR-10 JPEG rebuild, subprocess runners, shared reference runs,
free ports, and the suite's time budget.

Two tiers (see the Makefile): `make check` runs the tests not marked ``slow``, in this
process (CIFAR_DIST_TIER=check makes every helper that starts a process refuse);
`make test` runs everything.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CACHE = REPO / ".cache"
BIN = Path(sys.executable).parent
os.environ.setdefault("MPLBACKEND", "Agg")  # before the warm forkserver (tests/warm.py) starts
# Probes of the hardware (bf16 speed, peak FLOP/s) are cached here, not in the user's ~/.cache.
os.environ.setdefault("CIFAR_DIST_CACHE_DIR", str(CACHE / "probes"))
# Variables of an enclosing launcher that must not leak into the runs the tests start.
_LAUNCHER_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS",
    "ACCELERATE_USE_CPU",
    "ACCELERATE_USE_DEEPSPEED",
    "CUDA_VISIBLE_DEVICES",
)


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "inductor"))
    env["PYTHONWARNINGS"] = "ignore"
    env["TQDM_DISABLE"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


# Faults (tests/faults.py) enter a run as a callback, like any user's code.
FAULT_ARG = "run.callbacks=[faults:Inject]"


def fault_env(spec: str, **extra) -> dict:
    """base_env for a run with FAULT_ARG: the fault ``spec`` and tests/ on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return base_env(FAULT_INJECT=spec, PYTHONPATH=path, **extra)


CHECK_TIER = os.environ.get("CIFAR_DIST_TIER") == "check"


def _refuse_in_check_tier(what: str) -> None:
    if CHECK_TIER:
        raise RuntimeError(
            f"the check tier (make check) starts no process, but this test runs {what}: "
            "mark it @pytest.mark.slow or drive the code in this process"
        )


def run(cmd, timeout=600, env=None, check=True, cwd=REPO):
    """Run a command; on failure show its output. It runs in a process group of its own,
    killed whole on a timeout or an interrupt (a launcher's workers are not left behind)."""
    cmd = [str(c) for c in cmd]
    _refuse_in_check_tier(" ".join(cmd[:3]))
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env or base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            kill_group(proc)
            raise
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {res.returncode}\n"
            f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}"
        )
    return res


@pytest.fixture
def spawn():
    """``spawn(cmd, **popen_kwargs)``: a Popen with text pipes, in a process group of its own;
    at the end of the test whatever is left of the group is killed (a launcher's workers too)."""
    procs = []

    def start(cmd, **kw):
        cmd = [str(c) for c in cmd]
        _refuse_in_check_tier(" ".join(cmd[:3]))
        kw.setdefault("cwd", REPO)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        kill_group(proc)


def kill_group(proc) -> None:
    """SIGKILL ``proc``, its process group and every descendant (torchrun starts each
    worker in a Unix session of its own (setsid), out of reach of the group)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()


def cli(*args, timeout=600, env=None, check=True, cwd=REPO):
    """`cifar-dist ARGS` in a process of its own, forked from a warm forkserver (tests/warm.py).
    CIFAR_DIST_TEST_COLD=1 starts every command from scratch instead."""
    _refuse_in_check_tier(f"cifar-dist {args[0] if args else ''}")
    if os.environ.get("CIFAR_DIST_TEST_COLD") == "1":
        return run([BIN / "cifar-dist", *args], timeout=timeout, env=env, check=check, cwd=cwd)
    import tempfile

    argv = [str(a) for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _warm().Process(target=_warm_run, args=(argv, env or base_env(), str(out), str(err), str(cwd)))
        proc.start()
        finished = False
        try:
            proc.join(timeout)
            finished = proc.exitcode is not None
        finally:
            if not finished:  # a timeout, or the test's own time limit interrupted the wait
                proc.kill()
                proc.join()
        if not finished:
            raise subprocess.TimeoutExpired(["cifar-dist", *argv], timeout)
        res = subprocess.CompletedProcess(
            ["cifar-dist", *argv], proc.exitcode, out.read_text(errors="replace"), err.read_text(errors="replace")
        )
    if check and res.returncode != 0:
        raise AssertionError(
            f"cifar-dist {' '.join(argv)} exited {res.returncode}\n"
            f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}"
        )
    return res


def cli_here(*args) -> subprocess.CompletedProcess:
    """`cifar-dist ARGS` in this process, for commands that end before any training (bad
    input, `config`, `summary`): the same ``main``, its exit code, stdout and stderr."""
    import torch

    from cifar_dist.cli.main import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    # `train` sets process-wide torch state before it fails; the next tests must not inherit it
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
    return subprocess.CompletedProcess(["cifar-dist", *argv], code or 0, out.getvalue(), err.getvalue())


_WARM = None


def _warm():
    global _WARM
    if _WARM is None:
        import multiprocessing

        _WARM = multiprocessing.get_context("forkserver")
        # Modules importable from the venv: the forkserver does not see tests/ on its path.
        _WARM.set_forkserver_preload(
            [
                "torch",
                "torch._dynamo",
                "matplotlib.pyplot",
                "accelerate",
                "safetensors.torch",
                "cifar_dist.cli.main",
                "cifar_dist.train",
                "cifar_dist.trainer.trainer",
                "cifar_dist.storage.plots",
            ]
        )
    return _WARM


def _warm_run(*args):
    import warm

    warm.run_cli(*args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, **kw):
    """`torchrun -m cifar_dist.train ARGS` with ``nproc`` processes."""
    return run(
        [BIN / "torchrun", "--nproc_per_node", nproc, "--master_port", free_port(), "-m", "cifar_dist.train", *args],
        **kw,
    )


def accelerate_launch(config_file, nproc, *args, env=None, module=False, **kw):
    """`accelerate launch cifar_dist/train.py ARGS` (``module``: `-m cifar_dist.train`)."""
    entry = ["-m", "cifar_dist.train"] if module else [REPO / "cifar_dist" / "train.py"]
    return run(
        [
            BIN / "accelerate",
            "launch",
            "--config_file",
            REPO / "launch" / config_file,
            "--num_processes",
            nproc,
            "--main_process_port",
            free_port(),
            *entry,
            *args,
        ],
        env=env,
        **kw,
    )


def assert_refused_by_its_ranks(stderr: str, line: str, nproc: int = 2) -> None:
    """A launch whose ranks each refuse with ``cifar-dist: rank R: LINE`` and exit 2. The first
    rank to exit is the launcher's root cause; the launcher stops the others with SIGTERM,
    possibly before they print, so every refusal printed is checked and at least one must be."""
    prefix = "cifar-dist: rank "
    printed = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    assert printed, stderr[-3000:]
    expected = {f"{prefix}{rank}: {line}" for rank in range(nproc)}
    assert set(printed) <= expected and len(set(printed)) == len(printed), printed  # once per rank at most
    cause = re.search(r"exitcode +: 2 .*\n\s*error_file.*\n\s*traceback : (.*)", stderr)
    assert cause and cause.group(1) in printed, stderr[-3000:]


def load_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


SMOKE = REPO / "configs" / "smoke.yaml"
# The reference run of the end-to-end tests: 48 smoke steps on 2,048 synthetic images
# (32 steps per epoch, so it crosses into epoch 2), checkpoints at 12, 24, 32, 36 and 48.
# Multi-process, Slurm, resumed and killed runs all compare their weights with it.
REF_ARGS = [
    "--config",
    SMOKE,
    "data.synthetic_train=2048",
    "train.max_steps=48",
    "checkpoint.every_steps=12",
    "checkpoint.keep=10",
    "run.progress=false",
    "run.plots=false",
]


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The run directory of REF_ARGS with one process, trained once per session."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cli("train", "--out", out, *REF_ARGS)
    return out


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """CIFAR-10 rebuilt from the JPEG copy in ../shared/data (exact labels, lossy pixels),
    built once into .cache/ by `cifar-dist prepare --from-archive`."""
    root = CACHE / "cifar10"
    if (root / "cifar-10-batches-py" / "test_batch").is_file() and (
        root / "cifar-10-batches-py" / "data_batch_5"
    ).is_file():
        return root
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(
            f"CIFAR-10 (JPEG rebuild) not available: {SHARED_ARCHIVE} is missing "
            "(tests that need real images skip without it)"
        )
    from cifar_dist.data.jpeg_archive import unpack_jpeg_archive

    unpack_jpeg_archive(SHARED_ARCHIVE, root)
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 16 MiB (tmpfs; needs root), for the full-disk tests: a run writes
    into it, and tests/faults.py's ``fill`` uses up what is left."""
    if os.geteuid() != 0:
        pytest.skip("a small file system of its own needs root (mount -t tmpfs)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


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


# The time budgets, printed after every run: CI stops a run at 90 minutes and lands nothing,
# so the full suite stays under 30 minutes on a slow 2-core day; the check tier under 3.
BUDGET_S, TIER = (3 * 60, "check tier") if CHECK_TIER else (30 * 60, "full suite")
_STARTED = time.time()


def pytest_terminal_summary(terminalreporter):
    per_test: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) in ("setup", "call", "teardown"):
                per_test[rep.nodeid] = per_test.get(rep.nodeid, 0.0) + rep.duration
    wall = time.time() - _STARTED
    tr = terminalreporter
    tr.section("time budget")
    tr.write_line(
        f"{len(per_test)} tests in {wall / 60:.1f} min wall "
        f"({100 * wall / BUDGET_S:.0f}% of the {BUDGET_S // 60}-minute budget of the {TIER})"
    )
    for nodeid, seconds in sorted(per_test.items(), key=lambda kv: -kv[1])[:10]:
        tr.write_line(f"{seconds:8.1f} s  {nodeid}")
