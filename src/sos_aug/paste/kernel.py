"""The ``"kernel"`` backend: paste every hard-alpha piece of a batch in two Triton kernels, the
CUDA path of compositing.

The grouped path (:mod:`.groups`) still dispatches ~150 operations per size group, and their
host time, plus the (B, K, H, W) mask stack it writes and reduces, dominated a B=16 paste at 1024²
on a GPU (docs/performance.md). Here every output pixel of every piece is computed straight from its segment with
torch's antialiased bilinear resize (``F.interpolate(..., antialias=True)``: the same triangle
filter, support, tap window and per-axis normalisation; summed in another order, so values agree to
float rounding), in two launches for the whole batch, whatever the pieces' sizes:

1. ``mark``: each piece's alpha; where it passes the cut, the piece's slot goes into the batch's
   topmost-piece map (an atomic max: the later piece wins), and its pixel count and box into its
   statistics;
2. ``paint``: where the piece is topmost, its RGB goes into the output (rounded like the grouped
   path), and its visible pixel count and box into its statistics.

No per-piece mask is ever written: the occlusion step reads counts and boxes from the statistics
and the visible masks from the topmost map. Runs on CUDA; on the CPU only under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check it without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import Placement
from ..ops import backends
from ..ops.masks import ALPHA_CUT
from ..ops.triton_ops import round_half_even
from .geometry import Col, piece_table

BLOCK = 256  # output pixels per program (the interpreter, on the CPU, takes 4096: fewer, wider programs)
NCOL = len(Col)  # integer columns of a piece row (the PieceTable's)
NSTAT = 10  # per piece: full count, full box (x0, y0, x1, y1), visible count, visible box
BIG = 2**30  # "no pixel yet" for the box minima
# the PieceTable's columns as Triton compile-time constants
_HS, _WS, _HC, _WC = (tl.constexpr(int(c)) for c in (Col.HS, Col.WS, Col.HC, Col.WC))
_CY0, _CA, _CS, _Y0, _X0 = (tl.constexpr(int(c)) for c in (Col.CY0, Col.CA, Col.CS, Col.Y0, Col.X0))
_OFFSET, _PLANE, _TOP_AT, _OUT_AT, _SLOT1 = (tl.constexpr(int(c)) for c in (Col.OFFSET, Col.PLANE, Col.TOP_AT,
                                                                            Col.OUT_AT, Col.SLOT1))
_NCOL, _NSTAT, _BIG = tl.constexpr(NCOL), tl.constexpr(NSTAT), tl.constexpr(BIG)


@triton.jit
def _triangle(tap, center, inv_support, end):
    """The antialiasing filter's weight of input ``tap`` (0 at or past ``end``, the tap window's end)."""
    w = tl.maximum(1.0 - tl.abs((tap.to(tl.float32) - center + 0.5) * inv_support), 0.0)
    return tl.where(tap < end, w, 0.0)


@triton.jit
def _axis(out_pos, scale, inv_support, support, size):
    """Where output position ``out_pos`` samples along one axis: filter centre, first tap, tap
    window end, the number of taps to loop over and their weights' sum (as torch computes them)."""
    center = (out_pos.to(tl.float32) + 0.5) * scale
    first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    end = tl.minimum((center + support + 0.5).to(tl.int32), size.to(tl.int32))
    taps = (2.0 * support).to(tl.int32) + 2
    total = tl.zeros_like(center)
    for j in range(0, taps):
        total += _triangle(first + j, center, inv_support, end)
    return center, first, end, taps, tl.maximum(total, 1e-30)


