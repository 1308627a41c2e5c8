"""The net's predicted transforms applied to a batch's segment pixels in one Triton kernel (CUDA).

The torch pixel pass lists the segments' pixels with ``nonzero`` (a wait on the device, and a third
of the relight's device time at B=16, 1024²) and gathers and scatters them. Here each program walks
its segment's box, tile by tile, and transforms and writes just the pixels under the segment's
mask: one launch, no list of pixels, no wait. Same family as :func:`.family.apply_family`
(affine colour matrix, monotone curves, shading grid over the context window), same float32
arithmetic; on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import backends
from ..ops.triton_ops import launch_shape, load_unit, segment_box, store_unit
from .family import GRID, KNOTS, N_AFFINE, N_CURVE, N_PARAMS

_K, _G, _P = tl.constexpr(KNOTS), tl.constexpr(GRID), tl.constexpr(N_PARAMS)
_CURVES, _SHADE = tl.constexpr(N_AFFINE), tl.constexpr(N_AFFINE + N_CURVE)


@triton.jit
def _curve(t, raw):
    """Channel curve at ``t`` = x * KNOTS: piecewise linear, slopes exp(raw) (clamped to +-4),
    extrapolated linearly past both ends (the piece index is clamped, as the torch pass does)."""
    piece = tl.minimum(tl.maximum(t, 0.0), _K - 1.0).to(tl.int32)  # truncation = floor here
    value = tl.zeros_like(t)
    knot = 0.0
    for k in tl.static_range(_K):
        slope = tl.exp(tl.minimum(tl.maximum(tl.load(raw + k), -4.0), 4.0)) / _K
        value = tl.where(piece == k, knot + (t - k) * slope, value)
        knot += slope
    return value


@triton.jit
def _channel(p, c: tl.constexpr, red, green, blue):
    """Output channel ``c`` of the affine matrix (identity + params) and the curve, before shading."""
    t = ((tl.load(p + 3 * c + 0) + (1.0 if c == 0 else 0.0)) * red
         + (tl.load(p + 3 * c + 1) + (1.0 if c == 1 else 0.0)) * green
         + (tl.load(p + 3 * c + 2) + (1.0 if c == 2 else 0.0)) * blue + tl.load(p + 9 + c)) * _K
    return _curve(t, p + _CURVES + c * _K)


@triton.jit
def _shade(grid, u, v):
    """exp of the shading grid, bilinear at grid coordinates (u, v) (the cell clamped to the grid)."""
    u0 = tl.minimum(tl.maximum(tl.floor(u), 0.0), _G - 2.0)
    v0 = tl.minimum(tl.maximum(tl.floor(v), 0.0), _G - 2.0)
    # in [0, 1] for a segment's pixels; clamped so that lanes past the box (never stored) stay finite
    fu = tl.minimum(tl.maximum(u - u0, 0.0), 1.0)
    fv = tl.minimum(tl.maximum(v - v0, 0.0), 1.0)
    corner = grid + v0.to(tl.int32) * _G + u0.to(tl.int32)
    top = tl.load(corner) * (1 - fu) + tl.load(corner + 1) * fu
    bottom = tl.load(corner + _G) * (1 - fu) + tl.load(corner + _G + 1) * fu
    return tl.exp(top * (1 - fv) + bottom * fv)


@triton.jit  # ("coeffs", not "params": some Triton versions' launchers have a local of that name)
def _relight(images, result, masks, owner, boxes, ctx, coeffs, height, width,
             BLOCK: tl.constexpr, PROGRAMS: tl.constexpr):
    """Program (j, s): tiles j, j + PROGRAMS, ... of segment s's box; its masked pixels relit."""
    s = tl.program_id(1)
    x0, y0, box_w, box_h = segment_box(boxes, s)
    cx0, cy0 = tl.load(ctx + 4 * s), tl.load(ctx + 4 * s + 1)
    # context window size - 1 in shading-grid units per pixel, as the torch pass
    scale_x = (_G - 1.0) / tl.maximum(tl.load(ctx + 4 * s + 2) - cx0 - 1.0, 1.0)
    scale_y = (_G - 1.0) / tl.maximum(tl.load(ctx + 4 * s + 3) - cy0 - 1.0, 1.0)
    plane = height * width
    src = images + tl.load(owner + s) * 3 * plane
    dst = result + tl.load(owner + s) * 3 * plane
    p = coeffs + s * _P
    count = tl.maximum(box_w, 0) * tl.maximum(box_h, 0)
    for tile in range(tl.program_id(0), tl.cdiv(count, BLOCK), PROGRAMS):
        idx = tile * BLOCK + tl.arange(0, BLOCK)
        ys = y0 + idx // box_w
        xs = x0 + idx % box_w
        pos = ys * width + xs
        on = (idx < count) & (tl.load(masks + s.to(tl.int64) * plane + pos, mask=idx < count, other=0) != 0)
        if tl.sum(on.to(tl.int32), 0) > 0:
            red = load_unit(src + pos, on)
            green = load_unit(src + plane + pos, on)
            blue = load_unit(src + 2 * plane + pos, on)
            shade = _shade(p + _SHADE, (xs.to(tl.float32) - cx0) * scale_x, (ys.to(tl.float32) - cy0) * scale_y)
            store_unit(dst + pos, _channel(p, 0, red, green, blue) * shade, on)
            store_unit(dst + plane + pos, _channel(p, 1, red, green, blue) * shade, on)
            store_unit(dst + 2 * plane + pos, _channel(p, 2, red, green, blue) * shade, on)


def relight_pixels(images: torch.Tensor, masks: torch.Tensor, owner: torch.Tensor, boxes: torch.Tensor,
                   ctx: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """A copy of the (B, 3, H, W) batch with segment ``s``'s transform (``params[s]``, shading over
    context window ``ctx[s]``) applied to the pixels of ``masks[s]`` ((S, H, W) bool) in image
    ``owner[s]``, looking only inside the segment's tight box ``boxes[s]`` (XYXY, pixel edges)."""
    images = images.contiguous()
    result = images.clone()
    if len(masks) == 0:
        return result
    height, width = images.shape[-2:]
    block, programs = launch_shape(images.device)
    tables = [t.float().contiguous() for t in (boxes, ctx, params)]  # the kernel reads them as packed rows
    with backends.on(images.device):
        _relight[(programs, len(masks))](images, result, masks.contiguous().view(torch.uint8), owner.contiguous(),
                                         *tables, height, width, BLOCK=block, PROGRAMS=programs)
    return result


