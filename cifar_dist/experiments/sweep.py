"""`cifar-dist sweep`: every combination of ``key=v1,v2`` values times every seed as an independent
run directory, trained as by hand; the same command again resumes it (Slurm arrays: docs/sweeps.md).

    cifar-dist sweep --config configs/fast.yaml --seeds 5 train.lr=0.1,0.2 --out runs/lr --parallel 8
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cifar_dist.config.loading import load_config
from cifar_dist.errors import ConfigError, UserError
from cifar_dist.experiments.compare import valid_accuracy
from cifar_dist.storage.files import no_link, own_folder, utf8_path, write_json_atomic, write_text_atomic
from cifar_dist.storage.rundir import lock_holder


def _is_member(m) -> bool:
    overrides = m.get("overrides") if isinstance(m, dict) else None
    return isinstance(overrides, list) and all(isinstance(o, str) for o in overrides) and isinstance(m.get("name"), str)


def read_sweep_file(path: Path) -> dict:
    """sweep.json, checked for its shape (config, members with name and overrides)."""
    again = "remove it to plan the sweep again"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:80]}); {again}") from None
    members = data.get("members") if isinstance(data, dict) else None
    valid = isinstance(members, list) and all(_is_member(m) for m in members)
    if not valid or not isinstance(data.get("config"), (str, type(None))):
        raise UserError(f"{path}: not a sweep file (config, members with name and overrides); {again}")
    return data


def finished_run(run_dir: Path) -> float | None:
    """The test accuracy of a finished run (a summary.json with a valid test_acc), else None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    acc = summary.get("test_acc") if isinstance(summary, dict) else None
    return acc if valid_accuracy(acc) else None


@dataclass
class Member:
    index: int
    name: str
    overrides: list[str]
    state: str = "pending"  # pending | done | failed
    exit_code: int | None = None
    error: str = ""  # the member's last error line
    wall_time_s: float | None = None


def split_values(text: str) -> list[str]:
    """``0.1,0.2`` -> ["0.1", "0.2"]; commas inside brackets belong to the value: ``[1,2],[3,4]``."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def parse_seeds(text: str) -> list[int]:
    """``5`` -> seeds 0..4; ``0,3,7`` -> those seeds."""
    try:
        seeds = [int(v) for v in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds: expected a count (5) or a list (0,1,2), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct seeds >= 0, got {text!r}")
    return seeds


def _label(key: str, keys: list[str]) -> str:
    """The shortest name of ``key`` that no other swept key shares (``train.lr`` -> ``lr``)."""
    short = key.rpartition(".")[2]
    return short if sum(k.rpartition(".")[2] == short for k in keys) == 1 else key


MAX_NAME = 120  # characters of a member's directory name (file systems allow 255 bytes)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+\-]", "_", text.replace("[", "").replace("]", "").replace(" ", ""))


def _hashed(readable: str, exact: list[str]) -> str:
    digest = hashlib.sha1(json.dumps(exact).encode()).hexdigest()[:10]
    return f"{readable[: MAX_NAME - 11]}-{digest}"


def member_names(readable: list[str], exact: list[list[str]]) -> list[str]:
    """Directory names, one per member: the readable form (``lr=0.1-seed=3``), or, where it is too
    long or shared (``a/b`` and ``a_b`` read alike), that form cut short plus a hash."""
    counts = Counter(readable)
    return [r if counts[r] == 1 and len(r) <= MAX_NAME else _hashed(r, e) for r, e in zip(readable, exact)]


def expand(grid: list[str], seeds: list[int]) -> list[Member]:
    """Every combination of the grid's values, times every seed, in a stable order."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"command line: {item!r} is not key=value[,value...]")
        if key.strip() == "run.seed":
            raise ConfigError("command line: run.seed: use --seeds to sweep seeds")
        axes.append((key.strip(), split_values(values)))
    keys = [k for k, _ in axes]
    swept = [k for k, values in axes if len(values) > 1]  # a single value is a plain override: not in names
    members: list[Member] = []
    for combo in itertools.product(*[values for _, values in axes]):
        for seed in seeds:
            settings = [f"{k}={v}" for k, v in zip(keys, combo)] + [f"run.seed={seed}"]
            readable = [f"{_label(k, swept)}={v}" for k, v in zip(keys, combo) if k in swept] + [f"seed={seed}"]
            members.append(Member(len(members), "-".join(_safe(r) for r in readable), settings))
    exact = [m.overrides for m in members]
    if len({json.dumps(e) for e in exact}) != len(exact):
        raise ConfigError("command line: a value is listed twice; each member must differ")
    for m, name in zip(members, member_names([m.name for m in members], exact)):
        m.name = name
    return members