@triton.jit
def _sample(flat, row, frow, r, c, live, RGB: tl.constexpr):
    """A piece's resized, flipped pixels at crop rows ``r`` and columns ``c``: its alpha (first of
    the three values returned) or, with ``RGB``, its three colour channels (the weights are shared)."""
    hs, ws = tl.load(row + _HS).to(tl.int32), tl.load(row + _WS).to(tl.int32)
    oy = (tl.load(row + _CY0) + r).to(tl.int32)
    ox = (tl.load(row + _CA) + tl.load(row + _CS) * c).to(tl.int32)  # the crop's column, unflipped
    iy, ix = tl.load(frow + 1), tl.load(frow + 4)
    cy, y0, y1, ny, ty = _axis(oy, tl.load(frow + 0), iy, tl.load(frow + 2), hs)
    cx, x0, x1, nx, tx = _axis(ox, tl.load(frow + 3), ix, tl.load(frow + 5), ws)
    plane = tl.load(row + _PLANE).to(tl.int32)
    base = flat + tl.load(row + _OFFSET) + (0 if RGB else 3 * plane)
    acc0, acc1, acc2 = tl.zeros_like(cy), tl.zeros_like(cy), tl.zeros_like(cy)
    for j in range(0, ny):
        y = y0 + j
        wy = _triangle(y, cy, iy, y1) / ty
        line0, line1, line2 = tl.zeros_like(cx), tl.zeros_like(cx), tl.zeros_like(cx)
        for i in range(0, nx):
            x = x0 + i
            w = _triangle(x, cx, ix, x1) / tx
            at = base + y * ws + x
            ok = live & (y < y1) & (x < x1)
            line0 += w * tl.load(at, mask=ok, other=0).to(tl.float32)
            if RGB:
                line1 += w * tl.load(at + plane, mask=ok, other=0).to(tl.float32)
                line2 += w * tl.load(at + 2 * plane, mask=ok, other=0).to(tl.float32)
        acc0 += wy * line0
        if RGB:
            acc1 += wy * line1
            acc2 += wy * line2
    return acc0, acc1, acc2


@triton.jit
def _tile(table, BLOCK: tl.constexpr):
    """This program's piece row and its block of crop pixels: row pointer, rows, columns, liveness."""
    p = tl.program_id(1)
    row = table + p * _NCOL
    wc = tl.load(row + _WC)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = idx // wc
    return p, row, r, idx - r * wc, idx < tl.load(row + _HC) * wc


@triton.jit
def _add_stats(at, on, xs, ys):
    """Add a block's set pixels to a piece's count and box (atomics: blocks of a piece run apart)."""
    tl.atomic_add(at, tl.sum(on.to(tl.int32), 0))
    tl.atomic_min(at + 1, tl.min(tl.where(on, xs, _BIG), 0).to(tl.int32))
    tl.atomic_min(at + 2, tl.min(tl.where(on, ys, _BIG), 0).to(tl.int32))
    tl.atomic_max(at + 3, tl.max(tl.where(on, xs + 1, 0), 0).to(tl.int32))
    tl.atomic_max(at + 4, tl.max(tl.where(on, ys + 1, 0), 0).to(tl.int32))


