"""The relighting chain's per-pixel work on the CPU in compiled loops (numba): the net's transform
and LabBlend, segment by segment.

Eager torch runs each as ~20-40 passes over a segment's pixels, each a full read and write of
arrays larger than the cache. Here a segment's pixels are listed and read once (uint8 linearised
by lookup), transformed in one loop that LLVM vectorises (cube roots by Newton steps, other powers
and exponentials from exp2/log2, all written out; curves in hinge form; no gathers, calls or array
loads in it), and written back once, in
either memory layout of the image: channels-last (torchvision's uint8 resize returns those) or
planar. Same arithmetic as the torch paths (:func:`.family.apply_family`,
:func:`.classical.blend_lightness`) in float32; rounded uint8 pixels agree within one level.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload
from numba.np.unsafe.ndarray import to_fixed_tuple

from ..ops.buffers import channels_last
from ..ops.color import lab_matrices, srgb_table
from .family import GRID, KNOTS, family_tables

_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(cache=True, nogil=True, error_model="numpy", inline="always")


@intrinsic
def _float_bits(typingctx, x):
    """A float32's bits as an int32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, x):
    """An int32's bits as a float32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@_inline
def _log2(x):
    """log2 of a positive normal float32 (absolute error ~1e-7): exponent from the bits, the
    mantissa's log by the atanh series around 1."""
    bits = _float_bits(x)
    e = np.float32((bits >> np.int32(23)) - np.int32(127))
    m = _bits_float(np.int32((bits & np.int32(0x7FFFFF)) | np.int32(0x3F800000)))  # [1, 2)
    big = m > np.float32(1.41421356)
    m = m * np.float32(0.5) if big else m
    e = e + np.float32(1.0) if big else e
    z = (m - np.float32(1.0)) / (m + np.float32(1.0))  # |z| <= 0.172
    z2 = z * z
    series = np.float32(1.0) + z2 * (np.float32(1 / 3) + z2 * (np.float32(1 / 5) + z2 * np.float32(1 / 7)))
    return e + z * series * np.float32(2.0 * 1.4426950408889634)


