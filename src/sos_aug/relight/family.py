"""The relighting transform family: what a relighter may do to a segment's pixels.

A segment's colours go through ``x -> shade(curve(A x + b))``: an affine colour matrix, monotone
per-channel piecewise-linear curves, and a coarse multiplicative shading grid spread over the
segment's context window. All-zero parameters are the identity. The net predicts these parameters
at low resolution; they are applied at full resolution to the segment's pixels only, and the same
family is what the oracle and the teacher distillation fit.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KNOTS = 8  # curve segments per channel
GRID = 4  # shading grid is GRID x GRID
N_AFFINE = 12
N_CURVE = 3 * KNOTS
N_SHADE = GRID * GRID
N_PARAMS = N_AFFINE + N_CURVE + N_SHADE


def identity(n: int, device=None) -> torch.Tensor:
    return torch.zeros(n, N_PARAMS, device=device)


def apply_family(params: torch.Tensor, rgb: torch.Tensor,
                 within: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Apply per-sample parameters (S, P) to (S, 3, h, w) RGB in [0, 1]. The shading grid spans the
    whole (h, w) window, or, with ``within`` = (H, W, y0, x0), a window of size (H, W) of which
    ``rgb`` is the part at (y0, x0). Returns unclamped values (callers clamp after compositing)."""
    s = params.shape[0]
    matrix = torch.eye(3, device=params.device, dtype=params.dtype) + params[:, :9].view(s, 3, 3)
    bias = params[:, 9:12].view(s, 3, 1, 1)
    x = torch.einsum("sij,sjhw->sihw", matrix, rgb) + bias
    x = _curves(params[:, N_AFFINE : N_AFFINE + N_CURVE].view(s, 3, KNOTS), x)
    grid = params[:, N_AFFINE + N_CURVE :].view(s, GRID, GRID)
    h, w = rgb.shape[-2:]
    full_h, full_w, y0, x0 = (h, w, 0, 0) if within is None else within
    # bilinear (align_corners=True) upsampling of the grid is separable: two tiny matmuls, and only
    # over the part of the window that is there
    wy = _lerp_weights(_grid_positions(full_h, y0, h, params))
    wx = _lerp_weights(_grid_positions(full_w, x0, w, params))
    shade = torch.einsum("yi,sij,xj->syx", wy, grid, wx)[:, None]
    return x * torch.exp(shade)


@dataclass
class FamilyTables:
    """The family's parameters as lookup tables, built once for all segments of a batch, so that
    applying one segment's transform is only passes over its pixels (see :func:`apply_tables`)."""

    matrix: torch.Tensor  # (S, 3, 3) colour matrix, times KNOTS and the input scale
    bias: torch.Tensor  # (S, 3, 1, 1) times KNOTS
    per_t: torch.Tensor  # (S, 3 * KNOTS) curve slope per unit of t = x * KNOTS, times the output scale
    intercept: torch.Tensor  # (S, 3 * KNOTS) curve value at t = 0 of each piece, times the output scale
    grid: torch.Tensor  # (S, GRID, GRID) log shading
    pieces: torch.Tensor  # (S, 3 * KNOTS) int64: per_t and intercept of each piece, the two float32s side by side


def family_tables(params: torch.Tensor, scale_in: float = 1.0, scale_out: float = 1.0) -> FamilyTables:
    """Tables for :func:`apply_tables`: ``rgb * scale_in`` is the input and the output comes
    ``* scale_out`` (1/255 and 255 for 0-255 pixels), folded in here instead of passes over pixels."""
    matrix, bias, per_t, intercept, grid = _tables(params, scale_in, scale_out)
    pieces = torch.stack([per_t, intercept], -1).contiguous().view(torch.int64).squeeze(-1)
    return FamilyTables(matrix, bias, per_t, intercept, grid, pieces)


def _tables(params: torch.Tensor, scale_in: float = 1.0, scale_out: float = 1.0) -> tuple[torch.Tensor, ...]:
    """:class:`FamilyTables`' fields, as a plain tuple (what compiled code traces most simply)."""
    s = params.shape[0]
    matrix = (torch.eye(3, device=params.device, dtype=params.dtype) + params[:, :9].view(s, 3, 3)) * scale_in
    # curves on t = x * K: f(t) = knots[i] + (t - i) * slope[i] / K = intercept[i] + t * slope[i] / K
    slope = torch.exp(params[:, N_AFFINE : N_AFFINE + N_CURVE].view(s, 3, KNOTS).clamp(-4, 4))
    knots = torch.cat([torch.zeros_like(slope[..., :1]), torch.cumsum(slope, -1) / KNOTS], -1)
    steps = torch.arange(KNOTS, device=params.device, dtype=params.dtype)
    per_t = slope / KNOTS
    intercept = (knots[..., :KNOTS] - steps * per_t) * scale_out
    return (matrix * KNOTS, params[:, 9:12].reshape(s, 3, 1, 1) * KNOTS, (per_t * scale_out).reshape(s, -1),
            intercept.reshape(s, -1), params[:, N_AFFINE + N_CURVE :].reshape(s, GRID, GRID))