class Sweep:
    """The sweep directory: sweep.json, one run directory per member, logs/, array/ (Slurm)."""

    def __init__(self, path: Path, config: str | None, members: list[Member]):
        self.path, self.config, self.members = Path(path), config, members
        self.file = self.path / "sweep.json"

    def member_dir(self, m: Member) -> Path:
        return self.path / m.name

    def open(self) -> None:
        """Create the directory or check it holds this sweep; refresh states from the members' folders."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a directory; choose another --out")
        if self.file.is_file():
            saved = read_sweep_file(self.file)
            grid = [m["overrides"] for m in saved["members"]]
            if saved["config"] != self.config or grid != [m.overrides for m in self.members]:
                raise UserError(f"{self.file}: holds a different sweep (config or grid); choose another --out")
            for m, old in zip(self.members, saved["members"]):
                m.exit_code, m.wall_time_s = old.get("exit_code"), old.get("wall_time_s")
        utf8_path(self.path.absolute())
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the sweep directory ({e.strerror or e})") from None
        for m in self.members:  # a state is derived from the member's directory, never trusted from the file
            no_link(self.member_dir(m))  # a member trains only in a folder of the sweep's own
            if finished_run(self.member_dir(m)):
                m.state = "done"
            else:  # never finished, or failed: (re)run it
                m.state, m.exit_code, m.wall_time_s = "pending", None, None
        self.save()

    def save(self) -> None:
        write_json_atomic(self.file, {"config": self.config, "members": [asdict(m) for m in self.members]})

    def train_args(self, m: Member) -> list[str]:
        """What `cifar-dist train` is given for ``m``: the run a user would start by hand, resumable."""
        config = ["--config", self.config] if self.config else []
        return [*config, "--out", str(self.member_dir(m)), "--resume", *m.overrides, "run.progress=false"]

    def write_array(self) -> int:
        """array/<index>.args for slurm/sweep.sh: slurm/train.sh's arguments, one per line."""
        folder = own_folder(self.path / "array")
        for m in self.members:
            lines = [self.config or "", *m.overrides, f"run.out_dir={self.member_dir(m).resolve()}"]
            write_text_atomic(folder / f"{m.index}.args", "\n".join(lines) + "\n")
        return len(self.members)


