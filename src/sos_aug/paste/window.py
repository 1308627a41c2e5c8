"""The ``"window"`` backend: one image at a time, touching only the window each piece lands in (the
CPU's fastest), and the compositing of pieces into an image that the batched loop shares."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..layout import Placement
from ..ops.masks import count_pixels, mask_stats, tight_boxes
from ..ops.resize import warp_segment
from .geometry import PastedPiece, place_piece
from .rules import DropRule, Instances, PasteResult


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
            window.copy_(blend(window, rgb, piece.mask, feather_sigma))
        else:
            write_under(window, rgb, piece.mask)
    return out


def write_under(window: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> None:
    """``window[:, mask] = new[:, mask]`` in place, for a (C, h, w) window (a view into an image)
    and a (h, w) bool mask; uint8 windows by bit selection, far cheaper than ``torch.where`` on CPU."""
    if window.dtype == torch.uint8:
        keep = mask.view(torch.uint8) - 1  # 0 under the mask, 255 elsewhere
        window.bitwise_and_(keep).bitwise_or_(new & ~keep)
    else:
        window.copy_(torch.where(mask, new, window))


def blend(window: torch.Tensor, rgb: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """``rgb`` over ``window`` through the mask's alpha blurred by a Gaussian of ``sigma`` pixels."""
    import kornia

    ksize = 2 * int(3 * sigma) + 1
    a = kornia.filters.gaussian_blur2d(mask.float()[None, None], (ksize, ksize), (sigma, sigma),
                                       border_type="constant")[0]
    mixed = window.float() * (1 - a) + rgb.float() * a
    return mixed.round().to(window.dtype) if window.dtype == torch.uint8 else mixed.to(window.dtype)


