"""Training and evaluation samples for relighting, from real photos and real instance masks.

A sample is a context window (a mask's box grown 2x) of a real photo, the mask in it, and the
window with its foreground perturbed; the net learns to undo the perturbation from the context.
Data is multiplied the way harmonization needs: masks transplanted onto other images and places
(the region under a transplanted mask is real content, consistent with its surroundings), random
scales and flips, and a global colour jitter of the whole window so that only foreground-vs-context
consistency can be learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf

from ...coco import Skips, annotated_photos
from ...ops.color import rgb_to_lab
from ...ops.masks import masked_stats


def resize_photo(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 pixels -> (3, h, w) float in [0, 1], antialiased."""
    img = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()[None] / 255
    return nnf.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def downsample_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A full-resolution bool mask at ``size``: the pixels at least half covered."""
    return nnf.interpolate(torch.from_numpy(mask).float()[None, None], size=size, mode="area")[0, 0] >= 0.5


def lab_stats(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(6,): the Lab mean and std of ``image``'s pixels under ``mask``."""
    mean, std = masked_stats(rgb_to_lab(image[None], dim=1), mask[None, None].float())
    return torch.cat([mean, std], 1).flatten()


@dataclass
class Instance:
    image: int  # index into the pool's images
    mask: torch.Tensor  # (h, w) bool at pool resolution
    category: int
    lab_stats: torch.Tensor  # (6,) foreground Lab mean and std in its own photo


class InstancePool:
    """Images (long side ``side``) and their non-crowd instance masks above ``min_area`` pixels.
    Unreadable images and bad segmentations are left out and counted in ``skipped``."""

    def __init__(self, ann_file: str | Path, images: str | Path, side: int = 320, min_area: int = 400,
                 image_ids: list[int] | None = None, skips: Skips | None = None):
        self.images: list[torch.Tensor] = []
        self.instances: list[Instance] = []
        self.image_ids: list[int] = []
        self.skipped = Skips() if skips is None else skips
        for info, rgb, pairs in annotated_photos(ann_file, images, image_ids, self.skipped):
            h, w = rgb.shape[:2]
            scale = side / max(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            img = resize_photo(rgb, size)
            idx = len(self.images)
            self.images.append(img)
            self.image_ids.append(info["id"])
            for a, mask in pairs:
                m = downsample_mask(mask, size)
                if int(m.sum()) < min_area * scale * scale:
                    continue
                self.instances.append(Instance(idx, m, a["category_id"], lab_stats(img, m)))

        self.by_category: dict[int, list[int]] = {}
        for i, inst in enumerate(self.instances):
            self.by_category.setdefault(inst.category, []).append(i)

    def __len__(self) -> int:
        return len(self.instances)


def crop_window(image: torch.Tensor, mask: torch.Tensor, size: int, context: float = 2.0,
                shift: tuple[float, float] = (0.0, 0.0)):
    """The context window of ``mask`` (its box grown ``context`` x, its centre moved by ``shift`` of
    the box size) resized to ``size``: (3+1, s, s)."""
    ys, xs = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    y0, y1, x0, x1 = ys[0].item(), ys[-1].item() + 1, xs[0].item(), xs[-1].item() + 1
    cy, cx = (y0 + y1) / 2 + shift[0] * (y1 - y0), (x0 + x1) / 2 + shift[1] * (x1 - x0)
    hh, hw = max(1.0, (y1 - y0) * context / 2), max(1.0, (x1 - x0) * context / 2)
    h, w = mask.shape
    ya, yb = max(0, int(cy - hh)), min(h, int(np.ceil(cy + hh)))
    xa, xb = max(0, int(cx - hw)), min(w, int(np.ceil(cx + hw)))
    stack = torch.cat([image[:, ya:yb, xa:xb], mask[None, ya:yb, xa:xb].float()])[None]
    out = nnf.interpolate(stack, size=(size, size), mode="bilinear", align_corners=False)[0]
    out[3] = (out[3] >= 0.5).float()
    return out


def training_batch(pool: InstancePool, n: int, size: int, g: torch.Generator, transplant: float = 0.7,
                   jitter: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` windows: (images (n, 3, s, s), alphas (n, 1, s, s), reference Lab stats (n, 6) of other
    real objects for the transfer perturbation)."""
    images, alphas, refs = [], [], []
    while len(images) < n:
        inst = pool.instances[int(torch.randint(len(pool), (1,), generator=g))]
        image = pool.images[inst.image]
        mask = inst.mask
        if torch.rand(1, generator=g).item() < transplant:  # the mask's shape over another photo's content
            image = pool.images[int(torch.randint(len(pool.images), (1,), generator=g))]
            mask = _transplant(mask, image.shape[-2:], g)
            if mask is None:
                continue
        if jitter:  # the window's extent and centre vary around the deployed 2x box
            context = float(torch.empty(1).uniform_(1.6, 3.0, generator=g))
            shift = tuple(float(v) for v in torch.empty(2).uniform_(-0.15, 0.15, generator=g))
            window = crop_window(image, mask, size, context, shift)
        else:
            window = crop_window(image, mask, size)
        if window[3].sum() < 16:
            continue
        if torch.rand(1, generator=g).item() < 0.5:
            window = window.flip(-1)
        images.append(_global_jitter(window[:3], g) if jitter else window[:3])
        alphas.append(window[3:])
        refs.append(_reference(pool, inst.category, g).lab_stats)
    return torch.stack(images), torch.stack(alphas), torch.stack(refs)


def _reference(pool: InstancePool, category: int, g: torch.Generator) -> Instance:
    """Another real object for the transfer perturbation: of the same category half of the time."""
    if torch.rand(1, generator=g).item() < 0.5:
        same = pool.by_category.get(category, [])
        if len(same) > 1:
            return pool.instances[same[int(torch.randint(len(same), (1,), generator=g))]]
    return pool.instances[int(torch.randint(len(pool), (1,), generator=g))]


def _transplant(mask: torch.Tensor, size, g: torch.Generator) -> torch.Tensor | None:
    ys, xs = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    shape = mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1].float()
    scale = float(torch.empty(1).uniform_(0.5, 1.5, generator=g))
    h, w = size
    sh, sw = max(4, int(shape.shape[0] * scale)), max(4, int(shape.shape[1] * scale))
    if sh >= h or sw >= w:
        return None
    shape = nnf.interpolate(shape[None, None], size=(sh, sw), mode="bilinear", align_corners=False)[0, 0] >= 0.5
    y = int(torch.randint(0, h - sh + 1, (1,), generator=g))
    x = int(torch.randint(0, w - sw + 1, (1,), generator=g))
    out = torch.zeros(h, w, dtype=torch.bool)
    out[y : y + sh, x : x + sw] = shape
    return out


def _global_jitter(rgb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The same colour change over the whole window (gains, gamma, hue, saturation): context and
    foreground stay consistent, so only their consistency can be learned."""
    import kornia

    gain = torch.exp(0.1 * torch.randn(3, 1, 1, generator=g))
    gamma = float(torch.exp(0.15 * torch.randn(1, generator=g)))
    out = (rgb * gain).clamp(0, 1) ** gamma
    hue = float(torch.empty(1).uniform_(-0.3, 0.3, generator=g))
    sat = float(torch.exp(0.2 * torch.randn(1, generator=g)))
    out = kornia.enhance.adjust_hue(out[None], hue)[0]
    return kornia.enhance.adjust_saturation(out[None], sat)[0].clamp(0, 1)