@triton.jit
def _mark(flat, table, ftable, top, stats, width, CUT: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: each piece's hard mask into the topmost map and its full count and box."""
    p, row, r, c, live = _tile(table, BLOCK)
    if tl.program_id(0) * BLOCK < tl.load(row + _HC) * tl.load(row + _WC):
        alpha, _, _ = _sample(flat, row, ftable + p * 6, r, c, live, RGB=False)
        on = live & (alpha >= CUT)
        ys, xs = tl.load(row + _Y0) + r, tl.load(row + _X0) + c
        slot = tl.zeros_like(r).to(tl.int32) + tl.load(row + _SLOT1).to(tl.int32)
        tl.atomic_max(top + tl.load(row + _TOP_AT) + ys * width + xs, slot, mask=on)
        _add_stats(stats + p * _NSTAT, on, xs, ys)


@triton.jit
def _as_pixel(value, dtype: tl.constexpr):
    """A 0..255 float as the batch stores it: uint8 clamped and rounded, or a float in [0, 1]."""
    if dtype == tl.uint8:
        return round_half_even(tl.minimum(tl.maximum(value, 0.0), 255.0)).to(tl.uint8)
    return (value / 255.0).to(dtype)


@triton.jit
def _paint(flat, table, ftable, top, stats, out, width, plane_size, BLOCK: tl.constexpr):
    """Pass 2: where a piece is topmost, its RGB into the output; its visible count and box."""
    p, row, r, c, live = _tile(table, BLOCK)
    if tl.program_id(0) * BLOCK < tl.load(row + _HC) * tl.load(row + _WC):
        ys, xs = tl.load(row + _Y0) + r, tl.load(row + _X0) + c
        pos = ys * width + xs
        slot = tl.load(row + _SLOT1).to(tl.int32)
        on = live & (tl.load(top + tl.load(row + _TOP_AT) + pos, mask=live, other=0) == slot)
        _add_stats(stats + p * _NSTAT + 5, on, xs, ys)
        if tl.sum(on.to(tl.int32), 0) > 0:
            at = out + tl.load(row + _OUT_AT) + pos
            red, green, blue = _sample(flat, row, ftable + p * 6, r, c, on, RGB=True)
            tl.store(at, _as_pixel(red, out.dtype.element_ty), mask=on)
            tl.store(at + plane_size, _as_pixel(green, out.dtype.element_ty), mask=on)
            tl.store(at + 2 * plane_size, _as_pixel(blue, out.dtype.element_ty), mask=on)


@dataclass
class PieceStats:
    """Per piece slot of the batch (B * K, image by image): pixel count and tight XYXY box of its
    full hard mask and of its visible part (zeros for a slot with no piece or no pixel)."""

    full_count: torch.Tensor  # (B * K,) int64
    full_boxes: torch.Tensor  # (B * K, 4) float
    visible_count: torch.Tensor
    visible_boxes: torch.Tensor


def paste_kernels(images: torch.Tensor, segments: list[torch.Tensor], flat: torch.Tensor,
                  placements: list[Placement], kmax: int) -> tuple[torch.Tensor, torch.Tensor, PieceStats]:
    """Composite every piece of a (B, 3, H, W) batch (hard alpha, no rotation), in paste order.

    Returns the composited batch (uint8, or float in [0, 1] as given), the topmost piece at each
    pixel ((B, H, W) int32, 1-based slot, 0 = none) and every piece's :class:`PieceStats`.
    ``flat``: the segments' uint8 buffer on the batch's device (``placements[b].segment`` indexes
    ``segments``).
    """
    b, _, height, width = images.shape
    dev = images.device
    table = piece_table(segments, placements, height, width, kmax)
    rows, scales = table.ints, table.floats
    top = torch.zeros(b, height, width, dtype=torch.int32, device=dev)
    out = images.clone(memory_format=torch.contiguous_format)  # the kernels write planes of a contiguous batch
    per_slot = torch.zeros(b * kmax, NSTAT, dtype=torch.int32)
    if rows:
        table = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
        floats = [[sy, iy, max(sy, 1.0), sx, ix, max(sx, 1.0)] for sy, iy, sx, ix in scales]
        ftable = torch.tensor(floats, dtype=torch.float32).to(dev, non_blocking=True)
        stats = torch.tensor([[0, BIG, BIG, 0, 0] * 2] * len(rows), dtype=torch.int32).to(dev, non_blocking=True)
        block = BLOCK if dev.type != "cpu" else 4096
        grid = (max(-(-row[Col.HC] * row[Col.WC] // block) for row in rows), len(rows))
        with backends.on(dev):
            _mark[grid](flat, table, ftable, top, stats, width, CUT=ALPHA_CUT, BLOCK=block)
            _paint[grid](flat, table, ftable, top, stats, out, width, height * width, BLOCK=block)
        slots = torch.tensor([row[Col.TOP_AT] // (height * width) * kmax + row[Col.SLOT1] - 1 for row in rows])
        per_slot = per_slot.to(dev).index_copy_(0, slots.to(dev, non_blocking=True), stats)
    return out, top, _piece_stats(per_slot.to(dev))


def _piece_stats(per_slot: torch.Tensor) -> PieceStats:
    """The kernels' (B * K, NSTAT) int32 statistics as counts and float boxes (zero boxes when empty)."""
    counts = per_slot[:, [0, 5]].long()
    boxes = per_slot[:, [1, 2, 3, 4, 6, 7, 8, 9]].float() * (counts > 0).repeat_interleave(4, 1)
    return PieceStats(counts[:, 0], boxes[:, :4], counts[:, 1], boxes[:, 4:])
