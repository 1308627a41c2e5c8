"""LabBlend over a batch's segment pixels in one Triton kernel (CUDA).

The torch path lists the pasted pixels with ``nonzero`` (a wait on the device), gathers the relit
and the plain ones, runs ~40 elementwise operations for the two Lab conversions and the way back,
and scatters the result. Here each program walks its segment's box, tile by tile, and blends just
the pixels under the segment's mask in registers: one launch, no pixel list, no wait. The same
conversions as :func:`sos_aug.ops.color.rgb_to_lab` and :func:`~sos_aug.ops.color.lab_to_rgb` (kornia's
constants, float32); on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import backends
from ..ops.color import lab_matrices
from ..ops.triton_ops import launch_shape, load_unit, segment_box, store_unit


@triton.jit
def _mix(m, first: tl.constexpr, x, y, z):
    """Row ``first // 3`` of the 3x3 matrix at ``m`` (row-major) times (x, y, z)."""
    return tl.load(m + first) * x + tl.load(m + first + 1) * y + tl.load(m + first + 2) * z


@triton.jit
def _linear(c):
    """An sRGB value in [0, 1] as linear light."""
    c = tl.minimum(tl.maximum(c, 0.0), 1.0)
    return tl.where(c > 0.04045, tl.exp(2.4 * tl.log((tl.maximum(c, 0.04045) + 0.055) / 1.055)), c / 12.92)


@triton.jit
def _f(t):
    """Lab's f: the cube root above the knee, the line below it."""
    return tl.where(t > 0.008856, tl.exp(tl.log(tl.maximum(t, 0.008856)) / 3.0), 7.787 * t + 4.0 / 29.0)


@triton.jit
def _f_inverse(f):
    return tl.where(f > 0.2068966, f * f * f, (f - 4.0 / 29.0) / 7.787)


@triton.jit
def _to_lab(red, green, blue, to_xyz):
    """sRGB in [0, 1] -> (L, a, b); ``to_xyz``: the RGB -> XYZ matrix over the white point."""
    r, g, b = _linear(red), _linear(green), _linear(blue)
    fx, fy, fz = _f(_mix(to_xyz, 0, r, g, b)), _f(_mix(to_xyz, 3, r, g, b)), _f(_mix(to_xyz, 6, r, g, b))
    return 116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)


@triton.jit
def _gamma(lin):
    return tl.where(lin > 0.0031308, 1.055 * tl.exp(tl.log(tl.maximum(lin, 0.0031308)) / 2.4) - 0.055, 12.92 * lin)


@triton.jit
def _lab_blend(relit, plain, result, masks, owner, boxes, weights, matrices, height, width,
               RELIT_AB: tl.constexpr, BLOCK: tl.constexpr, PROGRAMS: tl.constexpr):
    """Program (j, s): tiles j, j + PROGRAMS, ... of segment s's box; under its mask, L mixed as
    w L_relit + (1 - w) L_plain (w = ``weights[s]``), a/b from the relit (``RELIT_AB``) or plain pixel."""
    s = tl.program_id(1)
    x0, y0, box_w, box_h = segment_box(boxes, s)
    plane = height * width
    at = tl.load(owner + s).to(tl.int64) * 3 * plane
    w = tl.load(weights + s)
    to_xyz, to_rgb = matrices, matrices + 9
    count = tl.maximum(box_w, 0) * tl.maximum(box_h, 0)
    for tile in range(tl.program_id(0), tl.cdiv(count, BLOCK), PROGRAMS):
        idx = tile * BLOCK + tl.arange(0, BLOCK)
        pos = (y0 + idx // box_w) * width + x0 + idx % box_w
        on = (idx < count) & (tl.load(masks + s.to(tl.int64) * plane + pos, mask=idx < count, other=0) != 0)
        if tl.sum(on.to(tl.int32), 0) > 0:
            src = relit + at + pos
            lr, ar, br = _to_lab(load_unit(src, on), load_unit(src + plane, on), load_unit(src + 2 * plane, on),
                                 to_xyz)
            src = plain + at + pos
            lp, ap, bp = _to_lab(load_unit(src, on), load_unit(src + plane, on), load_unit(src + 2 * plane, on),
                                 to_xyz)
            if RELIT_AB:
                a, b = ar, br
            else:
                a, b = ap, bp
            fy = (w * lr + (1.0 - w) * lp + 16.0) / 116.0
            x, y = _f_inverse(a / 500.0 + fy), _f_inverse(fy)
            z = _f_inverse(tl.maximum(fy - b / 200.0, 0.0))
            dst = result + at + pos
            store_unit(dst, _gamma(_mix(to_rgb, 0, x, y, z)), on)
            store_unit(dst + plane, _gamma(_mix(to_rgb, 3, x, y, z)), on)
            store_unit(dst + 2 * plane, _gamma(_mix(to_rgb, 6, x, y, z)), on)


def lab_blend_pixels(relit: torch.Tensor, plain: torch.Tensor, masks: torch.Tensor, owner: torch.Tensor,
                     boxes: torch.Tensor, weights: torch.Tensor, relit_ab: bool) -> torch.Tensor:
    """A copy of the (B, 3, H, W) batch ``relit`` with LabBlend applied to the pixels of ``masks[s]``
    ((S, H, W) bool, disjoint) in image ``owner[s]``, against the same pixels of ``plain``, with
    weight ``weights[s]``, looking only inside each segment's tight box ``boxes[s]`` (XYXY)."""
    relit, plain = relit.contiguous(), plain.contiguous()
    result = relit.clone()
    if len(masks) == 0:
        return result
    height, width = relit.shape[-2:]
    block, programs = launch_shape(relit.device)
    m = lab_matrices(torch.float32, relit.device)  # the white point folded in
    matrices = torch.cat([m["to_xyz"].reshape(-1), m["to_rgb"].reshape(-1)])
    with backends.on(relit.device):
        _lab_blend[(programs, len(masks))](relit, plain, result, masks.contiguous().view(torch.uint8),
                                           owner.contiguous(), boxes.float().contiguous(), weights.float().contiguous(),
                                           matrices, height, width, RELIT_AB=relit_ab, BLOCK=block, PROGRAMS=programs)
    return result
