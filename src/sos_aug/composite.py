"""Compositing one image and updating its targets exactly, touching only the pasted regions.

Paste order matters: later segments cover earlier ones, and all cover the existing instances. The
rules this module guarantees (and the property tests check):

* an existing mask loses exactly the pixels covered by pasted masks; a pasted mask loses exactly the
  pixels of later pasted masks;
* every box whose mask changed is the tight pixel-edge box of the visible mask (``x1`` = last column
  + 1, as COCO and mmdet count); untouched instances keep their boxes;
* with hard alpha, pixels under a pasted mask are the warped segment's pixels and pixels outside
  every pasted footprint are the input's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .layout import Placement

ALPHA_THRESHOLD = 128  # alpha >= this is inside the object's mask


@dataclass
class DropRule:
    """When an occluded instance is dropped.

    ``visible_fraction``: keep while visible area / area before occlusion >= ``min_visible``.
    ``mmdet``: mmdet's CopyPaste rule, keep while every box edge moved <= ``box_threshold`` px or
    more than ``mask_threshold`` pixels remain. Crowd regions are kept while any pixel remains.
    """

    mode: str = "visible_fraction"
    min_visible: float = 0.25
    box_threshold: float = 10.0
    mask_threshold: int = 300

    def __post_init__(self):
        if self.mode not in ("visible_fraction", "mmdet"):
            raise ValueError(f"unknown drop rule {self.mode!r}; use 'visible_fraction' or 'mmdet'")

    def keep(self, visible: torch.Tensor, before: torch.Tensor, old_box: torch.Tensor, new_box: torch.Tensor,
             crowd: torch.Tensor) -> torch.Tensor:
        if self.mode == "visible_fraction":
            ok = visible.double() >= self.min_visible * before.double()
        else:
            moved = (new_box - old_box).abs().amax(1) if len(old_box) else torch.zeros(0, device=visible.device)
            ok = (moved <= self.box_threshold) | (visible > self.mask_threshold)
        ok = torch.where(crowd, torch.ones_like(ok), ok)
        return ok & (visible > 0)


def warp_segment(rgba: torch.Tensor, height: int, width: int, flip: bool, angle: float) -> torch.Tensor:
    """Resize (antialiased), flip and rotate a (4, h, w) uint8 segment; rotation grows the canvas."""
    out = rgba
    if tuple(out.shape[-2:]) != (height, width):
        out = F.resize(out, [height, width], antialias=True)
    if flip:
        out = out.flip(-1)
    if angle:
        out = F.rotate(out, float(angle), interpolation=InterpolationMode.BILINEAR, expand=True)
    return out


@dataclass
class PastedPiece:
    """A warped segment clipped to the canvas: pixels, hard mask and its canvas window."""

    rgb: torch.Tensor  # (3, h, w) uint8
    alpha: torch.Tensor  # (h, w) uint8
    mask: torch.Tensor  # (h, w) bool
    y0: int
    x0: int

    @property
    def window(self) -> tuple[slice, slice]:
        h, w = self.mask.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


def place_piece(patch: torch.Tensor, box: torch.Tensor, height: int, width: int) -> PastedPiece | None:
    """Centre a warped patch on its layout box and clip it to the canvas; None when nothing is left."""
    ph, pw = patch.shape[-2:]
    bx0, by0, bx1, by1 = (int(v) for v in box.tolist())
    y0 = by0 + ((by1 - by0) - ph) // 2
    x0 = bx0 + ((bx1 - bx0) - pw) // 2
    cy0, cx0 = max(0, -y0), max(0, -x0)
    cy1, cx1 = min(ph, height - y0), min(pw, width - x0)
    if cy1 <= cy0 or cx1 <= cx0:
        return None
    patch = patch[:, cy0:cy1, cx0:cx1]
    alpha = patch[3]
    mask = alpha >= ALPHA_THRESHOLD
    if not bool(mask.any()):
        return None
    return PastedPiece(patch[:3], alpha, mask, y0 + cy0, x0 + cx0)


def composite(image: torch.Tensor, pieces: list[PastedPiece], feather_sigma: float = 0.0) -> torch.Tensor:
    """Paste pieces in order into a copy of ``image`` ((3, H, W) uint8 or float in [0, 1]).

    Hard alpha copies the segment's pixels under its mask; feathering blends with a Gaussian-blurred
    alpha (sigma in pixels), so edges soften while the mask stays the hard one.
    """
    out = image.clone()
    for piece in pieces:
        window = out[(slice(None), *piece.window)]
        rgb = piece.rgb if out.dtype == torch.uint8 else piece.rgb.to(out.dtype) / 255
        if feather_sigma > 0:
            window.copy_(_blend(window, rgb, piece.alpha, feather_sigma))
        else:
            window.copy_(torch.where(piece.mask, rgb, window))
    return out


def _blend(window: torch.Tensor, rgb: torch.Tensor, alpha: torch.Tensor, sigma: float) -> torch.Tensor:
    import kornia

    ksize = 2 * int(3 * sigma) + 1
    hard = (alpha >= ALPHA_THRESHOLD).float()[None, None]
    a = kornia.filters.gaussian_blur2d(hard, (ksize, ksize), (sigma, sigma), border_type="constant")[0]
    mixed = window.float() * (1 - a) + rgb.float() * a
    return mixed.round().to(window.dtype) if window.dtype == torch.uint8 else mixed.to(window.dtype)


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Pixel-edge XYXY boxes of (N, H, W) masks (x1 = last column + 1); all zeros for an empty mask.

    torchvision's ``masks_to_boxes`` returns inclusive corners and loops per mask; this is one
    reduction per axis.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)
    y0 = rows.to(torch.uint8).argmax(1)
    y1 = h - rows.flip(1).to(torch.uint8).argmax(1)
    x0 = cols.to(torch.uint8).argmax(1)
    x1 = w - cols.flip(1).to(torch.uint8).argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return boxes * rows.any(1, keepdim=True)


@dataclass
class PasteResult:
    image: torch.Tensor
    masks: torch.Tensor  # (N + K', H, W) bool, existing first
    boxes: torch.Tensor  # (N + K', 4) XYXY
    area: torch.Tensor
    keep_existing: torch.Tensor  # (N,) bool: which existing instances survive
    pasted_kept: torch.Tensor  # (K,) bool over pieces: which pasted survive
    piece_segment: torch.Tensor  # (K,) which fetched segment each piece came from


def paste_into(
    image: torch.Tensor,
    masks: torch.Tensor,
    boxes: torch.Tensor,
    crowd: torch.Tensor,
    segments: list[torch.Tensor],
    placement: Placement,
    drop: DropRule,
    feather_sigma: float = 0.0,
) -> PasteResult:
    """Warp, place and composite one image's segments, and update its instances exactly."""
    _, height, width = image.shape
    pieces, piece_segment = [], []
    for k in range(len(placement)):
        box = placement.boxes[k]
        seg = segments[int(placement.segment[k])]
        patch = warp_segment(seg, int(box[3] - box[1]), int(box[2] - box[0]), bool(placement.flip[k]),
                             float(placement.angle[k]))
        piece = place_piece(patch, box, height, width)
        if piece is not None:
            pieces.append(piece)
            piece_segment.append(int(placement.segment[k]))
    out_image = composite(image, pieces, feather_sigma)
    n, k = len(masks), len(pieces)
    all_masks = torch.empty((n + k, height, width), dtype=torch.bool, device=image.device)
    all_masks[:n] = masks
    all_masks[n:] = False
    lost = torch.zeros(n, dtype=torch.long, device=image.device)
    for piece in pieces:  # existing instances lose what any piece covers
        window = all_masks[(slice(0, n), *piece.window)]
        lost += (window & piece.mask).flatten(1).sum(1)
        window &= ~piece.mask
    covered = torch.zeros((height, width), dtype=torch.bool, device=image.device)
    pasted_full = torch.zeros(k, dtype=torch.long, device=image.device)
    pasted_visible = torch.zeros(k, dtype=torch.long, device=image.device)
    pasted_boxes = torch.zeros(k, 4, device=image.device)
    pasted_full_boxes = torch.zeros(k, 4, device=image.device)
    for j in range(k - 1, -1, -1):  # a piece loses what later pieces cover
        piece = pieces[j]
        under = covered[piece.window]
        visible = piece.mask & ~under
        all_masks[(n + j, *piece.window)] = visible
        under |= piece.mask
        offset = torch.tensor([piece.x0, piece.y0, piece.x0, piece.y0], device=image.device)
        pasted_boxes[j] = tight_boxes(visible[None])[0] + offset * visible.any()
        pasted_full_boxes[j] = tight_boxes(piece.mask[None])[0] + offset
        pasted_full[j] = piece.mask.sum()
        pasted_visible[j] = visible.sum()
    touched = (lost > 0).nonzero().flatten()
    before = torch.zeros(n, dtype=torch.long, device=image.device)
    new_boxes = boxes.clone().float()
    if len(touched):
        before[touched] = masks[touched].flatten(1).sum(1)
        new_boxes[touched] = tight_boxes(all_masks[touched])
    visible_existing = before - lost
    keep_existing = torch.ones(n, dtype=torch.bool, device=image.device)
    if len(touched):
        keep_existing[touched] = drop.keep(visible_existing[touched], before[touched], boxes[touched].float(),
                                           new_boxes[touched], crowd[touched])
    no_crowd = torch.zeros(k, dtype=torch.bool, device=image.device)
    pasted_kept = drop.keep(pasted_visible, pasted_full, pasted_full_boxes, pasted_boxes, no_crowd)
    keep = torch.cat([keep_existing, pasted_kept])
    out_masks = all_masks if bool(keep.all()) else all_masks[keep]
    area_existing = torch.where(lost > 0, visible_existing, -torch.ones_like(lost))  # -1: unchanged
    return PasteResult(
        image=out_image,
        masks=out_masks,
        boxes=torch.cat([new_boxes, pasted_boxes])[keep],
        area=torch.cat([area_existing, pasted_visible])[keep],
        keep_existing=keep_existing,
        pasted_kept=pasted_kept,
        piece_segment=torch.tensor(piece_segment, dtype=torch.long),
    )
