"""Backends and their fallback, in one place: when sos_aug's Triton kernels run (the paste and the
relight pixel passes on CUDA) and what runs when they cannot (the torch path they replace), and
``torch.compile`` made once per process with an eager fallback. A compiler problem costs speed,
never a crash mid-epoch. ``SOS_AUG_COMPILE=0`` turns kernels and compiling off everywhere."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

FAILED: set[str] = set()  # kernels that failed once in this process: not tried again


def compile_off() -> bool:
    return os.environ.get("SOS_AUG_COMPILE", "1") == "0"


@functools.cache
def has_triton() -> bool:
    """Whether Triton is installed (looked up once: ~40 us a lookup, on every batch otherwise)."""
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device, name: str) -> bool:
    """Whether kernel ``name`` runs on ``device``: CUDA with Triton installed, or the CPU under
    Triton's interpreter (``TRITON_INTERPRET=1``, for tests); not where compiling is off or the
    kernel failed before."""
    if compile_off() or name in FAILED or not has_triton():
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def with_fallback(first: Callable, fallback: Callable, give_up: Callable[[], None], what: str = "torch.compile",
                  instead: str = "running eagerly") -> Callable:
    """``first``, or ``fallback`` (with one warning, and ``give_up()`` so it is not tried again) when
    it raises: a compiler or kernel problem costs speed, never a crash mid-epoch."""
    def run(*args):
        try:
            return first(*args)
        except Exception as err:  # noqa: BLE001 - any compiler, Triton or driver failure: stay correct
            warnings.warn(f"sos_aug: {what} failed ({err!r:.200}); {instead}", stacklevel=3)
            give_up()
            return fallback(*args)

    return run


def run_or_fallback(name: str, kernel: Callable, fallback: Callable):
    """``kernel()``, or ``fallback()`` (with one warning; ``name`` is not tried again) if it raises."""
    return with_fallback(kernel, fallback, lambda: FAILED.add(name), f"the Triton kernel {name!r}",
                         "using the torch path")()


def on(device: torch.device):
    """The context to launch a kernel for tensors on ``device`` in: Triton launches on torch's current
    CUDA device, which need not be the tensors' (``cuda:1`` without ``torch.cuda.set_device``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
