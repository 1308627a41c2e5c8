"""When sos_aug's Triton kernels run (the paste and the relight pixel pass on CUDA), and what
happens when they cannot: the torch path they replace runs instead, so a compiler problem costs
speed, never a crash mid-epoch. ``SOS_AUG_COMPILE=0`` turns them off with everything compiled."""

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
