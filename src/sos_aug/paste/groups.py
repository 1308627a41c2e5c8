"""The ``"groups"`` backend: warp and paste every hard-alpha piece of a batch at once, pieces of
similar size together (the accelerator path where the Triton kernels do not run).

Pasting piece by piece costs a few kernel launches and ~100 us of host time per piece; at B=16
with 10 pieces per image that host time, not the device, bounded the GPU paste. Here torch's
antialiased bilinear resize (``F.interpolate(..., antialias=True)``: same triangle filter, support
and normalisation) is written as two weight matrices per piece, so pieces of similar size resize
together in one batched matmul, and their masks and pixels land in the batch with one scatter per
group: the number of launches no longer grows with the number of pieces. The crop to the canvas
and the horizontal flip are folded into the weight matrices (which output rows and columns exist).
"""

from __future__ import annotations

import torch

from ..layout import Placement
from ..ops.masks import ALPHA_CUT
from ..ops.resize import aa_weights, full_fp32_matmul, warp_segment
from .geometry import Col, piece_table

# what one more group costs (its launches and host time), counted as matmul work it could pad
GROUP_COST_FLOPS = {"cpu": 3e7, "accelerator": 1e10}
GROUP_BYTES = 256 * 2**20  # most transient memory one group may take
# a piece whose dense resize alone is more multiply-adds than this (a very large piece, e.g. on a 4K
# canvas) is resized on its own by torch's kernel: its band matrices would be mostly zeros
DENSE_LIMIT = 8e9


def _group_flops(n: int, hs: int, ws: int, hc: int, wc: int) -> int:
    """Multiply-adds of resizing n pieces padded to these sizes, the cheaper axis first."""
    return 4 * n * min(hc * hs * ws + hc * ws * wc, hs * ws * wc + hc * hs * wc)


def _group_bytes(n: int, hs: int, ws: int, hc: int, wc: int) -> int:
    """Transient bytes of such a group: int64 gather index, float source, weights, halfway, output."""
    return n * (4 * hs * ws * 12 + 4 * (hc * wc + max(hc * ws, hs * wc)) * 4 + (hc * hs + wc * ws) * 4)


def group_rows(rows: list[list[int]], group_cost: float, dense_limit: float = DENSE_LIMIT) -> list[list[int]]:
    """Pieces grouped to resize together (indices into ``rows``): in order of size, a piece joins
    the current group while padding the group to it costs less than a group of its own
    (``group_cost`` flops for the launches) and the group stays under ``GROUP_BYTES``. A piece over
    ``dense_limit`` on its own always gets a group of its own."""
    order = sorted(range(len(rows)),
                   key=lambda r: max(rows[r][Col.HS], rows[r][Col.HC]) * max(rows[r][Col.WS], rows[r][Col.WC]))
    groups: list[list[int]] = []
    sizes = (0, 0, 0, 0)
    for r in order:
        row = rows[r]
        own = (row[Col.HS], row[Col.WS], row[Col.HC], row[Col.WC])
        grown = tuple(max(a, b) for a, b in zip(sizes, own))
        n = len(groups[-1]) if groups else 0
        joined = _group_flops(n + 1, *grown)
        apart = _group_flops(n, *sizes) + _group_flops(1, *own) + group_cost
        alone = _group_flops(1, *own) > dense_limit or (n == 1 and _group_flops(1, *sizes) > dense_limit)
        if groups and not alone and joined <= apart and _group_bytes(n + 1, *grown) <= GROUP_BYTES:
            groups[-1].append(r)
            sizes = grown
        else:
            groups.append([r])
            sizes = own
    return groups


