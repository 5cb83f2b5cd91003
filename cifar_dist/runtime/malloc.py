"""Keep freed memory in the process instead of returning it to the OS (glibc only).

PyTorch's CPU tensors of more than 128 KiB are mmap'd and unmapped on every
allocation, so each training step pays for fresh page faults. On virtual
machines page faults can cost 100x more than usual (measured here: an 16 MB
multiply took 6-320 ms instead of 1.3 ms). Raising glibc's mmap and trim
thresholds makes freed blocks reusable: the effect of the MALLOC_MMAP_THRESHOLD_
and MALLOC_TRIM_THRESHOLD_ environment variables, applied by the training and
benchmark entry points (importing cifar_dist changes nothing process-wide).
Set CIFAR_DIST_MALLOC_TUNING=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 * 1024 * 1024  # glibc's largest allowed mmap threshold on 64-bit
_TRIM = 2**31 - 1  # 2 GiB: the largest value mallopt takes


def tune_malloc() -> bool:
    """Apply the thresholds; returns whether they were applied."""
    if os.environ.get("CIFAR_DIST_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM)) and ok
