"""``torch.compile`` for the relighters: each function compiled once per process (any sizes), with
an eager fallback, so that a compiler problem costs speed, never a crash mid-epoch.
``SOS_AUG_COMPILE=0`` turns compiling off everywhere."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import compile_off, with_fallback

COMPILED: dict[str, Callable] = {}  # name -> what to call (compiled, or the eager fallback)


def compiled(name: str, fn: Callable) -> Callable:
    """``torch.compile(fn)`` made once per process (any sizes), under ``name``; its CPU kernels
    single-threaded (no OpenMP pool: safe in DataLoader workers and across forks)."""
    if name not in COMPILED:
        COMPILED[name] = torch.compile(fn, dynamic=True, options={"cpp.threads": 1})
    return COMPILED[name]


def once_with_fallback(key: str, call: Callable, eager: Callable) -> Callable:
    """What to run under ``key``: ``call`` (code compiled on first use, once per process, i.e. per
    DataLoader worker), or ``eager`` where ``SOS_AUG_COMPILE=0`` or compiling failed (with a
    warning, and not tried again)."""
    if compile_off():
        return eager
    if key not in COMPILED:
        COMPILED[key] = with_fallback(call, eager, lambda: COMPILED.__setitem__(key, eager))
    return COMPILED[key]


def mask_01(mask: torch.Tensor) -> torch.Tensor:
    """A (h, w) mask as contiguous uint8 0/1: what compiled CPU loops read fast (bool loads, and
    ``where`` on them, do not vectorise), applied there as ``x + (new - x) * mask``."""
    as_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    return as_bytes.contiguous()
