"""Peak FLOP/s of the device, for MFU: from a table by device name, else measured.

The table holds vendors' dense (no sparsity) peaks per device, in TFLOP/s:
bf16/fp16 on tensor cores, tf32 on tensor cores for fp32 work while TF32 is on
(``run.tf32``), and plain FP32 otherwise. A device not in the table (or a
precision it does not list) gets its peak measured: the best of several large
matrix products in the run's precision, an honest lower bound of what the
hardware can do.
"""
from __future__ import annotations

import time

import torch

# name fragment -> {precision: dense peak TFLOP/s}. Looked up in this order, so a
# longer name comes before any name it contains (H100 NVL before H100, L40S and L40
# before L4, A100 and A10G before A10).
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
_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def table_peak(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s from the table, or None when the device or precision is not listed."""
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in device_name and precision in peaks:
            return peaks[precision] * 1e12
    return None


def measured_peak(device: torch.device, precision: str, n: int | None = None, repeats: int = 5) -> float:
    """The best FLOP/s of an n x n matrix product in ``precision`` on ``device``: n = 8192
    on a GPU (a smaller product leaves launch overhead in the figure), 2048 on a CPU."""
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = _DTYPE["fp32" if precision == "tf32" else precision]
    if device.type == "cpu" and precision == "fp16":
        dtype = torch.bfloat16  # CPU fp16 matmul is emulated; bf16 is the native half type
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first product warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak(device: torch.device, device_name: str, precision: str, tf32: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, where it came from: 'table', 'table (TF32)' or 'measured').

    ``tf32``: fp32 work runs on TF32 tensor cores (a GPU with TF32 on), so its peak is
    the TF32 one; dividing by the plain FP32 peak could give an MFU above 100%."""
    key = "tf32" if precision == "fp32" and tf32 and device.type == "cuda" else precision
    peak = table_peak(device_name, key) if device.type == "cuda" else None
    if peak is not None:
        return peak, "table (TF32)" if key == "tf32" else "table"
    return measured_peak(device, key), "measured"
