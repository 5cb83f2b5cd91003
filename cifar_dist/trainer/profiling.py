"""torch.profiler over a few optimizer steps: the named ranges of a step, the window, its files.

A window warms the profiler up over one step, then records ``steps`` steps. Each rank writes
its own trace, ops table and (CUDA) memory snapshot into the window's folder; rank 0 writes
``profile_summary.json`` with every rank's figures:

    rank<r>.pt.trace.json.gz       the trace (Perfetto, chrome://tracing, TensorBoard's profiler)
    ops_rank<r>.txt                ops by self time (device time on CUDA), top 30
    memory_snapshot_rank<r>.pickle CUDA only: allocations over the recorded steps (memory_viz)
    profile_summary.json           per rank: the share of each range, data wait, top ops,
                                   collectives, copies and host syncs counted

The ranges (``span``) cost one flag test when no window records: no profiler call, no
allocation, and never a read of a device value (the step's host syncs stay what they are).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, record_function

from cifar_dist.distributed.collectives import print0, world_info
from cifar_dist.storage.files import create_new, own_folder, write_json_atomic, write_text_atomic

# The ranges of one step, in the order they run; profile_summary.json gives each one's share.
RANGES = ("data", "forward+loss", "backward", "optimizer", "control")
TABLE_ROWS = 30  # rows of ops_rank<r>.txt
TOP = 10  # ops (and kernels) in the summary
MEMORY_ENTRIES = 100_000  # allocation events the CUDA snapshot keeps
# Ops that are collectives, and events that are copies or host waits (matched in lower case).
COLLECTIVE_WORDS = ("allreduce", "all_reduce", "broadcast", "gloo", "nccl")
SYNC_NAMES = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::item",
    "aten::_local_scalar_dense",
)

# KINETO_LOG_LEVEL above every level kineto prints (its USDT lines, the highest, are 5); read
# once, when the process first profiles.
KINETO_SILENT = "6"

_recording = False  # a window of this process records (warm-up included)
_OFF = contextlib.nullcontext()


def span(name: str):
    """A ``record_function`` range named ``name`` while a window records; otherwise one shared
    no-op context."""
    return record_function(name) if _recording else _OFF


def data_waits(batches):
    """``batches``, each wait for the next one inside a "data" range while a window records."""
    it, end = iter(batches), object()
    while True:
        with span("data"):
            batch = next(it, end)
        if batch is end:
            return
        yield batch


class Window:
    """One window of this process: ``start``, then ``step`` after each step (the first is the
    warm-up), then ``close``. ``name`` is the folder under ``<out>/profile/``."""

    def __init__(self, out: Path, name: str, steps: int, device: torch.device, first_step: int | None = None):
        self.dir, self.name, self.steps, self.device = Path(out) / "profile" / name, name, steps, device
        self.first_step = first_step  # the first recorded global step (the summary names it)
        self.rank, self.world = world_info()
        self.cuda = device.type == "cuda"
        self.done, self.written = 0, False
        self.prof: torch.profiler.profile | None = None  # while the window is open

    def start(self) -> None:
        global _recording
        if not self.cuda:  # kineto's lines on a CPU are noise (an ERROR that it found no GPU); the user's level wins
            os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_SILENT)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=self.steps, repeat=1),
            on_trace_ready=self._write,
        )
        own_folder(self.dir.parent)
        own_folder(self.dir)
        prof.start()
        self.prof = prof
        _recording = True

    def step(self) -> bool:
        """After a step; returns True once the recorded steps are written."""
        assert self.prof is not None
        self.done += 1
        if self.done == 1 and self.cuda:  # the snapshot covers the recorded steps, not the warm-up
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_ENTRIES)
        self.prof.step()  # after the last recorded step this writes the files (``_write``)
        if self.written:
            self.close()
        return self.written

    def close(self, failed: bool = False) -> None:
        """Stop; a window that ends early writes what it recorded, one that ``failed`` nothing."""
        global _recording
        if self.prof is None:
            return
        prof, self.prof, _recording = self.prof, None, False
        if failed:
            self.written = True  # nothing to write: the run is ending on an error
        prof.stop()  # calls ``_write`` when recorded steps are pending
        if self.cuda:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _write(self, prof) -> None:
        if self.written:
            return
        self.written = True
        recorded = max(self.done - 1, 0)
        rank = self.rank
        trace = self.dir / f"rank{rank}.pt.trace.json"
        trace.unlink(missing_ok=True)  # never written through a link of that name
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, create_new(f"{trace}.gz") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=TABLE_ROWS)
        write_text_atomic(self.dir / f"ops_rank{rank}.txt", table + "\n")
        figures = summarize(prof, recorded)
        if self.cuda:
            snapshot = self.dir / f"memory_snapshot_rank{rank}.pickle"
            snapshot.unlink(missing_ok=True)  # never written through a link of that name
            torch.cuda.memory._dump_snapshot(str(snapshot))
            figures["memory_snapshot"] = snapshot.name
        else:
            figures["memory_snapshot"] = f"none: the device is {self.device.type}, the snapshot is CUDA's"
        every = [figures] * self.world
        if self.world > 1:  # every rank reaches the end of the window at the same step
            dist.all_gather_object(every, figures)
        blind = [str(r) for r, f in enumerate(every) if self.cuda and not f["top_ops_by_self_device"]]
        if blind:  # CUPTI did not start (its messages are above): a trace of host time only
            print0(
                f"profile {self.name}: rank {', '.join(blind)} recorded no CUDA kernel time (the profiler's "
                "CUPTI did not start; see its messages above): the device columns are empty"
            )
        if rank == 0:
            write_json_atomic(
                self.dir / "profile_summary.json",
                {
                    "name": self.name,
                    "first_step": self.first_step,
                    "steps": recorded,
                    "device": str(self.device),
                    "world_size": self.world,
                    "ranks": {str(r): f for r, f in enumerate(every)},
                },
            )


def summarize(prof, steps: int) -> dict:
    """One rank's figures over the recorded steps. Times are host (CPU) time in milliseconds;
    on CUDA the ops also carry their device time."""
    events = prof.events()
    cpu = torch.autograd.DeviceType.CPU
    host = [e for e in events if e.device_type == cpu]
    total_us = sum(e.cpu_time_total for e in host if e.name.startswith("ProfilerStep"))
    ms = 1e-3

    def share(us: float) -> float:
        return us / total_us if total_us else 0.0

    ranges = {}
    for name in RANGES:
        us = sum(e.cpu_time_total for e in host if e.name == name)
        ranges[name] = {"ms": us * ms, "share": share(us)}
    ops = [a for a in prof.key_averages() if not a.key.startswith("ProfilerStep") and a.key not in RANGES]

    def row(a) -> dict:
        return {
            "name": a.key,
            "calls": a.count,
            "self_cpu_ms": a.self_cpu_time_total * ms,
            "self_device_ms": a.self_device_time_total * ms,
        }

    by_host = sorted(ops, key=lambda a: -a.self_cpu_time_total)[:TOP]
    by_device = sorted((a for a in ops if a.self_device_time_total > 0), key=lambda a: -a.self_device_time_total)
    collective = [e for e in events if _is_collective(e.name)]
    # the outermost collective op of each call: nccl:all_reduce inside c10d::allreduce_ counts once
    outer = [e for e in collective if e.device_type == cpu and not _inside_collective(e)]
    outer_us = sum(e.cpu_time_total for e in outer)
    device_us = sum(e.self_device_time_total for e in collective if e.device_type != cpu)
    counts: dict[str, int] = {}
    for e in events:
        counts[e.name] = counts.get(e.name, 0) + 1
    # the transfers themselves, on the device's streams (not the host's cudaMemcpyAsync calls)
    memcpy = sum(1 for e in events if e.device_type != cpu and "memcpy" in e.name.lower())
    syncs = {name: counts.get(name, 0) for name in SYNC_NAMES}
    return {
        "steps": steps,
        "profiled_ms": total_us * ms,
        "step_ms": total_us * ms / steps if steps else 0.0,
        "ranges": ranges,
        "data_wait_ms_per_step": ranges["data"]["ms"] / steps if steps else 0.0,
        "data_wait_share": ranges["data"]["share"],
        "top_ops_by_self_cpu": [row(a) for a in by_host],
        "top_ops_by_self_device": [row(a) for a in by_device[:TOP]],
        "collectives": {
            "ops": sorted({e.name for e in outer}),
            "calls": len(outer),
            "ms": outer_us * ms,
            "share": share(outer_us),
            "device_ms": device_us * ms,
        },
        "copies": {"aten::copy_": counts.get("aten::copy_", 0), "memcpy": memcpy},
        "syncs": {**syncs, "total": sum(syncs.values())},
    }


def _is_collective(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in COLLECTIVE_WORDS)


def _inside_collective(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_collective(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def profile_steps(step_fn, next_batch, out: Path, name: str, steps: int, device: torch.device) -> Path:
    """``step_fn(next_batch())`` once to warm the profiler up, then ``steps`` times recorded, into
    ``<out>/profile/<name>/`` (the benchmark's rows); returns that folder."""
    window = Window(out, name, steps, device)
    window.start()
    try:
        for _ in range(steps + 1):
            with span("data"):
                batch = next_batch()
            step_fn(batch)
            window.step()
    except BaseException:
        window.close(failed=True)
        raise
    window.close()
    return window.dir


class RunProfile:
    """``run.profile`` in a training run: a window whose warm-up is global step
    ``start_step - 1``, recording ``steps`` steps into ``<run dir>/profile/train/``. A run that
    starts past the warm-up step (a resumed one) does not profile. The loop runs inside
    ``with`` (which closes a window the run ended in) and calls ``after_step`` after each step."""

    def __init__(self, cfg, run_dir: Path | None, device: torch.device, first_step: int, last_step: int):
        self.window: Window | None = None
        self.first_step = first_step
        self.warmup = -1  # the global step that warms the profiler up; -1: none
        if cfg is None or run_dir is None:
            return
        self.warmup, end = cfg.start_step - 1, cfg.start_step + cfg.steps - 1
        where = f"run.profile: steps {cfg.start_step}-{end}"
        if first_step > self.warmup:
            print0(
                f"{where} (warm-up {self.warmup}) are behind this run, which starts at step {first_step}: not profiled"
            )
        elif last_step <= self.warmup:
            print0(f"{where} are past the run's last step {last_step - 1}: not profiled")
        else:
            self.window = Window(run_dir, "train", cfg.steps, device, cfg.start_step)

    def __enter__(self) -> RunProfile:
        self.after_step(self.first_step)
        return self

    def after_step(self, steps_done: int) -> None:
        """``steps_done`` optimizer steps are done: the global step of the next one."""
        window = self.window
        if window is None:
            return
        if window.prof is None:
            if steps_done == self.warmup:
                window.start()
        elif window.step():
            self._written()

    def __exit__(self, kind, error, tb) -> None:
        window = self.window
        if window is not None and window.prof is not None:
            window.close(failed=kind is not None)
            if kind is None and window.written:
                self._written()

    def _written(self) -> None:
        window, self.window = self.window, None
        assert window is not None and window.first_step is not None
        print0(
            f"profile of steps {window.first_step}-{window.first_step + window.done - 2}: {window.dir} "
            "(rank<r>.pt.trace.json.gz: open in ui.perfetto.dev; see docs/observability.md)"
        )
