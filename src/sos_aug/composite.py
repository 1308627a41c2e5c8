"""Compositing images and updating their instances exactly, touching only the pasted regions.

One front door, :func:`paste`: images (a batch or a list), each image's :class:`Instances`, the
segments, one :class:`~sos_aug.layout.Placement` per image and a backend name in, one complete
:class:`PasteResult` per image out (image, masks, boxes, areas, labels, crowd flags, which
instances are pasted, which survived), whichever backend did the work. :func:`choose_backend`
holds the fallback policy.

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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .batched_warp import paste_groups, topmost
from .layout import Placement, clip_window
from .ops import backends
from .ops.buffers import consecutive_base, flat_base, same_size_groups
from .ops.masks import ALPHA_CUT, ALPHA_THRESHOLD, count_pixels, counts_and_boxes, mask_stats, row_owners, tight_boxes
from .ops.resize import warp_segment


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
            window.copy_(_blend(window, rgb, piece.mask, feather_sigma))
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


def _blend(window: torch.Tensor, rgb: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
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


def _compact(rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``rows[keep]`` without a new allocation: kept rows slide down in place; returns a view."""
    kept = keep.nonzero().flatten().tolist()
    for dst, src in enumerate(kept):
        if dst != src:
            rows[dst].copy_(rows[src])
    return rows[: len(kept)]


@dataclass
class Instances:
    """One image's instances as compositing reads them, on the image's device."""

    masks: torch.Tensor  # (N, H, W) bool
    boxes: torch.Tensor  # (N, 4) XYXY
    labels: torch.Tensor  # (N,)
    crowd: torch.Tensor  # (N,) read as bool
    area: torch.Tensor | None = None  # (N,) areas they came with, kept for instances pasting leaves alone


@dataclass
class PasteResult:
    """One composited image and its complete new instances: the existing survivors in their order,
    then the pasted survivors in paste order. Every backend fills every field."""

    image: torch.Tensor
    masks: torch.Tensor  # (M, H, W) bool
    boxes: torch.Tensor  # (M, 4) float XYXY: tight boxes (or, with boxes="keep", the given ones of unchanged masks)
    area: torch.Tensor  # (M,) float; pixel count where pasting changed the mask, else the given area
    labels: torch.Tensor  # (M,)
    iscrowd: torch.Tensor  # (M,) int64
    is_pasted: torch.Tensor  # (M,) bool
    keep_existing: torch.Tensor  # (N,) bool: which existing instances survive
    pasted_kept: torch.Tensor  # (K,) bool, on the CPU: which of the placement's K draws survive


BACKENDS = ("auto", "window", "kernel", "groups", "loop")


def paste(
    images: torch.Tensor | Sequence[torch.Tensor],
    instances: Sequence[Instances],
    segments: Sequence[torch.Tensor],
    placements: Sequence[Placement],
    piece_labels: Sequence[torch.Tensor],
    drop: DropRule,
    feather_sigma: float = 0.0,
    backend: str = "auto",
    boxes: str = "tight",
) -> list[PasteResult]:
    """Paste ``segments`` into every image as its placement says and update its instances exactly.

    ``images``: a (B, 3, H, W) batch or a list of (3, H, W) images (uint8, or float in [0, 1]);
    ``segments``: (4, h, w) RGBA tensors on the images' device, indexed by ``placements[b].segment``;
    ``piece_labels[b]``: the label of each of placement ``b``'s draws. ``backend``
    (:func:`choose_backend`): ``"window"`` image by image inside each piece's window,
    ``"kernel"``/``"groups"``/``"loop"`` same-size images batched (:func:`paste_batch`), ``"auto"``
    the best for the device. ``boxes="tight"``: every box is its mask's tight box; ``"keep"``:
    instances pasting leaves alone keep their given boxes. All follow this module's rules."""
    if boxes not in ("tight", "keep"):
        raise ValueError(f"boxes must be 'tight' or 'keep', got {boxes!r}")
    if not (len(images) == len(instances) == len(placements) == len(piece_labels)):
        raise ValueError(f"{len(images)} images, {len(instances)} instance sets, {len(placements)} placements "
                         f"and {len(piece_labels)} label lists")
    if len(images) == 0:
        return []
    segments = list(segments)
    chosen = choose_backend(backend, images[0].device, placements, feather_sigma)
    if chosen == "window":
        return [paste_window(image, inst, segments, placement, labels, drop, feather_sigma, boxes == "tight")
                for image, inst, placement, labels in zip(images, instances, placements, piece_labels)]
    results: list[PasteResult] = [None] * len(images)  # type: ignore[list-item]
    stacked = isinstance(images, torch.Tensor)
    for group in ([list(range(len(images)))] if stacked else same_size_groups(images)):
        batch = images if stacked else torch.stack([images[i] for i in group])
        done = paste_batch(batch, [instances[i] for i in group], segments, [placements[i] for i in group],
                           [piece_labels[i] for i in group], drop, feather_sigma, chosen, boxes == "tight")
        for i, res in zip(group, done):
            results[i] = res
    return results


def choose_backend(backend: str, device: torch.device, placements: Sequence[Placement],
                   feather_sigma: float = 0.0) -> str:
    """The backend :func:`paste` uses, with its fallback policy in one place. ``"auto"``: image by
    image (``"window"``) on the CPU, where touching only each piece's window is fastest; on an
    accelerator the Triton kernels where they run, else size groups. The batched backends loop
    piece by piece over feathered or rotated pieces, which the others do not handle."""
    check_backend(backend)
    if backend == "window" or (backend == "auto" and device.type == "cpu"):
        return "window"
    if feather_sigma > 0 or any(bool(p.angle.any()) for p in placements) or backend == "loop":
        return "loop"
    if backend == "auto":
        return "kernel" if backends.available(device, "paste") else "groups"
    if backend == "kernel" and not backends.available(device, "paste"):
        raise RuntimeError(f"backend='kernel' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU), "
                           f"with compiling on; the images are on {device}")
    return backend


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown compositing backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}")


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
    all_masks = _zeros((n + k, height, width), device)
    all_masks[:n].view(torch.uint8).copy_(masks.view(torch.uint8))
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
    untouched_tight = tight and len(touched_rows) < n  # untouched masks are the input's
    new_boxes = tight_boxes(masks) if untouched_tight else boxes.clone().float()
    keep_existing = torch.ones(n, dtype=torch.bool, device=device)
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
    old_boxes = occ.visible_old_boxes if tight else occ.new_boxes  # the former: every existing mask's tight box
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
        from .paste_kernel import paste_kernels

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
                view.copy_(_blend(view, rgb, mask, feather_sigma))
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
    keep_old = drop.keep(after, before, old_boxes, new_boxes, old_crowd) | ~touched
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