def slots(parallel: int) -> list[dict]:
    """Environment changes for each of ``parallel`` concurrent members: its own GPU, or its share of CPU threads."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        gpus = [g for g in visible.split(",") if g.strip()]
    else:
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if gpus:
        if parallel > len(gpus):
            raise ConfigError(f"--parallel: {parallel} members at once, but {len(gpus)} GPU(s) are visible")
        return [{"CUDA_VISIBLE_DEVICES": gpus[i]} for i in range(parallel)]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    return [{"threads": str(threads)} if parallel > 1 else {} for _ in range(parallel)]


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("cifar-dist:")]
    return (errors or lines or [""])[-1][:300]


def _check_members(config: str | None, members: list[Member]) -> dict[int, str]:
    """{index: error} of members whose config does not load; raised when all fail alike."""
    refused = {}
    for m in members:
        try:
            load_config(config, m.overrides)
        except ConfigError as e:
            refused[m.index] = str(e)
    if len(refused) == len(members) and len(set(refused.values())) == 1:
        raise ConfigError(refused[0])
    return refused


class Signals:
    """Catches SIGTERM, SIGINT and SIGHUP (and ``extra``) while members run, to forward once
    (members run in process groups of their own, so a terminal's Ctrl-C reaches them only so)."""

    def __init__(self, *extra: int) -> None:
        self.received: int | None = None
        self.signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *extra)

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def _handle(self, signum, frame):
        self.received = self.received or signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_members(sweep: Sweep, parallel: int, user_threads: bool) -> tuple[list[Member], int | None]:
    """Train every pending member, ``parallel`` at a time; returns the failed members and the
    signal that stopped the sweep (None if none did)."""
    todo = [m for m in sweep.members if m.state == "pending"]
    logs = own_folder(sweep.path / "logs")
    idle_slots, total = slots(parallel), len(sweep.members)
    running: dict[int, tuple] = {}  # member index -> (process, member, slot, start time, log file)
    todo_text = f"{total - len(todo)} done, {len(todo)} to run, {parallel} at a time"
    print(f"sweep {sweep.path}: {total} members, {todo_text}", flush=True)
    with Signals() as signals:
        forwarded = False
        try:
            while (todo and signals.received is None) or running:
                while todo and idle_slots and signals.received is None:
                    m, slot = todo.pop(0), idle_slots.pop(0)
                    _wait_for_earlier_member(sweep.member_dir(m), m, signals)
                    log = open(no_link(logs / f"{m.name}.log"), "a")
                    running[m.index] = (_start(sweep, m, slot, log, user_threads), m, slot, time.time(), log)
                    print(f"[{m.index + 1}/{total}] {m.name}: started", flush=True)
                if signals.received is not None and not forwarded:
                    forwarded = True
                    sig = signal.SIGTERM if signals.received == signal.SIGHUP else signals.received
                    for proc, *_ in running.values():
                        proc.send_signal(sig)
                    print(
                        f"sweep: {signal.Signals(signals.received).name}: {len(running)} running member(s) "
                        "asked to stop at their next checkpoint; no new member starts",
                        flush=True,
                    )
                time.sleep(0.2)
                for index, (proc, m, slot, started, log) in list(running.items()):
                    if proc.poll() is not None:
                        log.close()
                        del running[index]
                        idle_slots.append(slot)
                        _record(sweep, m, proc.returncode, started, logs, stopped=forwarded, total=total)
        finally:  # an error in the sweep itself: leave no member running
            for proc, *_ in running.values():
                proc.terminate()
            for proc, *_ in running.values():
                proc.wait()
    return [m for m in sweep.members if m.state == "failed"], signals.received


def _start(sweep: Sweep, m: Member, slot: dict, log, user_threads: bool) -> subprocess.Popen:
    """`cifar-dist train` of ``m`` in ``slot`` (a GPU or a share of the threads), in a process group of its own."""
    # a member under a Slurm allocation must never requeue the job: the sweep owns it
    env = dict(os.environ, CIFAR_DIST_REQUEUE="0", **{k: v for k, v in slot.items() if k != "threads"})
    threads = [f"run.threads={slot['threads']}"] if "threads" in slot and not user_threads else []
    cmd = [sys.executable, "-m", "cifar_dist.train", *sweep.train_args(m), *threads]
    arm = stop_with_parent(os.getpid())
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=arm)


def stop_with_parent(sweep_pid: int):
    """A member's preexec: SIGTERM when the sweep dies, even by SIGKILL (Linux's parent-death
    signal), so no member trains on as an orphan."""

    def arm() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the sweep's own handlers are all there is
            return
        if os.getppid() != sweep_pid:  # the sweep died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


MEMBER_WAIT_S = 30 * 60  # the longest a re-run waits for a member of a dead sweep to let go