@torch.no_grad()
def apply_tables(tables: FamilyTables, row: int, rgb: torch.Tensor, within: tuple[int, int, int, int] | None = None,
                 weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Segment ``row``'s transform on (3, h, w) ``rgb`` (the segment's box, any dtype and strides:
    read once into a float buffer, unless it is one already), returned as (3, h, w) float in the
    tables' scales; same values as :func:`apply_family`. Every pixel of the box is transformed:
    dense passes over a box cost less than gathering and scattering just the mask's pixels.
    ``weights``: the box's shading weights from :func:`shading_weights`, if made already."""
    h, w = rgb.shape[-2:]
    if weights is None:
        weights = shading_weights([(h, w, 0, 0, h, w) if within is None else (*within, h, w)], tables.grid)[0]
    shade = (weights[0] @ tables.grid[row] @ weights[1].T).exp_()
    x = torch.addmm(tables.bias[row].view(3, 1), tables.matrix[row], rgb.float().reshape(3, -1)).view(-1)
    idx = x.view(3, -1).clamp(0, KNOTS - 1).int().add_(_curve_offsets(rgb.device)).view(-1)  # trunc = floor
    # each pixel's piece (slope, intercept) in one gather of 8-byte pairs: one pass fewer than two gathers
    piece = tables.pieces[row].index_select(0, idx).view(torch.float32).view(-1, 2)
    return torch.addcmul(piece[:, 1], piece[:, 0], x).view(3, -1).mul_(shade.view(1, -1)).view(3, h, w)


@functools.cache
def _curve_offsets(device: torch.device) -> torch.Tensor:
    """(3, 1) int32: where each channel's curve pieces start in a row of the tables (made once)."""
    return torch.arange(0, 3 * KNOTS, KNOTS, device=device, dtype=torch.int32).view(3, 1)


