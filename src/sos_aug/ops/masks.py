"""Masks and boxes: pixel counts, tight boxes and alpha cuts, computed the same way everywhere
(compositing, relighting, the COCO reader and the bank all stand on these)."""

from __future__ import annotations

import numpy as np
import torch

ALPHA_THRESHOLD = 128  # uint8 alpha >= this is inside the object's mask
# The same cut on float alpha: round(alpha) >= 128. Binary segment alpha resized lands on exactly 127.5 often
# (a pixel centred on an edge); float kernels put it a hair either side (torch's CUDA kernel differs
# from its CPU one there; docs/performance.md), so the cut sits 1e-2 lower and every float path, on
# any device, agrees on those pixels (and with the uint8 kernel, which rounds them up).
ALPHA_CUT = ALPHA_THRESHOLD - 0.5 - 1e-2


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Pixel-edge XYXY boxes of (N, H, W) bool masks (x1 = last column + 1); zeros for an empty mask.

    torchvision's ``masks_to_boxes`` returns inclusive corners and loops per mask; this is one
    max-reduction per axis on a uint8 view (bool reductions are many times slower on CPU).
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    as_bytes = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).view(torch.uint8)
    rows = as_bytes.amax(2)
    if masks.device.type != "cpu":  # one reduction for all masks: no per-mask launches on accelerators
        return boxes_from_projections(rows, as_bytes.amax(1))
    # on the CPU each mask's column projection reads only the rows it spans (an object spans a
    # fraction of the image's height): ~20% less time for COCO's masks at 1024²
    first, last = rows.argmax(1).tolist(), (h - rows.flip(1).argmax(1)).tolist()
    cols = torch.zeros(n, w, dtype=torch.uint8)
    for i, (y0, y1, present) in enumerate(zip(first, last, rows.amax(1).tolist())):
        if present:
            torch.amax(as_bytes[i, y0:y1], 0, out=cols[i])
    return boxes_from_projections(rows, cols)