@_inline
def _exp2(y):
    """2 ** y for y in [-126, 126] (relative error ~1e-7): the integer part into the exponent bits,
    the rest by a degree-6 polynomial."""
    y = min(max(y, np.float32(-126.0)), np.float32(126.0))
    n = np.floor(y + np.float32(0.5))
    x = (y - n) * np.float32(0.6931471805599453)  # |x| <= ln(2) / 2
    p = np.float32(1 / 720)
    p = p * x + np.float32(1 / 120)
    p = p * x + np.float32(1 / 24)
    p = p * x + np.float32(1 / 6)
    p = p * x + np.float32(0.5)
    p = p * x + np.float32(1.0)
    p = p * x + np.float32(1.0)
    return p * _bits_float(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@_inline
def _cbrt(t):
    """The cube root of a positive normal float32 (relative error < 5e-7), without a division or a
    library call: 1 / cbrt(t) guessed from the bits (3% off), three Newton steps, then t / cbrt(t)²."""
    r = _bits_float(np.int32(np.int32(0x54A23300) - np.int32(np.float32(_float_bits(t)) * np.float32(1 / 3))))
    third = t * np.float32(1 / 3)
    for _ in range(3):
        r = r * (np.float32(4 / 3) - third * (r * r * r))
    return t * r * r


@_inline
def _decode(c):
    """An sRGB value in [0, 1] as linear light."""
    c = min(max(c, np.float32(0.0)), np.float32(1.0))
    curve = _exp2(np.float32(2.4) * _log2(max(c + np.float32(0.055), np.float32(0.09545)) * np.float32(1 / 1.055)))
    line = c * np.float32(1 / 12.92)
    return curve if c > np.float32(0.04045) else line


@_inline
def _encode(lin):
    """Linear light -> sRGB in [0, 1], clipped."""
    root = _cbrt(max(lin, np.float32(0.0031308)))
    curve = np.float32(1.055) * root * np.sqrt(np.sqrt(root)) - np.float32(0.055)  # lin ** (1/3 + 1/12)
    line = lin * np.float32(12.92)
    return min(max(curve if lin > np.float32(0.0031308) else line, np.float32(0.0)), np.float32(1.0))


@_inline
def _lab_f(t):
    """Lab's f: the cube root above the knee, the line below it (their minimum, as the torch path)."""
    return min(_cbrt(max(t, np.float32(0.008856))), t * np.float32(7.787) + np.float32(4 / 29))


@_inline
def _lab_f_inverse(f):
    """The inverse of :func:`_lab_f`: the cube above the knee, the line below it."""
    cube = f * f * f
    line = (f - np.float32(4 / 29)) * np.float32(1 / 7.787)
    return cube if f > np.float32(0.2068966) else line


@_inline
def _blend(b0, b1, b2, o0, o1, o2, w, m):
    """LabBlend of one pixel in f-space (:func:`.classical.blend_lightness`): linear RGB of the side
    that gives a/b (b) and of the other (o), the other's L weighted ``w``; new sRGB in [0, 1].
    ``m``: the RGB -> XYZ matrix over the white point (9), then XYZ -> RGB times it (9)."""
    fx = _lab_f(m[0] * b0 + m[1] * b1 + m[2] * b2)
    fy = _lab_f(m[3] * b0 + m[4] * b1 + m[5] * b2)
    fz = _lab_f(m[6] * b0 + m[7] * b1 + m[8] * b2)
    shift = (_lab_f(m[3] * o0 + m[4] * o1 + m[5] * o2) - fy) * w
    x, y = _lab_f_inverse(fx + shift), _lab_f_inverse(fy + shift)
    z = _lab_f_inverse(max(fz + shift, np.float32(0.0)))
    return (_encode(m[9] * x + m[10] * y + m[11] * z), _encode(m[12] * x + m[13] * y + m[14] * z),
            _encode(m[15] * x + m[16] * y + m[17] * z))


def _unit(v):
    """A pixel value in [0, 1]: uint8 / 255, floats as they are (typed per image dtype below)."""


@overload(_unit, inline="always")
def _unit_typed(v):
    if isinstance(v, types.Integer):
        return lambda v: np.float32(v) * np.float32(1 / 255)
    return lambda v: np.float32(v)


def _linear(v, table):
    """A pixel value as linear light: uint8 by ``table`` (the 256 levels linearised), floats by :func:`_decode`."""


@overload(_linear)
def _linear_typed(v, table):
    if isinstance(v, types.Integer):
        return lambda v, table: table[v]
    return lambda v, table: _decode(np.float32(v))


def _pixel_value(v, out):
    """A value in [0, 1] as a pixel of ``out``: uint8 times 255, rounded half up; floats clipped."""


@overload(_pixel_value, inline="always")
def _pixel_value_typed(v, out):
    if isinstance(out.dtype, types.Integer):
        return lambda v, out: np.floor(min(max(v, np.float32(0.0)), np.float32(1.0)) * np.float32(255.0)
                                       + np.float32(0.5))
    return lambda v, out: min(max(v, np.float32(0.0)), np.float32(1.0))


@_jit
def _list_pixels(mask, width, x0, y0, x1, y1, where, rows):
    """The flat indices (y * width + x) of ``mask``'s (flat (H * W,) bool) pixels in its box into
    ``where``, their rows y into ``rows``; returns how many."""
    n = 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            at = y * width + x
            where[n], rows[n] = at, y
            n += mask[at]  # branch-free: the slot is overwritten unless the pixel is set
    return n


@_jit
def _put(out, pixel, plane, where, n, red, green, blue):
    """Write ``red[j]``, ``green[j]``, ``blue[j]`` (in [0, 1]) into pixel ``where[j]`` of flat ``out``."""
    pixel, plane = np.uint64(pixel), np.uint64(plane)
    for j in range(np.uint64(n)):
        at = np.uint64(where[j]) * pixel
        out[at] = _pixel_value(red[j], out)
        out[at + plane] = _pixel_value(green[j], out)
        out[at + plane + plane] = _pixel_value(blue[j], out)


@_inline
def _hinge(t, p, c):
    """Channel ``c``'s curve at ``t`` in hinge form (a piecewise-linear curve is its value at 0, its
    first slope times t, and each later change of slope times max(t - k, 0)): no table lookups."""
    value = p[_START + c] + p[_STEPS + c * KNOTS] * t
    for k in range(1, KNOTS):
        value += p[_STEPS + c * KNOTS + k] * max(t - np.float32(k), np.float32(0.0))
    return value


@_inline
def _hat(t):
    """Linear interpolation's weight of a knot at distance ``t``."""
    return max(np.float32(1.0) - abs(t), np.float32(0.0))


@_jit
def relight_image(out, pixel, plane, width, masks, jobs, coeffs):
    """The net's transform (:func:`.family.apply_family`) on each job's mask pixels of one flat image
    ``out`` (channel c of pixel p at ``p * pixel + c * plane``), in place. ``jobs`` (J, 5) int64:
    mask row, box x0, y0, x1, y1; ``coeffs`` (J, N_COEFFS) float32 from :func:`net_coefficients`."""
    size = max_area(jobs)
    where, rows = np.empty(size, np.int64), np.empty(size, np.int64)
    red, green, blue = np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32)
    xs, ys = np.empty(size, np.float32), np.empty(size, np.float32)  # in shading-grid units
    pixel, plane, width = np.uint64(pixel), np.uint64(plane), np.uint64(width)
    for j in range(jobs.shape[0]):
        n = _list_pixels(masks[jobs[j, 0]], width, jobs[j, 1], jobs[j, 2], jobs[j, 3], jobs[j, 4], where, rows)
        row = coeffs[j]
        cx0, cy0, sx, sy = row[N_COEFFS - 4], row[N_COEFFS - 3], row[N_COEFFS - 2], row[N_COEFFS - 1]
        for i in range(np.uint64(n)):
            at, y = np.uint64(where[i]), np.uint64(rows[i])
            src = at * pixel
            red[i], green[i], blue[i] = _unit(out[src]), _unit(out[src + plane]), _unit(out[src + plane + plane])
            xs[i], ys[i] = (np.float32(at - y * width) - cx0) * sx, (np.float32(y) - cy0) * sy
        _transform(red, green, blue, xs, ys, n, to_fixed_tuple(row, N_COEFFS))
        _put(out, pixel, plane, where, n, red, green, blue)