def _zeros(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A zeroed bool tensor; on CPU from calloc (via NumPy), so pages never written cost nothing."""
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(shape, dtype=bool))
    return torch.zeros(shape, dtype=torch.bool, device=device)


def _stacked(masks: torch.Tensor, k: int) -> torch.Tensor:
    """(N + k, H, W) bool: the N masks, then k zeroed rows for the pieces. Each byte written once
    (a zeroed stack would be cleared and then overwritten where the masks go)."""
    out = torch.empty((len(masks) + k, *masks.shape[1:]), dtype=torch.bool, device=masks.device)
    out[: len(masks)].view(torch.uint8).copy_(masks.view(torch.uint8))
    out[len(masks) :].view(torch.uint8).zero_()
    return out


def _compact(rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``rows[keep]`` without a new allocation: kept rows slide down in place; returns a view."""
    kept = keep.nonzero().flatten().tolist()
    for dst, src in enumerate(kept):
        if dst != src:
            rows[dst].copy_(rows[src])
    return rows[: len(kept)]


def paste_window(
    image: torch.Tensor,
    instances: Instances,
    segments: Sequence[torch.Tensor],
    placement: Placement,
    piece_labels: torch.Tensor,
    drop: DropRule,
    feather_sigma: float = 0.0,
    tight: bool = True,
) -> PasteResult:
    """The ``"window"`` backend: warp, place and composite one image's segments, and update its
    instances exactly (``tight``: every box its mask's tight box, else untouched ones keep theirs).

    Tensor work stays in the pasted windows (plus one pass over each instance a piece covers); the
    per-piece bookkeeping (counts, boxes) is Python numbers from :func:`mask_stats`, so each piece
    costs a few dispatched operations rather than dozens."""
    image = image.as_subclass(torch.Tensor)
    masks, boxes, crowd = instances.masks.bool(), instances.boxes, instances.crowd.bool()
    _, height, width = image.shape
    pieces, slots = [], []
    draws = zip(placement.boxes.tolist(), placement.segment.tolist(), placement.flip.tolist(),
                placement.angle.tolist())
    for slot, (box, seg, flip, angle) in enumerate(draws):
        bx0, by0, bx1, by1 = (int(v) for v in box)
        patch = warp_segment(segments[seg], by1 - by0, bx1 - bx0, bool(flip), float(angle))
        piece = place_piece(patch, box, height, width)
        if piece is not None:
            pieces.append(piece)
            slots.append(slot)
    out_image = composite(image, pieces, feather_sigma)
    device = image.device
    n, k = len(masks), len(pieces)
    all_masks = _stacked(masks, k)
    # bool ops run through uint8 views (0/1): several times faster on CPU, same bits
    bytes_ = all_masks.view(torch.uint8)
    touched = torch.zeros(n, dtype=torch.uint8, device=device)
    for piece in pieces:  # existing instances lose what any piece covers (in place, window only)
        window = bytes_[(slice(0, n), *piece.window)]
        m = piece.mask.view(torch.uint8)
        if n:
            touched |= (window & m).amax((1, 2))
        window &= m ^ 1
    covered = _zeros((height, width), device).view(torch.uint8)
    full, seen = [(0, [0] * 4)] * k, [(0, [0] * 4)] * k  # per piece: (count, canvas box), full and visible
    for j in range(k - 1, -1, -1):  # a piece loses what later pieces cover
        piece = pieces[j]
        under = covered[piece.window]
        m = piece.mask.view(torch.uint8)
        visible = m & (under ^ 1)
        bytes_[(n + j, *piece.window)] = visible
        under |= m
        full[j] = _on_canvas(mask_stats(piece.mask), piece)
        visible_count = int(count_pixels(visible.view(torch.bool)))
        if visible_count == full[j][0]:  # nothing later covers it
            seen[j] = full[j]
        elif visible_count:
            seen[j] = _on_canvas(mask_stats(visible.view(torch.bool)), piece)
    pasted_full, full_boxes = _as_tensors(full, device)
    pasted_visible, pasted_boxes = _as_tensors(seen, device)
    touched_rows = touched.nonzero().flatten().tolist()
    # untouched masks are the input's: their tight boxes, which also tell an empty mask: no instance,
    # dropped (never returned with a zero box), unless a crowd region, known then by its box alone
    tight_old = tight_boxes(masks) if len(touched_rows) < n else None
    new_boxes = boxes.clone().float() if not tight or tight_old is None else tight_old
    keep_existing = torch.ones(n, dtype=torch.bool, device=device)
    if tight_old is not None:
        empty = tight_old[:, 2] <= tight_old[:, 0]
        keep_existing = ~empty | crowd
        new_boxes[empty] = boxes[empty].float()
    counts = None if instances.area is not None else count_pixels(masks).to(device)  # once, when not given
    area = instances.area.to(device).float().clone() if counts is None else counts.float()
    if touched_rows:  # full-canvas work, only for the instances a piece covered
        before = (counts[touched_rows] if counts is not None else
                  torch.tensor([int(count_pixels(masks[i])) for i in touched_rows], device=device))
        now, now_boxes = _as_tensors([mask_stats(all_masks[i]) for i in touched_rows], device)
        rows = torch.tensor(touched_rows, device=device)
        area[rows], new_boxes[rows] = now.to(area.dtype), now_boxes
        keep_existing[rows] = drop.keep(now, before, boxes[rows].float(), now_boxes, crowd[rows])
    no_crowd = torch.zeros(k, dtype=torch.bool, device=device)
    piece_kept = drop.keep(pasted_visible, pasted_full, full_boxes, pasted_boxes, no_crowd)
    keep = torch.cat([keep_existing, piece_kept])
    pasted_kept = torch.zeros(len(placement), dtype=torch.bool)
    pasted_kept[slots] = piece_kept.cpu()
    new_labels = piece_labels.to(device)[torch.tensor(slots, dtype=torch.long, device=device)]
    labels = torch.cat([instances.labels.to(device)[keep_existing], new_labels[piece_kept].to(instances.labels.dtype)])
    n_kept = int(keep_existing.sum())
    return PasteResult(
        image=out_image,
        masks=_compact(all_masks, keep),
        boxes=torch.cat([new_boxes, pasted_boxes])[keep],
        area=torch.cat([area, pasted_visible.to(area.dtype)])[keep],
        labels=labels,
        iscrowd=torch.cat([crowd[keep_existing].long(), torch.zeros(len(labels) - n_kept, dtype=torch.long,
                                                                    device=device)]),
        is_pasted=torch.arange(len(labels), device=device) >= n_kept,
        keep_existing=keep_existing,
        pasted_kept=pasted_kept,
    )


def _on_canvas(stats: tuple[int, list[int]], piece: PastedPiece) -> tuple[int, list[int]]:
    """A piece-window :func:`mask_stats` with its box moved to canvas coordinates."""
    count, (x0, y0, x1, y1) = stats
    if count == 0:
        return stats
    return count, [x0 + piece.x0, y0 + piece.y0, x1 + piece.x0, y1 + piece.y0]


def _as_tensors(stats: list[tuple[int, list[int]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, box) pairs as an int64 count tensor and a float (N, 4) box tensor."""
    counts = torch.tensor([c for c, _ in stats], dtype=torch.long, device=device)
    boxes = torch.tensor([b for _, b in stats], dtype=torch.float32, device=device).view(-1, 4)
    return counts, boxes
