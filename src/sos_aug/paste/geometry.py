"""Where pasted pieces land: a segment's warped patch centred on its layout box and clipped to
the canvas (:func:`clip_window`, :class:`PastedPiece`), and for the batched backends the host
numbers of every piece of a batch in one typed table (:class:`PieceTable`) that the size-group and
the Triton backends both read by its column names."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from ..layout import Placement
from ..ops.masks import ALPHA_THRESHOLD


def clip_window(box: list[float], ph: int, pw: int, height: int, width: int):
    """Where a (ph, pw) patch centred on ``box`` lands: (patch crop, canvas window), or None if off-canvas."""
    bx0, by0, bx1, by1 = (int(v) for v in box)
    y0 = by0 + ((by1 - by0) - ph) // 2
    x0 = bx0 + ((bx1 - bx0) - pw) // 2
    cy0, cx0 = max(0, -y0), max(0, -x0)
    cy1, cx1 = min(ph, height - y0), min(pw, width - x0)
    if cy1 <= cy0 or cx1 <= cx0:
        return None
    crop = (slice(cy0, cy1), slice(cx0, cx1))
    return crop, (slice(y0 + cy0, y0 + cy1), slice(x0 + cx0, x0 + cx1))


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


def place_piece(patch: torch.Tensor, box: list[float], height: int, width: int) -> PastedPiece | None:
    """Centre a warped patch on its layout box (XYXY) and clip it to the canvas; None when nothing is left."""
    where = clip_window(box, patch.shape[-2], patch.shape[-1], height, width)
    if where is None:
        return None
    crop, window = where
    patch = patch[(slice(None), *crop)]
    alpha = patch[3]
    mask = alpha >= ALPHA_THRESHOLD
    if not bool(mask.any()):
        return None
    return PastedPiece(patch[:3], alpha, mask, window[0].start, window[1].start)


class Col(IntEnum):
    """The integer columns of a :class:`PieceTable` row."""

    FULL_AT = 0  # where the piece's full-mask plane starts in the (B, K, H, W) stack
    TOP_AT = 1  # where its image's plane starts in the (B, H, W) topmost map
    OUT_AT = 2  # where its image starts in the (B, 3, H, W) output
    SLOT1 = 3  # its 1-based slot in the image
    OFFSET = 4  # where its segment starts in the flat segment buffer
    PLANE = 5  # the segment's plane size (hs * ws)
    HS = 6  # segment height and width
    WS = 7
    HS1 = 8  # and minus one
    WS1 = 9
    CY0 = 10  # first row of the resized piece that lands on the canvas
    CA = 11  # first column (after the flip) and column step (+1, or -1 when flipped)
    CS = 12
    Y0 = 13  # the canvas position of the landing crop
    X0 = 14
    HC = 15  # the landing crop's height and width
    WC = 16
    HO = 17  # the resized (unclipped) piece's height and width
    WO = 18


@dataclass
class PieceTable:
    """Every piece of a batch that lands on its canvas, one row each: ``ints`` (columns :class:`Col`)
    and ``floats`` (per axis: the scale hs / ho and the inverse filter support, y then x)."""

    ints: list[list[int]]
    floats: list[list[float]]

    def __len__(self) -> int:
        return len(self.ints)


def piece_table(segments: list[torch.Tensor], placements: list[Placement], height: int, width: int,
                kmax: int) -> PieceTable:
    """Every piece of a (B, 3, height, width) batch that lands on the canvas, with ``kmax`` slots
    per image (``placements[b].segment`` indexes ``segments``, which share one flat buffer)."""
    offsets, start = [], 0
    for seg in segments:
        offsets.append(start)
        start += seg.numel()
    hw = height * width
    rows, scales = [], []
    for i, placement in enumerate(placements):
        draws = zip(placement.boxes.tolist(), placement.segment.tolist(), placement.flip.tolist())
        for k, (box, seg, flip) in enumerate(draws):
            bx0, by0, bx1, by1 = (int(v) for v in box)
            ho, wo = by1 - by0, bx1 - bx0
            where = clip_window(box, ho, wo, height, width)
            if where is None:
                continue
            (cy, cx), (wy, wx) = where
            hs, ws = segments[seg].shape[-2:]
            col_start, step = (wo - 1 - cx.start, -1) if flip else (cx.start, 1)  # crop after flip
            rows.append([(i * kmax + k) * hw, i * hw, i * 3 * hw, k + 1, offsets[seg], hs * ws, hs, ws, hs - 1,
                         ws - 1, cy.start, col_start, step, wy.start, wx.start, cy.stop - cy.start,
                         cx.stop - cx.start, ho, wo])
            scales.append([hs / ho, 1 / max(hs / ho, 1.0), ws / wo, 1 / max(ws / wo, 1.0)])
    return PieceTable(rows, scales)