@_jit
def _transform(red, green, blue, xs, ys, n, p):
    """``red``, ``green``, ``blue`` (in [0, 1]) replaced by the family's transform with coefficients
    ``p`` (a tuple: in registers, so the loop vectorises); ``xs``, ``ys``: each pixel's place in
    shading-grid units."""
    for i in range(np.uint64(n)):  # unsigned: no negative-index wraparound, which stops LLVM vectorising
        r, g, b, u, v = red[i], green[i], blue[i], xs[i], ys[i]
        shade = np.float32(0.0)
        for gy in range(GRID):
            across = np.float32(0.0)
            for gx in range(GRID):
                across += _hat(u - np.float32(gx)) * p[_SHADE + gy * GRID + gx]
            shade += _hat(v - np.float32(gy)) * across
        shade = _exp2(shade * np.float32(1.4426950408889634))
        red[i] = _hinge(p[0] * r + p[1] * g + p[2] * b + p[9], p, 0) * shade
        green[i] = _hinge(p[3] * r + p[4] * g + p[5] * b + p[10], p, 1) * shade
        blue[i] = _hinge(p[6] * r + p[7] * g + p[8] * b + p[11], p, 2) * shade


_START, _STEPS = 12, 15  # where each channel's curve value at 0 and its hinge steps start in a row of coefficients
_SHADE = _STEPS + 3 * KNOTS  # then the log shading grid, row by row; then cx0, cy0, sx, sy
N_COEFFS = _SHADE + GRID * GRID + 4


@_jit
def max_area(jobs):
    """The largest box among ``jobs`` (columns 1-4: x0, y0, x1, y1)."""
    most = 0
    for j in range(jobs.shape[0]):
        most = max(most, (jobs[j, 3] - jobs[j, 1]) * (jobs[j, 4] - jobs[j, 2]))
    return most


@_jit
def lab_blend_image(out, base, other, pixel, plane, masks, width, jobs, weights, m, table):
    """LabBlend (:func:`.classical.blend_lightness`) of each job's mask pixels: the result's a/b
    from ``base``, its L mixed with ``other``'s by ``weights[j]``; written into flat ``out`` (which
    may be ``base`` or ``other``). ``jobs`` as :func:`relight_image`'s; ``m``: RGB -> XYZ over the
    white point, then XYZ -> RGB times it (18); ``table``: the 256 uint8 levels as linear light."""
    m = to_fixed_tuple(m, 18)
    size = max_area(jobs)
    where, rows = np.empty(size, np.int64), np.empty(size, np.int64)
    r, g, b = np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32)
    r2, g2, b2 = np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32)
    red, green, blue = np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32)
    pixel, plane = np.uint64(pixel), np.uint64(plane)
    for j in range(jobs.shape[0]):
        n = _list_pixels(masks[jobs[j, 0]], width, jobs[j, 1], jobs[j, 2], jobs[j, 3], jobs[j, 4], where, rows)
        for i in range(np.uint64(n)):
            src = np.uint64(where[i]) * pixel
            r[i], g[i], b[i] = (_linear(base[src], table), _linear(base[src + plane], table),
                                _linear(base[src + plane + plane], table))
            r2[i], g2[i], b2[i] = (_linear(other[src], table), _linear(other[src + plane], table),
                                   _linear(other[src + plane + plane], table))
        _blend_all((r, g, b, r2, g2, b2), (red, green, blue), n, weights[j], m)
        _put(out, pixel, plane, where, n, red, green, blue)


