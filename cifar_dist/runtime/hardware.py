"""What the hardware can do: peak FLOP/s for MFU (a table of vendors' dense peaks, else
measured and cached per machine), whether a CPU has bf16 units, and a process's peak memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# name fragment -> {precision: dense peak TFLOP/s}, looked up in order: a longer name comes
# before any name it contains (H100 NVL before H100, L40S before L4, A10G before A10).
PEAK_TFLOPS = {
    "H200 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
}
_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def table_peak(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s from the table, or None when the device or precision is not listed."""
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in device_name and precision in peaks:
            return peaks[precision] * 1e12
    return None


PEAK_PROBE_S = 1.0  # the most a measured peak may cost, per precision, in seconds


def _matmul_seconds(n: int, dtype, device: torch.device, repeats: int, budget_s: float) -> float:
    """The best time of an n x n product, over at most ``repeats`` (after one warm-up) and ``budget_s``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best, started = float("inf"), time.perf_counter()
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - t0
        if i or repeats == 0:  # the first product warms up
            best = min(best, took)
        if time.perf_counter() - started > budget_s:
            break
    return min(best, took)


def measured_peak(
    device: torch.device, precision: str, n: int | None = None, repeats: int = 5, budget_s: float = PEAK_PROBE_S
) -> float:
    """The best FLOP/s of a square matrix product in ``precision``, within about ``budget_s``;
    n = 8192 on a GPU (less leaves launch overhead in), grown from 256 on a CPU until one
    product takes 20 ms, so an emulated precision costs no more than a fast one."""
    dtype = _DTYPE["fp32" if precision == "tf32" else precision]
    if device.type == "cpu" and precision == "fp16":
        dtype = torch.bfloat16  # CPU fp16 matmul is emulated; bf16 is the native half type
    if n is None and device.type != "cpu":
        n = 8192
    if n is None:
        n = 256
        while n < 2048 and _matmul_seconds(n, dtype, device, 0, budget_s) < 0.02:
            n *= 2
    return 2 * n**3 / _matmul_seconds(n, dtype, device, repeats, budget_s)


def device_peak(device: torch.device, device_name: str, precision: str, tf32: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, 'table', 'table (TF32)' or 'measured'); with ``tf32`` on a GPU fp32 work
    takes the TF32 peak, else MFU could exceed 100%."""
    key = "tf32" if precision == "fp32" and tf32 and device.type == "cuda" else precision
    peak = table_peak(device_name, key) if device.type == "cuda" else None
    if peak is not None:
        return peak, "table (TF32)" if key == "tf32" else "table"
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    value = cached(
        f"peak|{device_name}|{key}|torch {torch.__version__}|threads {threads}", lambda: measured_peak(device, key)
    )
    return value, "measured"


def mfu(achieved_flops: float, peak_flops: float | None) -> float | None:
    """achieved / peak, or None without a peak or when above 100% (the peak is then wrong)."""
    if not peak_flops or peak_flops <= 0 or achieved_flops > peak_flops:
        return None
    return achieved_flops / peak_flops


@dataclass
class Throughput:
    """FLOP/s and MFU of a figure of images/s: the FLOPs of a trained image and the device's peak."""

    flops_per_image: float | None  # forward + backward; None: a model the counter cannot trace
    peak_flops: float | None  # per device, in the run's precision
    peak_source: str

    def figures(self, images_per_s_per_device: float) -> dict:
        """``tflops_per_s`` and ``mfu`` per device (None where the FLOPs or the peak are unknown)."""
        if not self.flops_per_image:
            return {"tflops_per_s": None, "mfu": None}
        achieved = images_per_s_per_device * self.flops_per_image
        return {"tflops_per_s": achieved / 1e12, "mfu": mfu(achieved, self.peak_flops)}


# --- measurements cached per machine -------------------------------------------------------------


def peak_memory_bytes(device: torch.device, reset: bool = False) -> int:
    """Peak memory: on CUDA the most allocated since the last reset (``reset``: start anew), elsewhere
    the process's peak RSS so far (the kernel keeps no other figure)."""
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak = torch.cuda.max_memory_allocated(device)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def cache_dir() -> Path:
    return Path(os.environ.get("CIFAR_DIST_CACHE_DIR") or "~/.cache/cifar_dist").expanduser()


def cached(key: str, measure):
    """The value cached under ``key``, else ``measure()`` stored for next time; a file lock
    makes a run's ranks measure once and agree."""
    path = cache_dir() / "probes.json"
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(path.with_name(".probes.lock"), "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            return measure()
        try:
            table = json.loads(path.read_text())
            if not isinstance(table, dict):
                table = {}
        except (OSError, ValueError):
            table = {}
        value = table.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        value = float(measure())
        table[key] = value
        tmp = path.with_name(f".probes-{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
        return value


# --- bf16 on CPUs ----------------------------------------------------------------------------------

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 arithmetic units


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def has_bf16_units(flags) -> bool:
    """Whether a CPU with these flags has bf16 arithmetic (AMX or AVX-512 bf16)."""
    return any(f in flags for f in BF16_FLAGS)


def resolve_precision(
    requested: str, capability: tuple[int, int] | None, cpu_units: bool = False
) -> tuple[str, str | None]:
    """(precision to run, a warning or None) on a GPU of CUDA compute ``capability``, or on a
    CPU (``capability`` None) with or without bf16 units (``has_bf16_units``).

    auto: bf16 from Ampere (8.0) on, fp16 with loss scaling before (the paper's V100 is 7.0);
    on a CPU bf16 where it has bf16 units, else fp32 (AVX2 alone runs bf16 several times
    slower). An explicit bf16 that this device runs slowly is kept, with a warning."""
    if capability is None:
        if requested == "auto":
            return ("bf16" if cpu_units else "fp32"), None
        if requested == "bf16" and not cpu_units:
            return "bf16", (
                "run.precision=bf16 on a CPU without bf16 units (no AMX or AVX-512 bf16 in its flags), "
                "where bf16 runs several times slower than fp32; run.precision=auto or fp32 is faster"
            )
        return requested, None
    if requested == "auto":
        return ("bf16" if tuple(capability) >= (8, 0) else "fp16"), None
    if requested == "bf16" and tuple(capability) < (8, 0):
        major, minor = capability
        return "bf16", (
            f"run.precision=bf16 on a GPU of compute capability {major}.{minor}: it has no bf16 "
            "tensor cores (they came with 8.0); fp16 or auto is much faster there"
        )
    return requested, None
