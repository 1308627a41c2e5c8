"""The relighter interface and the classical relighters: SOS's Lab blending and Reinhard transfer.

A relighter is a callable on a :class:`RelightBatch` (composites, the composites before any
relighting, and each image's visible pasted masks in paste order) returning new images. Only
pixels under pasted masks may change; :func:`relight` enforces that after each step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops import backends
from ..ops.buffers import channels_last
from ..ops.color import cube_root_knee, encode_srgb, lab_matrices, lab_to_rgb, linear_rgb, rgb_to_lab
from ..ops.masks import count_pixels, row_owners, stacked_boxes, tight_boxes
from .batch import RelightBatch, Relighter, by_device, relight_one, to_unit
from .cpu_kernel import lab_blend_segments, writable_copy


def _windows(masks: torch.Tensor, grow: int | torch.Tensor = 0,
             boxes: torch.Tensor | None = None) -> list[tuple[slice, slice] | None]:
    """Each mask's box (its tight XYXY box: ``boxes`` where given, else computed) grown by ``grow``
    pixels and clipped (None for an empty mask)."""

    h, w = masks.shape[-2:]
    grow = torch.as_tensor(grow).expand(len(masks)).tolist()
    out = []
    for (x0, y0, x1, y1), g in zip((tight_boxes(masks) if boxes is None else boxes).int().tolist(), grow):
        out.append(None if x1 <= x0 else (slice(max(0, y0 - g), min(h, y1 + g)), slice(max(0, x0 - g), min(w, x1 + g))))
    return out


class ReinhardTransfer:
    """Per segment, match Lab mean and std to the background in a ring around it (not the whole
    image), by ``strength`` in [0, 1]. The ring is the segment's box grown by ``ring`` x its size
    (>= 3 px), minus every pasted segment: the background right around and behind the object."""

    def __init__(self, strength: float = 1.0, ring: float = 0.15):
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.strength, self.ring = strength, ring

    def __call__(self, batch: RelightBatch) -> list[torch.Tensor]:
        return by_device(batch.images, batch.plain, batch.masks, self.transfer_windows, self.transfer_batched,
                         batch.boxes)

    def ring_widths(self, areas: torch.Tensor) -> torch.Tensor:
        """How far each segment's box grows into its ring: ``ring`` x sqrt(area), at least 3 pixels."""
        return (self.ring * areas.double().sqrt()).floor().long().clamp(min=3)

    def transfer_windows(self, image: torch.Tensor, plain: torch.Tensor, masks: torch.Tensor,
                          boxes: torch.Tensor | None = None) -> torch.Tensor:
        """The CPU path, segment by segment over its grown box: only the segment's and its ring's
        pixels go through Lab, and only the segment's come back."""

        result = image.clone()
        background = masks.view(torch.uint8).amax(0) == 0  # outside every pasted segment
        for m, win in zip(masks, _windows(masks, self.ring_widths(count_pixels(masks)), boxes)):
            if win is None:
                continue
            mw = m[win]
            ring = background[win]
            if int(ring.sum()) < 8:
                continue
            # only the segment's pixels and its ring go through Lab (and only the segment back)
            inside, around = (_pixel_index(m, win, image.shape[-1]) for m in (mw, ring))
            lab = _lab_pixels(_get_pixels(result, inside))
            ref = _lab_pixels(_get_pixels(plain, around))
            fg_mean, fg_std = _stats(lab)
            bg_mean, bg_std = _stats(ref)
            moved = (lab - fg_mean) / fg_std * bg_std + bg_mean
            _put_pixels(result, inside, lab_to_rgb(lab + self.strength * (moved - lab)))
        return result

    def transfer_batched(self, images: torch.Tensor, plain: torch.Tensor, masks: list[torch.Tensor],
                         boxes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The accelerator path for a (B, 3, H, W) batch: every segment's ring as one (S, H, W) mask,
        the segments' and the rings' pixels listed once, their Lab statistics summed per segment, the
        segments' pixels moved and written back at once (two waits on the device, not several per
        segment). Same rules as :meth:`transfer_windows`."""

        dev, (height, width) = images.device, images.shape[-2:]
        segs = torch.cat([m.bool() for m in masks])  # (S, H, W), segment s of image owner[s]
        owner = row_owners([len(m) for m in masks], dev)
        area = count_pixels(segs)
        grow = self.ring_widths(area)
        box = stacked_boxes(segs, boxes).long()
        lo = (box[:, :2] - grow[:, None]).clamp(min=0)  # the grown box, (x, y)
        hi = torch.minimum(box[:, 2:] + grow[:, None], torch.tensor([width, height], device=dev))
        free = torch.stack([m.bool().any(0) for m in masks]).logical_not_()  # (B, H, W): no segment there
        rows, cols = torch.arange(height, device=dev), torch.arange(width, device=dev)
        in_rows = (rows >= lo[:, 1:]) & (rows < hi[:, 1:])  # (S, H)
        in_cols = (cols >= lo[:, :1]) & (cols < hi[:, :1])  # (S, W)
        ring = in_rows.unsqueeze(2) & in_cols.unsqueeze(1) & free[owner]  # (S, H, W): grown box, no segment
        fs, fy, fx = segs.nonzero(as_tuple=True)
        rs, ry, rx = ring.nonzero(as_tuple=True)
        img = owner[fs]
        pixels = images[img, :, fy, fx]  # (N, 3): the segments' pixels
        lab = rgb_to_lab(to_unit(pixels).T)
        fg_mean, fg_std, _ = _stats_per_segment(lab, fs, len(segs))
        bg_mean, bg_std, n_ring = _stats_per_segment(rgb_to_lab(to_unit(plain[owner[rs], :, ry, rx]).T), rs,
                                                     len(segs))
        moved = (lab - fg_mean[:, fs]) / fg_std[:, fs] * bg_std[:, fs] + bg_mean[:, fs]
        rgb = lab_to_rgb(lab + self.strength * (moved - lab)).T  # (N, 3) in [0, 1]
        if images.dtype == torch.uint8:
            rgb = (rgb * 255).round().clamp(0, 255)
        applies = (n_ring >= 8)[fs, None]  # a ring of under 8 pixels: left as it is
        result = images.clone()
        result[img, :, fy, fx] = torch.where(applies, rgb.to(images.dtype), pixels)
        return result


def _stats(px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (unbiased, as ``torch.std``) of (3, n) pixels, as (3, 1); the std by
    two passes, much faster on the CPU than ``torch.std``'s single-pass algorithm."""
    mean = px.mean(1, keepdim=True)
    centred = px - mean
    var = (centred * centred).sum(1, keepdim=True) / (px.shape[1] - 1)  # one pixel: 0 / 0
    return mean, var.sqrt().nan_to_num(0).clamp(min=1e-3)


