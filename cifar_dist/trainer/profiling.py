"""torch.profiler over a few optimizer steps, for ``run.profile`` (``RunProfile``) and ``bench --profile``
(``profile_steps``), into ``<out>/profile/<name>/`` (the files: docs/observability.md). The named
ranges (``span``) cost one flag test when nothing records."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

from cifar_dist.distributed.collectives import print0, world_info
from cifar_dist.storage.files import own_folder, write_json_atomic, write_text_atomic

# The ranges of one step, in the order they run; profile_summary.json gives each one's share.
RANGES = ("data", "forward+loss", "backward", "optimizer", "control")
TABLE_ROWS = 30  # rows of ops_rank<r>.txt
MEMORY_ENTRIES = 100_000  # allocation events the CUDA snapshot keeps

_recording = False  # a window of this process records (warm-up included)
_OFF = contextlib.nullcontext()


def span(name: str):
    """A ``record_function`` range named ``name`` while a window records; otherwise a shared no-op."""
    return record_function(name) if _recording else _OFF


def data_waits(batches):
    """``batches``, each wait for the next one inside a "data" range."""
    it, end = iter(batches), object()
    while True:
        with span("data"):
            batch = next(it, end)
        if batch is end:
            return
        yield batch


class Window:
    """One profiler window: ``start`` (or ``with``), ``step`` after each step (the first warms up), ``close``."""

    def __init__(self, out: Path, name: str, steps: int, device: torch.device, first_step: int | None = None):
        self.dir, self.name, self.steps, self.device = Path(out) / "profile" / name, name, steps, device
        self.first_step = first_step  # the first recorded global step (the summary names it)
        self.rank, self.world = world_info()
        self.cuda = device.type == "cuda"
        self.done = 0  # steps taken, the warm-up included
        self.prof: torch.profiler.profile | None = None  # while the window is open

    def start(self) -> None:
        global _recording
        if not self.cuda:  # kineto's lines on a CPU are noise (an ERROR that no GPU was found); the user's level wins
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        schedule = torch.profiler.schedule(wait=0, warmup=1, active=self.steps, repeat=1)
        own_folder(self.dir.parent)
        own_folder(self.dir)
        self.prof = torch.profiler.profile(activities=activities, schedule=schedule)
        self.prof.start()
        _recording = True

    def __enter__(self) -> Window:
        self.start()
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.close(failed=kind is not None)

    def step(self) -> None:
        """After a step; the last recorded one closes the window."""
        assert self.prof is not None
        self.done += 1
        if self.done == 1 and self.cuda:  # the snapshot covers the recorded steps, not the warm-up
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_ENTRIES)
        self.prof.step()
        if self.done > self.steps:
            self.close()

    def close(self, failed: bool = False) -> None:
        """Stop and write what was recorded; a window that ``failed`` writes nothing."""
        global _recording
        if self.prof is None:
            return
        prof, self.prof, _recording = self.prof, None, False
        prof.stop()
        if not failed and self.done > 1:
            self._write(prof, self.done - 1)
        if self.cuda:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _write(self, prof, steps: int) -> None:
        trace = self.dir / f"rank{self.rank}.pt.trace.json.gz"
        trace.unlink(missing_ok=True)  # never written through a link of that name
        prof.export_chrome_trace(str(trace))  # gzipped, as the name ends in .gz
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=TABLE_ROWS)
        write_text_atomic(self.dir / f"ops_rank{self.rank}.txt", table + "\n")
        figures = summarize(prof, steps)
        figures["memory_snapshot"] = f"none: the device is {self.device.type}, the snapshot is CUDA's"
        if self.cuda:
            snapshot = self.dir / f"memory_snapshot_rank{self.rank}.pickle"
            snapshot.unlink(missing_ok=True)  # never written through a link of that name
            torch.cuda.memory._dump_snapshot(str(snapshot))
            figures["memory_snapshot"] = snapshot.name
        every = [figures] * self.world
        if self.world > 1:  # one file to compare the ranks; every rank ends the window at the same step
            dist.all_gather_object(every, figures)
        blind = [str(r) for r, f in enumerate(every) if self.cuda and not f["device_ms"]]
        if blind:  # CUPTI did not start (its messages are above): a trace of host time only
            print0(f"profile {self.name}: rank {', '.join(blind)} recorded no CUDA kernel time (CUPTI did not start)")
        if self.rank == 0:
            ranks = {str(r): f for r, f in enumerate(every)}
            head = {"name": self.name, "first_step": self.first_step, "steps": steps, "device": str(self.device)}
            write_json_atomic(self.dir / "profile_summary.json", {**head, "world_size": self.world, "ranks": ranks})
        if self.first_step is not None:  # a training run's window
            first, last = self.first_step, self.first_step + steps - 1
            print0(f"profile of steps {first}-{last}: {self.dir} (open in ui.perfetto.dev; docs/observability.md)")


def summarize(prof, steps: int) -> dict:
    """One rank's ms per recorded step: the step's and each range's host time, the device's kernel time."""
    per_step = 1e-3 / max(steps, 1)  # µs over the window -> ms per step
    events = prof.events()
    step_ms = sum(e.cpu_time_total for e in events if e.name.startswith("ProfilerStep")) * per_step
    ranges = {}
    for name in RANGES:
        ms = sum(e.cpu_time_total for e in events if e.name == name) * per_step
        ranges[name] = {"ms": ms, "share": ms / step_ms if step_ms else 0.0}
    # kernels and copies: the device's own events, less the ranges' spans on its rows (gpu_user_annotation)
    device = [e for e in events if e.device_type != DeviceType.CPU and e.name not in RANGES]
    kernels_us = sum(e.self_device_time_total for e in device if not e.name.startswith("ProfilerStep"))
    return {"step_ms": step_ms, "ranges": ranges, "device_ms": kernels_us * per_step}


def profile_steps(step_fn, next_batch, out: Path, name: str, steps: int, device: torch.device) -> Path:
    """``step_fn(next_batch())`` once to warm up, then ``steps`` times recorded; returns the folder."""
    with Window(out, name, steps, device) as window:
        for batch in data_waits(next_batch() for _ in range(steps + 1)):
            step_fn(batch)
            window.step()
    return window.dir


class RunProfile:
    """``run.profile``'s window, warmed up at step ``start_step - 1``, around the loop (``after_step``)."""

    def __init__(self, cfg, run_dir: Path | None, device: torch.device, first_step: int, last_step: int):
        self.window: Window | None = None
        self.first_step, self.warmup = first_step, -1  # the global step that warms the profiler up
        if cfg is None or run_dir is None:
            return
        self.warmup, end = cfg.start_step - 1, cfg.start_step + cfg.steps - 1
        if first_step > self.warmup:
            why = f"(warm-up {self.warmup}) are behind this run, which starts at step {first_step}"
        elif last_step <= self.warmup:
            why = f"are past the run's last step {last_step - 1}"
        else:
            self.window = Window(run_dir, "train", cfg.steps, device, cfg.start_step)
            return
        print0(f"run.profile: steps {cfg.start_step}-{end} {why}: not profiled")

    def __enter__(self) -> RunProfile:
        self.after_step(self.first_step)
        return self

    def after_step(self, steps_done: int) -> None:
        if self.window is not None and self.window.prof is not None:
            self.window.step()
        elif self.window is not None and steps_done == self.warmup:
            self.window.start()

    def __exit__(self, kind, error, tb) -> None:
        if self.window is not None:
            self.window.__exit__(kind, error, tb)
