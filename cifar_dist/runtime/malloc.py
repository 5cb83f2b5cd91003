"""Keep freed memory in the process instead of returning it to the OS (glibc only), sparing
each step fresh page faults; why, and CIFAR_DIST_MALLOC_TUNING=0, in docs/benchmarks.md."""

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