@_jit
def _blend_all(base, new, n, w, m):
    """``base``: the base's and the other's linear R, G, B (six arrays); ``new``: where the blended
    sRGB goes (three). Separate arrays: rows of one would stop LLVM vectorising the loop."""
    r, g, b, r2, g2, b2 = base
    out_r, out_g, out_b = new
    for i in range(np.uint64(n)):  # unsigned: no negative-index wraparound, which stops LLVM vectorising
        out_r[i], out_g[i], out_b[i] = _blend(r[i], g[i], b[i], r2[i], g2[i], b2[i], w, m)


def _flat(image: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """A (3, H, W) CPU image's memory as a flat NumPy view, with its pixel and channel strides:
    channels-last (3, 1) or planar (1, H * W); other layouts are an error (callers clone into one)."""
    if channels_last(image):
        return image.permute(1, 2, 0).reshape(-1).numpy(), 3, 1
    if image.is_contiguous():
        return image.reshape(-1).numpy(), 1, image.shape[1] * image.shape[2]
    raise ValueError(f"image strides {image.stride()}: neither channels-last nor planar")


def writable_copy(image: torch.Tensor) -> torch.Tensor:
    """A copy of a (3, H, W) image that :func:`_flat` reads: its own layout if that is channels-last
    or planar, else planar."""
    return image.clone() if image.is_contiguous() or channels_last(image) else image.contiguous()


def net_coefficients(params: torch.Tensor, ctx: torch.Tensor) -> np.ndarray:
    """(S, N_PARAMS) family parameters and (S, 4) XYXY context windows -> (S, N_COEFFS) rows for
    :func:`relight_image`: colour matrix and bias (times KNOTS), each curve's value at 0 and its
    slope steps, the log shading grid, the window's corner and its grid units per pixel."""
    matrix, bias, per_t, intercept, grid = family_tables(params.detach().float())
    s = len(params)
    slope = per_t.view(s, 3, KNOTS)
    steps = torch.cat([slope[..., :1], slope.diff(dim=-1)], -1)  # the first slope, then its changes
    span = (ctx[:, 2:] - ctx[:, :2] - 1).clamp(min=1).float()  # context window size - 1, (x, y)
    rows = [matrix.reshape(s, 9), bias.reshape(s, 3), intercept.view(s, 3, KNOTS)[..., 0], steps.reshape(s, -1),
            grid.reshape(s, -1), ctx[:, :2].float(), (GRID - 1) / span]
    return torch.cat(rows, 1).contiguous().numpy()


def relight_segments(image: torch.Tensor, masks: torch.Tensor, jobs: np.ndarray, coeffs: np.ndarray) -> None:
    """:func:`relight_image` on a (3, H, W) CPU image (channels-last or planar), in place: job j
    (mask row, box x0, y0, x1, y1) relit with ``coeffs[j]``; ``masks`` (K, H, W) bool."""
    flat, pixel, plane = _flat(image)
    relight_image(flat, pixel, plane, image.shape[2], masks.reshape(len(masks), -1).numpy(), jobs, coeffs)


def lab_blend_segments(out: torch.Tensor, base: torch.Tensor, other: torch.Tensor, masks: torch.Tensor,
                       jobs: np.ndarray, weights: np.ndarray) -> None:
    """:func:`lab_blend_image` on (3, H, W) CPU images, writing into ``out`` (channels-last or
    planar; ``base`` and ``other`` are read in its layout, copied into it if theirs differs)."""
    m = lab_matrices(torch.float32, torch.device("cpu"))
    matrices = torch.cat([m["to_xyz"].reshape(-1), m["to_rgb"].reshape(-1)]).numpy()
    flat, pixel, plane = _flat(out)
    b, o = (_flat(x if x.stride() == out.stride() else torch.empty_like(out).copy_(x))[0] for x in (base, other))
    lab_blend_image(flat, b, o, pixel, plane, masks.reshape(len(masks), -1).numpy(), out.shape[2], jobs,
                    weights.astype(np.float32), matrices, srgb_table(torch.device("cpu")).numpy())
