"""Keep freed memory in the process for the next batch: what makes per-batch tensors cheap on the CPU.

Every batch allocates tens of MB of new tensors (composites, (N, H, W) masks, relighting buffers)
and frees the last batch's. glibc's malloc gives allocations that large back to the kernel when they
are freed (mmap'd chunks, a trimmed heap top), so each batch's tensors are fresh pages again: the
kernel faults in and zeroes every page on first touch. Keeping freed memory in the heap lets the
next batch reuse it (``benchmarks/workers.py`` measures it in a real DataLoader worker;
docs/performance.md). Results are unchanged; the process keeps up to its peak heap size instead of
returning it between batches.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit
_TRIM_THRESHOLD = 1 << 30

applied = False  # whether keep_freed_memory() took effect in this process
_tried = False  # it is tried once per process: callers may call it on every batch


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve allocations up to 32 MB from its heap and keep up to 1 GB of freed
    heap memory instead of returning it to the kernel, for this process. Returns whether it took
    effect: True on glibc (Linux), False elsewhere (nothing changes there)."""
    global applied, _tried
    if not _tried:
        _tried = True
        applied = _set_glibc_thresholds()
    return applied


def _set_glibc_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt does nothing
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