def shading_weights(boxes: Sequence[tuple[int, int, int, int, int, int]],
                    like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For boxes (full_h, full_w, y0, x0, h, w), each the (h, w) part at (y0, x0) of a (full_h,
    full_w) window, the (h, GRID) and (w, GRID) weights that spread the shading grid bilinearly over
    the window (corners aligned); all boxes in a few passes, since per box these dozen tiny
    operations cost more than multiplying the box's pixels."""
    lengths = [n for box in boxes for n in box[4:]]
    starts = [start for box in boxes for start in box[2:4]]
    scales = [(GRID - 1) / max(full - 1, 1) for box in boxes for full in box[:2]]
    offsets = [0] + list(itertools.accumulate(lengths))[:-1]
    count = torch.tensor(lengths, device=like.device)

    def per_position(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=like.device, dtype=like.dtype).repeat_interleave(count)

    pos = torch.arange(sum(lengths), device=like.device, dtype=like.dtype)
    pos = pos.add_(per_position([s - o for s, o in zip(starts, offsets)])).mul_(per_position(scales))
    parts = _lerp_weights(pos).split(lengths)
    return list(zip(parts[0::2], parts[1::2]))


def _shade(grid: torch.Tensor, full_h: int, full_w: int, y0: int, x0: int, h: int, w: int) -> torch.Tensor:
    """(h, w) multiplicative shading: the (GRID, GRID) log grid spread over a (full_h, full_w) window
    (corners aligned), bilinearly, at its part from (y0, x0), exponentiated."""
    weights = _lerp_weights(torch.cat([_grid_positions(full_h, y0, h, grid), _grid_positions(full_w, x0, w, grid)]))
    return (weights[:h] @ grid @ weights[h:].T).exp_()


def box_pass(window: torch.Tensor, mask: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor,
             per_t: torch.Tensor, intercept: torch.Tensor, grid: torch.Tensor,
             full_h: int, full_w: int, y0: int, x0: int, hi: float) -> torch.Tensor:
    """:func:`apply_tables` (one segment's rows of the tables, unpacked) written for ``torch.compile``
    to fuse into one loop over the box: curves in their hinge form (no gathers) and the (h, w)
    ``mask`` given as uint8 0/1 and applied by arithmetic (bool loads do not vectorise on CPU). Returns
    the box's new pixels in ``window``'s dtype, clamped to [0, hi] (rounded for uint8)."""
    h, w = window.shape[-2:]
    shade = _shade(grid, full_h, full_w, y0, x0, h, w)
    px = window.float()
    t = (matrix[:, 0, None, None] * px[0] + matrix[:, 1, None, None] * px[1] + matrix[:, 2, None, None] * px[2]
         + bias[:, None, None])
    # piece k of a continuous piecewise-linear curve adds (slope_k - slope_k-1) * max(t - k, 0)
    curve = intercept[:, 0, None, None] + per_t[:, 0, None, None] * t
    for k in range(1, KNOTS):
        curve = curve + (per_t[:, k, None, None] - per_t[:, k - 1, None, None]) * (t - k).clamp(min=0)
    out = (curve * shade).clamp(0, hi)
    if window.dtype == torch.uint8:
        out = out.round()
    return (px + (out - px) * mask.float()).to(window.dtype)


def _grid_positions(full: int, start: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """Pixels ``start`` .. ``start + n - 1`` of ``full`` in shading-grid units (corners aligned)."""
    return torch.arange(start, start + n, device=like.device, dtype=like.dtype) * ((GRID - 1) / max(full - 1, 1))


def _lerp_weights(pos: torch.Tensor) -> torch.Tensor:
    """(n, GRID) weights that linearly interpolate GRID values at ``pos`` (n,) in grid units."""
    knots = torch.arange(GRID, device=pos.device, dtype=pos.dtype)
    # the hat function max(0, 1 - |pos - i|) is each knot's linear-interpolation weight
    return (pos[:, None] - knots).abs_().neg_().add_(1).clamp_(min=0)


def apply_family_pixels(params: torch.Tensor, rgb: torch.Tensor, sample: torch.Tensor,
                        uv: torch.Tensor) -> torch.Tensor:
    """:func:`apply_family` pixel by pixel: (N, 3) RGB in [0, 1], each pixel's parameter row
    ``sample`` (N,) into ``params`` (S, P), and its position ``uv`` (N, 2) = (x, y) in shading-grid
    units (0..GRID-1 across the context window, as ``align_corners=True``). One pass over just the
    pixels that change, whatever their number of segments: the batched path on accelerators."""
    matrix, bias, per_t, intercept, _ = _tables(params)
    t = (matrix[sample] * rgb[:, None, :]).sum(-1) + bias[sample, :, 0, 0]  # x * K; not a batched 3x3 matmul
    curve = (sample * 3)[:, None] + torch.arange(3, device=rgb.device)  # (N, 3): which of the S * 3 curves
    piece = curve * KNOTS + t.clamp(0, KNOTS - 1).long()  # truncation = floor here
    x = per_t.reshape(-1)[piece] * t + intercept.reshape(-1)[piece]
    grid = params[:, N_AFFINE + N_CURVE :].reshape(-1)  # (S * GRID * GRID,)
    u0 = uv.floor().clamp(0, GRID - 2).long()
    f = uv - u0
    corner = sample * GRID * GRID + u0[:, 1] * GRID + u0[:, 0]  # the top-left of each pixel's grid cell
    top = grid[corner] * (1 - f[:, 0]) + grid[corner + 1] * f[:, 0]
    bottom = grid[corner + GRID] * (1 - f[:, 0]) + grid[corner + GRID + 1] * f[:, 0]
    shade = top * (1 - f[:, 1]) + bottom * f[:, 1]
    return x * torch.exp(shade)[:, None]


def _curves(raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Monotone piecewise-linear curves on [0, 1] with KNOTS equal segments, slopes exp(raw)
    (identity at raw = 0); linear extrapolation outside [0, 1]."""
    slope = torch.exp(raw.clamp(-4, 4))  # (s, 3, K)
    knots = torch.cat([torch.zeros_like(slope[..., :1]), torch.cumsum(slope, -1) / KNOTS], -1)  # (s, 3, K+1)
    t = x * KNOTS
    idx = t.floor().clamp(0, KNOTS - 1).long()
    s, c, h, w = x.shape
    base = torch.gather(knots, 2, idx.view(s, c, -1)).view(s, c, h, w)
    sl = torch.gather(slope, 2, idx.view(s, c, -1)).view(s, c, h, w)
    return base + (t - idx) * sl / KNOTS


def fit_family(rgb: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, steps: int = 150,
               lr: float = 0.05) -> torch.Tensor:
    """The family's best parameters per sample for ``target`` inside ``alpha`` (least squares by Adam):
    the oracle ceiling in evaluation and the fitted targets in teacher distillation."""
    params = identity(rgb.shape[0], rgb.device).requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    weight = alpha / alpha.flatten(1).sum(1).clamp(min=1).view(-1, 1, 1, 1)
    for _ in range(steps):
        opt.zero_grad()
        loss = (((apply_family(params, rgb) - target) ** 2) * weight).sum()
        loss.backward()
        opt.step()
    return params.detach()
