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


# Segments of the warm-up batch, (top, left, height, width) in a 200 x 260 image: distinct sizes (no
# two equal, none equal to a fixed dimension), and boxes both inside and at the borders, so that the
# compiled code covers what real batches bring
_WARM_UP_BOXES = ((0, 0, 23, 37), (60, 110, 41, 29), (110, 17, 31, 53), (150, 211, 27, 49), (1, 170, 47, 19),
                  (88, 1, 22, 34))


def warm_up(relighters, threads: int = 1) -> None:
    """Compile here, once, what ``relighters`` compile on the CPU (those with ``compile_cpu``), by
    relighting a small synthetic uint8 batch with torch at ``threads`` threads, as DataLoader
    workers run (compiled code is guarded on the thread count): workers forked afterwards inherit
    the compiled code instead of each compiling it again, every epoch. Does nothing where no
    relighter compiles or ``SOS_AUG_COMPILE=0``."""
    from .classical import RelightBatch, as_chain, relight

    chain = as_chain(relighters)
    if compile_off() or not any(getattr(step, "compile_cpu", False) for step in chain):
        return
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 200, 260), dtype=torch.uint8, generator=g)
    masks = torch.zeros(len(_WARM_UP_BOXES), 200, 260, dtype=torch.bool)
    for mask, (top, left, height, width) in zip(masks, _WARM_UP_BOXES):
        mask[top : top + height, left : left + width] = torch.rand(height, width, generator=g) > 0.2
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        relight(chain, RelightBatch([image], [image], [masks]))
    finally:
        torch.set_num_threads(previous)