def _wait_for_earlier_member(run_dir: Path, m: Member, signals) -> None:
    """Wait, rather than fail, while a killed earlier sweep's member still holds the directory."""
    holder = lock_holder(run_dir)
    if holder is None:
        return
    print(f"{m.name}: {run_dir} is still held by pid {holder} (an earlier sweep's member); waiting", flush=True)
    deadline = time.time() + MEMBER_WAIT_S
    while lock_holder(run_dir) is not None and time.time() < deadline and signals.received is None:
        time.sleep(0.5)


def _record(sweep: Sweep, m: Member, code: int, started: float, logs: Path, stopped: bool, total: int) -> None:
    """Record a member's exit as done, stopped by the sweep's signal (pending again) or failed."""
    m.exit_code, m.wall_time_s = code, round(time.time() - started, 1)
    acc = finished_run(sweep.member_dir(m))
    if code == 0 and acc is not None:
        m.state, m.error = "done", ""
        outcome = f"done, test accuracy {100 * acc:.2f}%"
    elif stopped and code not in (1, 2):  # stopped by the signal (with a checkpoint, or before training)
        m.state, m.error = "pending", ""
        outcome = "stopped with a checkpoint; a re-run of the sweep resumes it"
    else:
        m.state, m.error = "failed", _last_error(logs / f"{m.name}.log")
        outcome = f"FAILED (exit {code}): {m.error}"
    sweep.save()
    print(f"[{m.index + 1}/{total}] {m.name}: {outcome} ({m.wall_time_s:.0f} s)", flush=True)


def add_sweep_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="YAML recipe every member starts from")
    ap.add_argument("--seeds", default="1", help="a count (5: seeds 0..4) or a list (0,1,2); default 1 (seed 0)")
    ap.add_argument("--out", help="sweep directory (default runs/sweep-<config>-<time>)")
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="K",
        help="members at once: one GPU each, or a share of the CPU threads each (default 1)",
    )
    ap.add_argument(
        "--plan-only",
        action="store_true",
        help="write sweep.json and the Slurm array files, train nothing (then: sbatch slurm/sweep.sh)",
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="key=v1,v2",
        help="the grid: every combination of the listed values (a single value: a plain override)",
    )


def run_sweep(args) -> int:
    if args.parallel < 1:
        raise ConfigError(f"--parallel: must be >= 1, got {args.parallel}")
    members = expand(args.overrides, parse_seeds(args.seeds))
    refused = _check_members(args.config, members)
    config = str(Path(args.config).resolve()) if args.config else None
    name = Path(args.config).stem if args.config else "default"
    sweep = Sweep(Path(args.out or f"runs/sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}"), config, members)
    sweep.open()
    for m in members:
        if m.index in refused:  # what `cifar-dist train` would have said, without starting it
            m.state, m.exit_code, m.error = "failed", 2, f"cifar-dist: {refused[m.index]}"
    sweep.save()
    if args.plan_only:
        n = sweep.write_array()
        print(
            f"planned {n} members in {sweep.file}; submit them as a Slurm job array:\n"
            f"  sbatch --array=0-{n - 1} slurm/sweep.sh {sweep.path}\n"
            f"  (--array=0-{n - 1}%K runs at most K at once; then: cifar-dist compare {sweep.path})"
        )
        return 0
    user_threads = any(o.startswith("run.threads=") for o in args.overrides) or load_config(args.config).run.threads > 0
    failed, stopped_by = run_members(sweep, args.parallel, user_threads)
    done = sum(m.state == "done" for m in sweep.members)
    if stopped_by is not None:
        print(
            f"sweep {sweep.path}: stopped by {signal.Signals(stopped_by).name}: {done} of {len(sweep.members)} "
            "members done; run the same command again to resume the others",
            flush=True,
        )
        return 128 + stopped_by
    print(
        f"sweep {sweep.path}: {done} of {len(sweep.members)} members done, {len(failed)} failed"
        + ("" if failed else f"; compare them: cifar-dist compare {sweep.path}")
    )
    for m in failed:
        print(f"  failed: {m.name} (exit {m.exit_code}): {m.error}")
    return 1 if failed else 0
