"""The batched backends: a (B, 3, H, W) batch of same-size images at once, built for accelerators.
Pieces are warped and written by the ``"kernel"`` (:mod:`.kernel`), ``"groups"`` (:mod:`.groups`)
or, piece by piece, the loop here (the fallback for rotated or feathered pieces); occlusion, boxes,
areas, the drop rule and the gather of labels are whole-batch operations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layout import Placement
from ..ops import backends
from ..ops.buffers import consecutive_base, flat_base
from ..ops.masks import ALPHA_CUT, count_pixels, counts_and_boxes, row_owners
from ..ops.resize import warp_segment
from .geometry import clip_window
from .groups import paste_groups, topmost
from .rules import DropRule, Instances, PasteResult
from .window import blend


def _warp_float(rgba: torch.Tensor, height: int, width: int, flip: bool, angle: float) -> torch.Tensor:
    """:func:`warp_segment` on a float (4, h, w) segment in 0..255 (accelerator path: one
    interpolation kernel, rounding once for the whole batch); on the CPU through the uint8 kernel,
    bit-identical to the per-image path."""
    if rgba.device.type == "cpu":
        return warp_segment(rgba.round().to(torch.uint8), height, width, flip, angle).float()
    return warp_segment(rgba, height, width, flip, angle)


def paste_batch(
    images: torch.Tensor,
    instances: Sequence[Instances],
    segments: list[torch.Tensor],
    placements: Sequence[Placement],
    piece_labels: Sequence[torch.Tensor],
    drop: DropRule,
    feather_sigma: float = 0.0,
    backend: str = "loop",
    tight: bool = True,
) -> list[PasteResult]:
    """The batched backends: :func:`paste_window` for a (B, 3, H, W) batch at once, built for
    accelerators.

    Per piece it launches only a warp and two writes (its hard mask into a (B, K, H, W) stack, its
    pixels into the canvas) and never waits for the device; occlusion, boxes, areas, the drop rule
    and the gather of labels, crowd flags and ``is_pasted`` are whole-batch ops, and one device sync
    at the end learns which instances survive. ``backend`` (as :func:`choose_backend` resolves it)
    picks how pieces are warped and written: ``"kernel"`` all at once in two Triton kernels
    (:mod:`sos_aug.paste_kernel`; CUDA), ``"groups"`` all at once, grouped by size
    (:mod:`sos_aug.batched_warp`), ``"loop"`` piece by piece (on the CPU through the uint8 kernel,
    bit-identical to :func:`paste_window`). ``tight`` as :func:`paste_window`'s.
    """
    images = images.as_subclass(torch.Tensor)
    masks = [inst.masks for inst in instances]
    boxes = [inst.boxes for inst in instances]
    crowd = [inst.crowd for inst in instances]
    out_images, full, top, stats = _composite_batch(images, segments, placements, feather_sigma, backend)
    b, kmax = len(placements), max((len(p) for p in placements), default=0)
    occ = _occlusion((b, kmax, *images.shape[-2:]), masks, boxes, crowd, drop, full, top, stats)
    # one sync: which rows survive, gathered image by image in a single index_select
    keep_cpu = torch.cat([occ.keep_old, occ.keep_new]).cpu()
    order, counts = _survivor_order(keep_cpu, occ.n_per, [len(p) for p in placements], kmax)
    order_t = torch.tensor(order, dtype=torch.long, device=images.device)
    n_old = len(occ.old_visible)
    all_masks = occ.rows.index_select(0, order_t)
    # tight: every existing mask's tight box; an empty one (a crowd region kept) keeps the box it came with
    old_boxes = torch.where((occ.after > 0)[:, None], occ.visible_old_boxes, occ.new_boxes) if tight else occ.new_boxes
    all_boxes = torch.cat([old_boxes, occ.visible_boxes]).index_select(0, order_t)
    # untouched instances keep the area they came with (COCO's polygon area)
    untouched = _untouched_area(occ, [inst.area for inst in instances])
    existing_area = torch.where(occ.touched, occ.after.to(untouched.dtype), untouched)
    all_area = torch.cat([existing_area, occ.pasted_visible.to(untouched.dtype)]).index_select(0, order_t).float()
    extra = _gather_labels([inst.labels for inst in instances], occ.old_crowd, piece_labels, placements, kmax,
                           order_t, counts, n_old, images.device)
    results, start = [], 0
    for i, (m, bx, ar) in enumerate(zip(all_masks.split(counts), all_boxes.split(counts), all_area.split(counts))):
        k = len(placements[i])
        results.append(PasteResult(
            image=out_images[i], masks=m, boxes=bx, area=ar,
            labels=extra[i][0], iscrowd=extra[i][1], is_pasted=extra[i][2],
            keep_existing=occ.keep_old[start : start + occ.n_per[i]],
            pasted_kept=keep_cpu[n_old + i * kmax : n_old + i * kmax + k],  # on the CPU: no further sync
        ))
        start += occ.n_per[i]
    return results


def _composite_batch(images: torch.Tensor, segments: list[torch.Tensor], placements: list[Placement],
                     feather_sigma: float, backend: str):
    """Warp and paste every piece in order with ``backend`` (``"kernel"``, ``"groups"`` or
    ``"loop"``, as :func:`choose_backend` resolved it): the composited batch, each piece's full hard mask in a
    (B, K, H, W) stack (K = the most pieces of any image; None from the kernels, which never build
    it), the topmost piece per pixel when the path computed it, and the kernels' per-piece counts
    and boxes (else None). Python numbers only on the host, no wait for the device."""
    b, _, height, width = images.shape
    kmax = max((len(p) for p in placements), default=0)

    def groups():
        return (*paste_groups(images, segments, flat_base(segments), placements, kmax), None)

    if backend == "kernel":
        from .kernel import paste_kernels

        def kernel():
            out, top, stats = paste_kernels(images, segments, flat_base(segments), placements, kmax)
            return out, None, top, stats

        return backends.run_or_fallback("paste", kernel, groups)
    if backend == "groups":
        return groups()
    as_uint8 = images.dtype == torch.uint8
    canvas = images.float() if as_uint8 else images.clone()
    full = torch.zeros(b, kmax, height, width, dtype=torch.bool, device=images.device)
    source = _as_float(segments, sorted({int(i) for p in placements for i in p.segment.tolist()}))
    for i, placement in enumerate(placements):
        draws = zip(placement.boxes.tolist(), placement.segment.tolist(), placement.flip.tolist(),
                    placement.angle.tolist())
        for k, (box, seg, flip, angle) in enumerate(draws):
            bx0, by0, bx1, by1 = (int(v) for v in box)
            patch = _warp_float(source[seg], by1 - by0, bx1 - bx0, bool(flip), float(angle))
            where = clip_window(box, patch.shape[-2], patch.shape[-1], height, width)
            if where is None:
                continue
            crop, window = where
            if crop[0].stop - crop[0].start != patch.shape[-2] or crop[1].stop - crop[1].start != patch.shape[-1]:
                patch = patch[(slice(None), *crop)]
            mask = full[(i, k, *window)]
            torch.ge(patch[3], ALPHA_CUT, out=mask)  # = round(alpha) >= 128
            rgb = patch[:3] if as_uint8 else (patch[:3] / 255).to(canvas.dtype)
            view = canvas[(i, slice(None), *window)]
            if feather_sigma > 0:
                view.copy_(blend(view, rgb, mask, feather_sigma))
            else:
                torch.where(mask, rgb, view, out=view)
    return (canvas.round_().clamp_(0, 255).to(torch.uint8) if as_uint8 else canvas), full, None, None


@dataclass
class _Occlusion:
    """What pasting did to a batch's instances, as whole-batch tensors (existing rows image by image)."""

    n_per: list[int]  # existing instances per image
    rows: torch.Tensor  # (N + B * K, H, W): old_visible, then visible, in one buffer
    visible: torch.Tensor  # (B, K, H, W) pasted pieces minus later pieces (a view of rows)
    old_visible: torch.Tensor  # (N, H, W) existing masks minus every piece (a view of rows)
    before: torch.Tensor  # (N,) pixels of each existing mask before pasting
    after: torch.Tensor  # (N,) and after
    touched: torch.Tensor  # (N,) covered at all
    new_boxes: torch.Tensor  # (N, 4) tight boxes where touched, the given ones elsewhere
    visible_old_boxes: torch.Tensor  # (N, 4) tight boxes of every existing mask after pasting
    old_crowd: torch.Tensor  # (N,)
    keep_old: torch.Tensor  # (N,) survives the drop rule
    pasted_visible: torch.Tensor  # (B * K,) visible pixels of each piece
    visible_boxes: torch.Tensor  # (B * K, 4)
    keep_new: torch.Tensor  # (B * K,) survives the drop rule (padding slots never do)


