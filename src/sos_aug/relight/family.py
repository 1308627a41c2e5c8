"""The relighting transform family: what a relighter may do to a segment's pixels.

A segment's colours go through ``x -> shade(curve(A x + b))``: an affine colour matrix, monotone
per-channel piecewise-linear curves, and a coarse multiplicative shading grid spread over the
segment's context window. All-zero parameters are the identity. The net predicts these parameters
at low resolution; they are applied at full resolution to the segment's pixels only, and the same
family is what the oracle and the teacher distillation fit.
"""

from __future__ import annotations

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


def family_tables(params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The family's parameters as per-segment tables, for pixel-by-pixel application: colour matrix
    and bias (times KNOTS), each curve piece's slope per unit of t = x * KNOTS and its value at
    t = 0 (S, 3 * KNOTS), and the log shading grid."""
    s = params.shape[0]
    matrix = torch.eye(3, device=params.device, dtype=params.dtype) + params[:, :9].view(s, 3, 3)
    # curves on t = x * K: f(t) = knots[i] + (t - i) * slope[i] / K = intercept[i] + t * slope[i] / K
    slope = torch.exp(params[:, N_AFFINE : N_AFFINE + N_CURVE].view(s, 3, KNOTS).clamp(-4, 4))
    knots = torch.cat([torch.zeros_like(slope[..., :1]), torch.cumsum(slope, -1) / KNOTS], -1)
    steps = torch.arange(KNOTS, device=params.device, dtype=params.dtype)
    per_t = slope / KNOTS
    intercept = knots[..., :KNOTS] - steps * per_t
    return (matrix * KNOTS, params[:, 9:12].reshape(s, 3, 1, 1) * KNOTS, per_t.reshape(s, -1),
            intercept.reshape(s, -1), params[:, N_AFFINE + N_CURVE :].reshape(s, GRID, GRID))


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
    matrix, bias, per_t, intercept, _ = family_tables(params)
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