def _stats_per_segment(px: torch.Tensor, seg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_stats` of (3, N) pixels grouped by their segment ``seg`` (N,), for ``n`` segments:
    (3, n) means and stds and (n,) pixel counts, from one pass of float64 sums (in which the
    variance's cancellation costs nothing visible)."""
    x = px.double().T
    count = torch.zeros(n, dtype=torch.float64, device=px.device).index_add_(0, seg, torch.ones_like(x[:, 0]))
    total = torch.zeros(n, 3, dtype=torch.float64, device=px.device).index_add_(0, seg, x)
    squares = torch.zeros(n, 3, dtype=torch.float64, device=px.device).index_add_(0, seg, x * x)
    mean = total / count.clamp(min=1)[:, None]
    var = (squares - total * mean) / (count - 1)[:, None]  # unbiased, as torch.std; one pixel: 0 / 0
    std = var.clamp(min=0).sqrt().nan_to_num(0).clamp(min=1e-3)
    return mean.T.float(), std.T.float(), count


def _lab_pixels(rgb: torch.Tensor) -> torch.Tensor:
    """(3, n) pixels (uint8 or [0, 1]) -> (3, n) Lab (kornia's, computed by matrix products)."""
    return rgb_to_lab(rgb if rgb.dtype == torch.uint8 else to_unit(rgb))


def _pixel_index(mask_window: torch.Tensor, win: tuple[slice, slice], width: int) -> torch.Tensor:
    """Flat indices (y * W + x) into an image of width ``width`` of the pixels set in
    ``mask_window``, the window ``win`` of a mask."""
    ys, xs = mask_window.nonzero(as_tuple=True)
    return (ys + win[0].start) * width + xs + win[1].start


def _get_pixels(image: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(3, n) values of pixels ``idx`` (flat y * W + x) of a (3, H, W) image, planar or channels-last,
    gathered straight from its memory (no copy of a window first)."""
    if channels_last(image):
        return image.permute(1, 2, 0).reshape(-1, 3).index_select(0, idx).T
    # planar: one gather over the three channel rows (cheaper than index_select along dim 1)
    return image.reshape(3, -1).gather(1, idx.expand(3, -1))


def _put_pixels(image: torch.Tensor, idx: torch.Tensor, rgb: torch.Tensor) -> None:
    """Write (3, n) RGB pixels in [0, 1] into pixels ``idx`` of a dense (3, H, W) image, in place."""
    if image.dtype == torch.uint8:
        rgb = (rgb * 255).round_().clamp_(0, 255)
    rgb = rgb.to(image.dtype)
    if channels_last(image):
        image.permute(1, 2, 0).view(-1, 3).index_copy_(0, idx, rgb.T)
    else:  # one scatter over the three channel rows (cheaper than index_copy_ along dim 1)
        image.view(3, -1).scatter_(1, idx.expand(3, -1), rgb)


class LabBlend:
    """SOS's mask-area-weighted blending in Lab.

    Segments of an image are ranked by visible area, r in [0, 1] from smallest to largest, and get
    w = 0.3 + 0.6 * sigmoid(-10 (r - 0.5)). The output L is w * L_relit + (1 - w) * L_plain: w is the
    share of the *relit* lighting, so small segments (w near 0.9) take on the scene's light almost
    fully, while large ones (w near 0.3) keep most of their own shading and texture, which a
    relighter degrades most visibly on big objects. a/b come from ``ab``: ``"plain"`` (default) keeps
    the unrelit composite's colour, as SOS's released code does; ``"relit"`` takes the relighter's.
    Used alone (nothing relit yet), the relit image is :class:`ReinhardTransfer`'s.
    """

    compiles_cpu_code = True  # its CPU pixel loop: warm_up compiles it

    def __init__(self, ab: str = "plain", fallback: Relighter | None = None):
        if ab not in ("relit", "plain"):
            raise ValueError(f"ab must be 'relit' or 'plain', got {ab!r}")
        self.ab = ab
        self.fallback = fallback or ReinhardTransfer()

    @staticmethod
    def weights(areas: torch.Tensor) -> torch.Tensor:
        """Per-segment share of the relit L, from one image's segments' areas (see the class docstring)."""
        return area_rank_weights(areas, torch.zeros(len(areas), dtype=torch.long, device=areas.device))

    def __call__(self, batch: RelightBatch) -> list[torch.Tensor]:
        relit_images = batch.images
        if not batch.relit:  # LabBlend first (or alone): blend toward its fallback's relighting
            relit_images = relight_one(self.fallback, batch)
        return by_device(relit_images, batch.plain, batch.masks, self.blend_windows, self.blend_batched, batch.boxes)

    def blend_windows(self, relit: torch.Tensor, plain: torch.Tensor, masks: torch.Tensor,
                      boxes: torch.Tensor | None = None) -> torch.Tensor:
        """The CPU path: each segment's pixels (found in its box) blended in one compiled loop
        (:func:`.cpu_kernel.lab_blend_segments`)."""
        result = writable_copy(relit)
        windows = _windows(masks, boxes=boxes)
        segments = [(k, win) for k, win in enumerate(windows) if win is not None]
        if not segments:
            return result
        inside = masks.numpy()
        areas = torch.tensor([0 if win is None else int(np.count_nonzero(inside[k][win]))
                              for k, win in enumerate(windows)])
        weights = self.weights(areas)[[k for k, _ in segments]]  # those segments' weights (counted in their boxes)
        jobs = np.array([(k, xs.start, ys.start, xs.stop, ys.stop) for k, (ys, xs) in segments], dtype=np.int64)
        base, other = (relit, plain) if self.ab == "relit" else (plain, relit)
        share = (1 - weights) if self.ab == "relit" else weights  # the share of ``other``'s L
        lab_blend_segments(result, base, other, masks.bool(), jobs, share.numpy())
        return result

    def blend_batched(self, relit: torch.Tensor, plain: torch.Tensor, masks: list[torch.Tensor],
                      boxes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The accelerator path: every pasted pixel of a same-size batch at once. On CUDA one Triton
        kernel walks each segment's box and blends the pixels under its mask (no pixel list, no wait
        on the device); elsewhere, or if it fails, the pixels are listed and blended by torch."""

        segs = torch.cat([m.bool() for m in masks])
        owner = row_owners([len(m) for m in masks], relit.device)
        weights = area_rank_weights(count_pixels(segs), owner)
        relit_ab = self.ab == "relit"

        def by_torch() -> torch.Tensor:
            seg, y, x = segs.nonzero(as_tuple=True)
            img = owner[seg]
            result = relit.clone()
            result[img, :, y, x] = blend_pixels(relit[img, :, y, x], plain[img, :, y, x], weights[seg], relit_ab)
            return result

        if not backends.available(relit.device, "lab_blend"):
            return by_torch()
        from .lab_kernel import lab_blend_pixels

        tight = stacked_boxes(segs, boxes)
        return backends.run_or_fallback(
            "lab_blend", lambda: lab_blend_pixels(relit, plain, segs, owner, tight, weights, relit_ab), by_torch)


def area_rank_weights(areas: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """:meth:`LabBlend.weights` of every image's segments at once, on the device, without a wait:
    each segment's rank by area among its own image's segments (ties in paste order, as a stable
    sort), from one comparison of all segment pairs (a batch has a few hundred)."""
    order = torch.arange(len(areas), device=areas.device)
    same = owner[:, None] == owner[None, :]
    below = (areas[None, :] < areas[:, None]) | ((areas[None, :] == areas[:, None]) & (order[None, :] < order[:, None]))
    rank = (same & below).sum(1).float()
    r = rank / (same.sum(1) - 1).clamp(min=1).float()
    return 0.3 + 0.6 * torch.sigmoid(-10 * (r - 0.5))


def blend_pixels(relit: torch.Tensor, plain: torch.Tensor, weight: torch.Tensor, relit_ab: bool) -> torch.Tensor:
    """LabBlend on (N, 3) pixels (uint8 or [0, 1]) with a weight each, the accelerator's torch path
    (:func:`blend_lightness`). Not compiled: compiling cost far more than it saved per batch
    (docs/performance.md). Returns the new pixels in ``relit``'s dtype."""
    out = blend_lightness(relit.T, plain.T, weight, relit_ab).T
    if relit.dtype == torch.uint8:
        return out.mul_(255).round_().to(torch.uint8)
    return out.to(relit.dtype)


def blend_lightness(relit: torch.Tensor, plain: torch.Tensor, weight: float | torch.Tensor,
                    relit_ab: bool) -> torch.Tensor:
    """LabBlend's arithmetic on (3, n) pixels (uint8 or float in [0, 1]): L = w L_relit + (1 - w) L_plain,
    a/b from the plain (or relit) pixels; new pixels (3, n) in [0, 1]. Computed in Lab's f-space,
    where keeping a and b while L changes moves f(X), f(Y) and f(Z) by the same amount: the side that
    gives a/b is converted, the other only to f(Y), and nothing goes through Lab itself (the same
    values as converting both sides to Lab and back, with fewer passes)."""
    base, other, w = (relit, plain, 1 - weight) if relit_ab else (plain, relit, weight)
    base, other = (x if x.dtype == torch.uint8 else to_unit(x) for x in (base, other))
    lin = linear_rgb(base)
    m = lab_matrices(lin.dtype, lin.device)
    f = cube_root_knee(m["to_xyz"] @ lin)  # (3, n): f(X), f(Y), f(Z) of the base
    f_other = cube_root_knee(m["to_xyz"][1:2] @ linear_rgb(other))  # (1, n): f(Y) of the other
    f.add_(f_other.sub_(f[1:2]).mul_(w))
    f[2].clamp_(min=0)
    xyz = torch.where(f > 0.2068966, f * f * f, f.sub(4 / 29).div_(7.787))
    return encode_srgb(m["to_rgb"] @ xyz)
