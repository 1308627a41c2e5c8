"""The relighter interface and the classical relighters: SOS's Lab blending and Reinhard transfer.

A relighter is a callable on a :class:`RelightBatch` (composites, the composites before any
relighting, and each image's visible pasted masks in paste order) returning new images. Only
pixels under pasted masks may change; :func:`relight` enforces that after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as nnf

from .color import lab_to_rgb, rgb_to_lab

Relighter = Callable[["RelightBatch"], list]


@dataclass
class RelightBatch:
    images: list[torch.Tensor]  # (3, H, W) float in [0, 1]: the current composites
    plain: list[torch.Tensor]  # the composites before any relighting
    masks: list[torch.Tensor]  # (K, H, W) bool visible pasted masks, in paste order


def relight(relighters: Relighter | Sequence[Relighter], batch: RelightBatch) -> list[torch.Tensor]:
    """Run relighters in order (``[RelightNet.pretrained(), LabBlend()]`` composes); background pixels
    are restored from the plain composite after every step, so they never change."""
    chain = list(relighters) if isinstance(relighters, (list, tuple)) else [relighters]
    for step in chain:
        out = step(batch)
        images = []
        for new, plain, masks in zip(out, batch.plain, batch.masks):
            covered = masks.any(0) if len(masks) else torch.zeros(plain.shape[-2:], dtype=torch.bool,
                                                                     device=plain.device)
            images.append(torch.where(covered, new, plain))
        batch = replace(batch, images=images)
    return batch.images


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square dilation, as two 1-D max-pools (a k x k pool costs k² per pixel)."""
    k = 2 * radius + 1
    x = nnf.max_pool2d(mask.float()[None, None], (1, k), stride=1, padding=(0, radius))
    return nnf.max_pool2d(x, (k, 1), stride=1, padding=(radius, 0))[0, 0] > 0


def _window(mask: torch.Tensor, grow: int = 0) -> tuple[slice, slice]:
    """The mask's box grown by ``grow`` pixels, clipped: every relighter works inside such windows."""
    ys = mask.any(1).nonzero().flatten()
    xs = mask.any(0).nonzero().flatten()
    h, w = mask.shape
    return (slice(max(0, int(ys[0]) - grow), min(h, int(ys[-1]) + 1 + grow)),
            slice(max(0, int(xs[0]) - grow), min(w, int(xs[-1]) + 1 + grow)))


class ReinhardTransfer:
    """Per segment, match Lab mean and std to the background in a ring around it (not the whole
    image), by ``strength`` in [0, 1]. The ring is ``ring`` x the segment's size wide (>= 3 px) and
    excludes every pasted segment."""

    def __init__(self, strength: float = 1.0, ring: float = 0.15):
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.strength, self.ring = strength, ring

    def __call__(self, batch: RelightBatch) -> list[torch.Tensor]:
        out = []
        for image, plain, masks in zip(batch.images, batch.plain, batch.masks):
            result = image.clone()
            pasted = masks.any(0) if len(masks) else None
            for m in masks:
                if not m.any():
                    continue
                radius = max(3, int(self.ring * int(m.sum()) ** 0.5))
                win = _window(m, radius + 1)
                mw = m[win]
                ring = _dilate(mw, radius) & ~pasted[win]
                if int(ring.sum()) < 8:
                    continue
                lab = rgb_to_lab(result[(slice(None), *win)][None])[0]
                ref = rgb_to_lab(plain[(slice(None), *win)][None])[0]
                fg_mean, fg_std = _stats(lab, mw)
                bg_mean, bg_std = _stats(ref, ring)
                moved = (lab - fg_mean) / fg_std * bg_std + bg_mean
                mixed = lab_to_rgb((lab + self.strength * (moved - lab))[None])[0]
                view = result[(slice(None), *win)]
                view.copy_(torch.where(mw, mixed, view))
            out.append(result)
        return out


def _stats(lab: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    px = lab[:, m]
    return px.mean(1).view(3, 1, 1), px.std(1).nan_to_num(0).clamp(min=1e-3).view(3, 1, 1)


class LabBlend:
    """SOS's mask-area-weighted blending in Lab.

    Segments of an image are ranked by visible area, r in [0, 1] from smallest to largest, and get
    w = 0.3 + 0.6 * sigmoid(-10 (r - 0.5)). The output L is w * L_relit + (1 - w) * L_plain: w is the
    share of the *relit* lighting, so small segments (w near 0.9) take on the scene's light almost
    fully, while large ones (w near 0.3) keep most of their own shading and texture, which a
    relighter degrades most visibly on big objects. a/b come from ``ab`` ("relit" or "plain").
    Used alone (nothing relit yet), the relit image is :class:`ReinhardTransfer`'s.
    """

    def __init__(self, ab: str = "relit", fallback: Relighter | None = None):
        if ab not in ("relit", "plain"):
            raise ValueError(f"ab must be 'relit' or 'plain', got {ab!r}")
        self.ab = ab
        self.fallback = fallback or ReinhardTransfer()

    @staticmethod
    def weights(areas: torch.Tensor) -> torch.Tensor:
        """Per-segment share of the relit L, from the segments' areas (see the class docstring)."""
        k = len(areas)
        if k == 0:
            return areas.float()
        rank = torch.empty(k, device=areas.device)
        rank[torch.argsort(areas, stable=True)] = torch.arange(k, device=areas.device, dtype=torch.float)
        r = rank / max(k - 1, 1)
        return 0.3 + 0.6 * torch.sigmoid(-10 * (r - 0.5))

    def __call__(self, batch: RelightBatch) -> list[torch.Tensor]:
        relit_images = batch.images
        if all(a is b or torch.equal(a, b) for a, b in zip(batch.images, batch.plain)):
            relit_images = self.fallback(batch)
        out = []
        for relit, plain, masks in zip(relit_images, batch.plain, batch.masks):
            result = relit.clone()
            weights = self.weights(masks.flatten(1).sum(1)) if len(masks) else []
            for wk, m in zip(weights, masks):
                if not m.any():
                    continue
                win = _window(m)
                lab_r = rgb_to_lab(relit[(slice(None), *win)][None])[0]
                lab_p = rgb_to_lab(plain[(slice(None), *win)][None])[0]
                L = wk * lab_r[:1] + (1 - wk) * lab_p[:1]
                ab = lab_r[1:] if self.ab == "relit" else lab_p[1:]
                blended = lab_to_rgb(torch.cat([L, ab])[None])[0]
                view = result[(slice(None), *win)]
                view.copy_(torch.where(m[win], blended, view))
            out.append(result)
        return out