def _occlusion(shape: tuple[int, int, int, int], masks: list[torch.Tensor], boxes: list[torch.Tensor],
               crowd: list[torch.Tensor], drop: DropRule, full: torch.Tensor | None, top: torch.Tensor | None,
               stats=None) -> _Occlusion:
    """Occlusion, counts, boxes and the drop rule for a (B, K, H, W) batch of pieces, from the
    topmost piece at each pixel (1-based; 0 = none; computed from ``full`` unless given). The pieces'
    counts and boxes come from ``stats`` (:class:`~sos_aug.paste_kernel.PieceStats`) where the
    kernels computed them, else from the ``full`` and visible mask stacks."""
    b, kmax, height, width = shape
    device = top.device if top is not None else full.device
    top = topmost(full) if top is None else top
    n_per = [len(m) for m in masks]
    n_old = sum(n_per)
    some = n_old > 0
    # the masks that can be returned, existing rows then piece slots, in one buffer (no copy to join them)
    rows = torch.empty(n_old + b * kmax, height, width, dtype=torch.bool, device=device)
    slot = torch.arange(1, kmax + 1, device=device, dtype=top.dtype).view(1, kmax, 1, 1)
    visible = torch.eq(top.unsqueeze(1), slot, out=rows[n_old:].view(b, kmax, height, width))
    old = torch.cat([m.bool() for m in masks]) if some else torch.zeros(0, height, width, dtype=torch.bool,
                                                                        device=device)
    old_visible = torch.logical_and(old, (top == 0)[row_owners(n_per, device)], out=rows[:n_old])
    before = count_pixels(old)
    after, visible_old_boxes = counts_and_boxes(old_visible)
    touched = after < before
    old_boxes = torch.cat([bx.float() for bx in boxes]) if some else torch.zeros(0, 4, device=device)
    new_boxes = torch.where(touched[:, None], visible_old_boxes, old_boxes)
    old_crowd = torch.cat(crowd).bool() if some else torch.zeros(0, dtype=torch.bool, device=device)
    # an empty mask is no instance: dropped (never returned with a zero box), unless a crowd region
    keep_old = (drop.keep(after, before, old_boxes, new_boxes, old_crowd) | ~touched) & ((after > 0) | old_crowd)
    if stats is None:
        pasted_full, full_boxes = counts_and_boxes(full.flatten(0, 1))
        pasted_visible, visible_boxes = counts_and_boxes(visible.flatten(0, 1))
    else:
        pasted_full, full_boxes = stats.full_count, stats.full_boxes
        pasted_visible, visible_boxes = stats.visible_count, stats.visible_boxes
    keep_new = drop.keep(pasted_visible, pasted_full, full_boxes, visible_boxes,
                         torch.zeros_like(pasted_full, dtype=torch.bool))
    return _Occlusion(n_per, rows, visible, old_visible, before, after, touched, new_boxes, visible_old_boxes,
                      old_crowd, keep_old,
                      pasted_visible, visible_boxes, keep_new)


