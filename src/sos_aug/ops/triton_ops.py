"""Triton helpers the CUDA kernels share (paste, relight pixel pass, LabBlend): rounding as torch
rounds, pixels read and written as unit floats, a segment's box, the launch grid. Imported only
where Triton is installed."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # pixels per tile of the relight kernels
PROGRAMS = 64  # programs per segment, each taking every PROGRAMS-th tile of its box


@triton.jit
def round_half_even(v):
    """``torch.round`` of non-negative floats (halves to the even neighbour), as a float."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def load_unit(at, on):
    """Pixel values in [0, 1] as float32, whatever the image's dtype (uint8: / 255)."""
    value = tl.load(at, mask=on, other=0).to(tl.float32)
    if at.dtype.element_ty == tl.uint8:
        value = value / 255.0
    return value


@triton.jit
def store_unit(at, value, on):
    """A relit value in [0, 1] stored in the image's dtype (uint8: x 255, rounded half to even)."""
    value = tl.minimum(tl.maximum(value, 0.0), 1.0)
    if at.dtype.element_ty == tl.uint8:
        tl.store(at, round_half_even(value * 255.0).to(tl.uint8), mask=on)
    else:
        tl.store(at, value.to(at.dtype.element_ty), mask=on)


@triton.jit
def segment_box(boxes, s):
    """Segment ``s``'s tight box (packed float XYXY rows, pixel edges) as x0, y0, width, height."""
    x0, y0 = tl.load(boxes + 4 * s).to(tl.int32), tl.load(boxes + 4 * s + 1).to(tl.int32)
    return x0, y0, tl.load(boxes + 4 * s + 2).to(tl.int32) - x0, tl.load(boxes + 4 * s + 3).to(tl.int32) - y0


def launch_shape(device: torch.device) -> tuple[int, int]:
    """(pixels per tile, programs per segment): on the CPU, under the interpreter, few wide tiles."""
    return (BLOCK, PROGRAMS) if device.type != "cpu" else (4096, 2)