def warp_group(flat: torch.Tensor, t: torch.Tensor, f: torch.Tensor, sizes: tuple[int, int, int, int],
               ar: torch.Tensor) -> torch.Tensor:
    """Resized, flipped and cropped pieces of one group as (G, 4, hc, wc) float 0..255, padded to the
    group's largest crop. ``t``/``f``: the group's integer and float piece rows on the device;
    ``sizes``: its largest (hs, ws, hc, wc); ``flat``: the segments' uint8 buffer; ``ar``: an
    ``arange`` at least as long as any size."""
    hs_max, ws_max, hc_max, wc_max = sizes
    g = len(t)
    col = lambda c: t[:, c].view(g, 1, 1)  # noqa: E731 - one piece number, broadcast over pixels
    pixel = (torch.minimum(ar[:hs_max].view(1, -1, 1), col(Col.HS1)) * col(Col.WS)
             + torch.minimum(ar[:ws_max].view(1, 1, -1), col(Col.WS1)) + col(Col.OFFSET))  # padding repeats edges
    channels = ar[:4].view(1, 1, 4, 1) * col(Col.PLANE).unsqueeze(3)
    src = flat[pixel.unsqueeze(2) + channels].float()  # (G, hs, 4, ws): both products are plain bmm
    arf = ar.float()
    rows = t[:, Col.CY0:Col.CY0 + 1] + arf[:hc_max]
    cols = t[:, Col.CA:Col.CA + 1] + t[:, Col.CS:Col.CS + 1] * arf[:wc_max]
    wy = aa_weights(rows, f[:, 0:1], f[:, 1:2], t[:, Col.HS:Col.HS + 1], ar[:hs_max])  # (G, hc, hs)
    wx = aa_weights(cols, f[:, 2:3], f[:, 3:4], t[:, Col.WS:Col.WS + 1], ar[:ws_max]).transpose(1, 2)  # (G, ws, wc)
    with full_fp32_matmul():  # contract the cheaper axis first
        if hc_max * hs_max * ws_max + hc_max * ws_max * wc_max < hs_max * ws_max * wc_max + hc_max * hs_max * wc_max:
            out = torch.bmm(torch.bmm(wy, src.view(g, hs_max, 4 * ws_max)).view(g, hc_max * 4, ws_max), wx)
        else:
            out = torch.bmm(wy, torch.bmm(src.view(g, hs_max * 4, ws_max), wx).view(g, hs_max, 4 * wc_max))
    return out.view(g, hc_max, 4, wc_max).transpose(1, 2)