def _survivor_order(keep: torch.Tensor, n_per: list[int], k_per: list[int], kmax: int) -> tuple[list[int], list[int]]:
    """Rows to gather (existing rows first, then the (B * K) piece slots) image by image, and how many
    per image: each image's surviving existing instances, then its surviving pieces."""
    n_old = sum(n_per)
    keep = keep.tolist()  # Python bools: indexing a tensor per row costs a dispatch each
    order, counts, start = [], [], 0
    for i, (n, k) in enumerate(zip(n_per, k_per)):
        rows = [r for r in range(start, start + n) if keep[r]]
        rows += [n_old + i * kmax + j for j in range(k) if keep[n_old + i * kmax + j]]
        order += rows
        counts.append(len(rows))
        start += n
    return order, counts


def _untouched_area(occ: _Occlusion, areas: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Each existing instance's area if pasting leaves it alone: the one its target gave, else its
    pixel count (image by image: a batch may mix targets with and without ``area``)."""
    device = occ.before.device
    if len(occ.before) == 0:
        return occ.before.double()
    given = torch.cat([occ.before.new_zeros(n) if a is None else a.to(device)
                       for a, n in zip(areas, occ.n_per)]).double()  # one cast for the batch
    has = torch.tensor([a is not None for a in areas]).repeat_interleave(torch.tensor(occ.n_per)).to(device)
    return torch.where(has, given, occ.before.double())


def _gather_labels(labels, old_crowd, piece_labels, placements, kmax, order_t, counts, n_old, device):
    """Per image (labels, iscrowd, is_pasted) of the kept rows, in one gather for the whole batch."""
    slots = torch.full((len(placements) * kmax,), -1, dtype=torch.long)
    for i, pl in enumerate(piece_labels):
        slots[i * kmax : i * kmax + len(pl)] = pl
    dtype = labels[0].dtype if labels else torch.long
    old_labels = torch.cat([lab.to(device) for lab in labels]) if n_old else torch.zeros(0, dtype=dtype,
                                                                                          device=device)
    all_labels = torch.cat([old_labels.to(dtype), slots.to(device).to(dtype)]).index_select(0, order_t)
    crowd = torch.cat([old_crowd.long(), torch.zeros(len(slots), dtype=torch.long, device=device)])
    all_crowd = crowd.index_select(0, order_t)
    pasted = order_t >= n_old
    return list(zip(all_labels.split(counts), all_crowd.split(counts), pasted.split(counts)))


def _as_float(segments: list[torch.Tensor], used: list[int]) -> dict[int, torch.Tensor]:
    """The used segments as float 0..255: one cast of their shared buffer (one copy first, if they
    do not share one)."""
    if not used:
        return {}
    picked = [segments[i] for i in used]
    base = consecutive_base(picked)
    flat = (base if base is not None else torch.cat([t.reshape(-1) for t in picked])).float()
    out, start = {}, 0
    for i, t in zip(used, picked):
        out[i] = flat[start : start + t.numel()].view(t.shape)
        start += t.numel()
    return out