def boxes_from_projections(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Pixel-edge XYXY boxes from (M, H) and (M, W) uint8 projections (1 where any pixel is set)."""
    h, w = rows.shape[1], cols.shape[1]
    y0, y1 = rows.argmax(1), h - rows.flip(1).argmax(1)
    x0, x1 = cols.argmax(1), w - cols.flip(1).argmax(1)
    return torch.stack([x0, y0, x1, y1], 1).float() * rows.amax(1, keepdim=True)


def counts_and_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel counts and :func:`tight_boxes` of (M, H, W) bool masks from two reductions (per-row
    counts, per-column max) instead of three: what the batched path needs on an accelerator."""
    if len(masks) == 0:
        return torch.zeros(0, dtype=torch.long, device=masks.device), torch.zeros(0, 4, device=masks.device)
    as_bytes = masks.view(torch.uint8)
    per_row = row_counts(as_bytes)
    return per_row.sum(1).long(), boxes_from_projections((per_row > 0).to(torch.uint8), as_bytes.amax(1))


def row_counts(as_bytes: torch.Tensor) -> torch.Tensor:
    """Set pixels in each row of (M, H, W) uint8 0/1 masks, as int32, reading the masks once: eight
    columns at a time as one int64 whose bytes each count one column (no carry while W / 8 <= 255),
    then the eight byte counts added. (A sum with ``dtype=int32`` first converts the whole stack.)"""
    m, h, w = as_bytes.shape
    packs = (w % 8 == 0 and w // 8 <= 255 and as_bytes.stride(2) == 1 and as_bytes.storage_offset() % 8 == 0
             and as_bytes.stride(0) % 8 == 0 and as_bytes.stride(1) % 8 == 0)
    if not packs:
        return as_bytes.sum(2, dtype=torch.int32)
    lanes = as_bytes.view(torch.int64).sum(2)  # (M, H): byte j counts columns j, j + 8, j + 16, ...
    return lanes.view(torch.uint8).view(m, h, 8).sum(2, dtype=torch.int32)


def row_owners(counts: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Which image each row of a batch's concatenated per-image rows belongs to (``counts`` rows per
    image), built on the host: a ``repeat_interleave`` over device counts would wait on the device."""
    owners = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)], dtype=torch.long)
    return owners.to(device, non_blocking=True) if device is not None else owners


def count_pixels(masks: torch.Tensor) -> torch.Tensor:
    """Pixels set in each (..., H, W) bool mask, as int64; NumPy's popcount path on CPU."""
    if masks.device.type == "cpu":  # per-mask count_nonzero beats an axis reduction
        flat = masks.numpy().reshape(-1, *masks.shape[-2:])
        counts = np.fromiter((np.count_nonzero(m) for m in flat), np.int64, len(flat))
        return torch.from_numpy(counts.reshape(masks.shape[:-2]))
    if masks.numel() == 0:
        return torch.zeros(masks.shape[:-2], dtype=torch.long, device=masks.device)
    rows = row_counts(masks.reshape(-1, *masks.shape[-2:]).view(torch.uint8))
    return rows.sum(1).long().view(masks.shape[:-2])


def mask_stats(mask: torch.Tensor) -> tuple[int, list[int]]:
    """Pixel count and tight pixel-edge XYXY box (zeros when empty) of one (h, w) bool mask, as
    Python numbers; through NumPy on the CPU (cheaper than torch's reductions for a piece's window,
    where per-call overhead dominates)."""
    if mask.device.type != "cpu":
        count, box = counts_and_boxes(mask[None])
        return int(count[0]), [int(v) for v in box[0].tolist()]
    as_bytes = mask.numpy().view(np.uint8)
    rows = np.flatnonzero(as_bytes.max(1))
    if len(rows) == 0:
        return 0, [0, 0, 0, 0]
    cols = np.flatnonzero(as_bytes.max(0))
    return int(np.count_nonzero(as_bytes)), [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def stacked_boxes(segs: torch.Tensor, boxes: list[torch.Tensor] | None) -> torch.Tensor:
    """(S, 4) float tight XYXY boxes of a batch's stacked (S, H, W) masks: the caller's per-image
    boxes where it has them (CopyPaste does), else computed from the masks."""

    return tight_boxes(segs) if boxes is None else torch.cat(boxes).to(segs.device).float()


def mask_01(mask: torch.Tensor) -> torch.Tensor:
    """A (h, w) mask as contiguous uint8 0/1: what compiled CPU loops read fast (bool loads, and
    ``where`` on them, do not vectorise), applied there as ``x + (new - x) * mask``."""
    as_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    return as_bytes.contiguous()


def filled_boxes(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H, W) bool masks of the pixels whose centres lie inside each XYXY box (at least the pixel
    holding the box's centre, so a box thinner than a pixel still counts as visible)."""
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5
    b = boxes.float().reshape(-1, 4)
    inside_y = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])
    inside_x = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])
    masks = inside_y[:, :, None] & inside_x[:, None, :]
    empty = ~masks.flatten(1).any(1)
    if empty.any():
        cx = ((b[empty, 0] + b[empty, 2]) / 2).long().clamp(0, w - 1)
        cy = ((b[empty, 1] + b[empty, 3]) / 2).long().clamp(0, h - 1)
        masks[empty.nonzero().flatten(), cy, cx] = True
    return masks


def masked_stats(x: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel mean and std of x under alpha, shaped (S, C, 1, 1)."""
    mean = masked_mean(x, alpha)
    var = masked_mean((x - mean) ** 2, alpha)
    return mean, var.clamp(min=1e-6).sqrt()


def masked_mean(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per-sample channel mean of (S, C, H, W) ``x`` weighted by (S, 1, H, W) ``alpha``, (S, C, 1, 1)."""
    return (x * alpha).sum((2, 3), keepdim=True) / alpha.sum((2, 3), keepdim=True).clamp(min=1e-6)