def warp_groups(flat: torch.Tensor, segments: list[torch.Tensor], placements: list[Placement], height: int,
                width: int, kmax: int, group_cost: float | None = None,
                dense_limit: float = DENSE_LIMIT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every piece that lands on the canvas, resized, flipped and cropped, in groups of similar
    size: per group its piece-table rows on ``flat``'s device and its (G, 4, hc, wc) float pixels.
    ``group_cost`` and ``dense_limit``: see :func:`group_rows` (default group cost: that device's)."""
    dev = flat.device
    table = piece_table(segments, placements, height, width, kmax)
    rows, scales = table.ints, table.floats
    if group_cost is None:
        group_cost = GROUP_COST_FLOPS.get(dev.type, GROUP_COST_FLOPS["accelerator"])
    groups = group_rows(rows, group_cost, dense_limit)
    order = [r for grp in groups for r in grp]
    table = torch.tensor([rows[r] for r in order] or [[0] * len(Col)], dtype=torch.long).to(dev, non_blocking=True)
    ftable = torch.tensor([scales[r] for r in order] or [[0.0] * 4]).to(dev, non_blocking=True)
    ar = torch.arange(max([4, height, width] + [max(r[Col.HS], r[Col.WS]) for r in rows]), device=dev)
    out, start = [], 0
    for grp in groups:
        t, f = table[start : start + len(grp)], ftable[start : start + len(grp)]
        start += len(grp)
        sizes = tuple(max(rows[r][c] for r in grp) for c in (Col.HS, Col.WS, Col.HC, Col.WC))
        if len(grp) == 1 and _group_flops(1, *sizes) > dense_limit:
            out.append((t, _warp_alone(flat, rows[grp[0]])))
        else:
            out.append((t, warp_group(flat, t, f, sizes, ar)))
    return out


def _warp_alone(flat: torch.Tensor, row: list[int]) -> torch.Tensor:
    """One large piece warped by :func:`~sos_aug.ops.resize.warp_segment` (torch's kernel) and
    cropped, as a (1, 4, hc, wc) group."""

    segment = flat[row[Col.OFFSET] : row[Col.OFFSET] + 4 * row[Col.PLANE]].view(4, row[Col.HS], row[Col.WS]).float()
    piece = warp_segment(segment, row[Col.HO], row[Col.WO], row[Col.CS] < 0, 0.0)
    col0 = row[Col.CA] if row[Col.CS] > 0 else row[Col.WO] - 1 - row[Col.CA]  # the crop's first column, after the flip
    return piece[:, row[Col.CY0] : row[Col.CY0] + row[Col.HC], col0 : col0 + row[Col.WC]][None]


def paste_groups(images: torch.Tensor, segments: list[torch.Tensor], flat: torch.Tensor,
                 placements: list[Placement], kmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite every piece of a (B, 3, H, W) batch (hard alpha, no rotation), in paste order.

    Returns the composited batch (uint8 rounded once, or float in [0, 1] as given), the (B, K, H, W)
    hard mask of every piece and the topmost piece at each pixel (1-based, 0 = none), from a fixed
    number of launches per group of similar-size pieces.
    """
    b, _, height, width = images.shape
    dev = images.device
    groups = warp_groups(flat, segments, placements, height, width, kmax)
    full_flat = torch.zeros(b * kmax * height * width + 1, dtype=torch.bool, device=dev)  # last: discarded writes
    ar = torch.arange(max(height, width, 4), device=dev)
    warped = []
    for t, pieces in groups:
        hc, wc = pieces.shape[-2:]
        inside = (ar[:hc] < t[:, Col.HC:Col.HC + 1]).unsqueeze(2) & (ar[:wc] < t[:, Col.WC:Col.WC + 1]).unsqueeze(1)
        mask = inside.logical_and_(pieces[:, 3] >= ALPHA_CUT)
        ys = (t[:, Col.Y0:Col.Y0 + 1] + ar[:hc]).clamp_(max=height - 1)
        xs = (t[:, Col.X0:Col.X0 + 1] + ar[:wc]).clamp_(max=width - 1)
        pixel = ys.unsqueeze(2) * width + xs.unsqueeze(1)  # (G, hc, wc) position on the canvas
        full_flat[torch.where(mask, t[:, Col.FULL_AT].view(-1, 1, 1) + pixel, len(full_flat) - 1)] = True
        warped.append((t, _as_image_values(pieces[:, :3], images.dtype), mask, pixel))  # drop alpha and floats
    full = full_flat[:-1].view(b, kmax, height, width)
    top = topmost(full)
    out_flat = torch.empty(b * 3 * height * width + 1, dtype=images.dtype, device=dev)
    out = out_flat[:-1].view(b, 3, height, width)
    out.copy_(images)
    channel = (ar[:3] * (height * width)).view(1, 3, 1, 1)
    for t, values, mask, pixel in warped:  # each pixel written once, by its topmost piece
        topmost_slot = top.view(-1)[t[:, Col.TOP_AT].view(-1, 1, 1) + pixel]
        on_top = mask.logical_and_(topmost_slot == t[:, Col.SLOT1].view(-1, 1, 1))
        where = (t[:, Col.OUT_AT].view(-1, 1, 1) + pixel).unsqueeze(1) + channel
        out_flat[torch.where(on_top.unsqueeze(1), where, len(out_flat) - 1)] = values
    return out, full, top


def _as_image_values(rgb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float 0..255 pixels as the batch stores them: uint8 rounded once, or floats in [0, 1]."""
    return rgb.round().clamp_(0, 255).to(torch.uint8) if dtype == torch.uint8 else (rgb / 255).to(dtype)


def topmost(full: torch.Tensor) -> torch.Tensor:
    """The topmost piece at each pixel of (B, K, H, W) piece masks: 1-based slot, 0 where none."""
    b, kmax, height, width = full.shape
    slot_type = torch.uint8 if kmax < 256 else torch.int16
    if kmax == 0:
        return torch.zeros(b, height, width, dtype=slot_type, device=full.device)
    slot = torch.arange(1, kmax + 1, device=full.device, dtype=slot_type).view(1, kmax, 1, 1)
    as_slots = full.view(torch.uint8) if slot_type == torch.uint8 else full.to(slot_type)  # a view: no copy
    return (as_slots * slot).amax(1)
