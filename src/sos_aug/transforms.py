"""``CopyPaste``: paste bank segments into a batch of images and update their targets exactly.

Like torchvision's v2 transforms, random parameters are drawn first and then applied:
:meth:`CopyPaste.fetch` draws how many and which segments each image gets and decodes them (a
DataLoader worker's job), :meth:`CopyPaste.draw_placements` draws the layout, and
:meth:`CopyPaste.paste` composites on whatever device the images live on, without a random draw.
(The names differ from v2's ``make_params``/``transform`` because the contract does: the draw
needs a whole batch's sizes and targets, and pasting rewrites the image and its target together.
Called on one ``(image, target)`` pair, ``CopyPaste`` works as a step of ``v2.Compose``.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchvision import tv_tensors
from torchvision.ops import box_convert

from . import allocator
from .bank.format import BankFormatError
from .bank.store import SegmentBank
from .coco import load_coco
from .composite import DropRule, Instances, PasteResult, check_backend, paste
from .grounding import Referring
from .layout import Layout, Placement, RandomLayout, Scene, grid_step
from .names import name_forms, normalize_name
from .ops.buffers import consecutive_base, flat_base
from .ops.masks import filled_boxes
from .relight.batch import RelightBatch, Relighter, relight
from .relight.batch import warm_up as compile_relighters

Target = dict[str, Any]


@dataclass
class PasteSegments:
    """Decoded segments for a batch: ``rgba[i]`` is a (4, h, w) uint8 tensor for image ``image[i]``.

    The segments are views into one flat buffer, so moving them to a device (or pinning them) is one
    copy, not one per segment.
    """

    rgba: list[torch.Tensor]
    image: torch.Tensor  # (M,) which image each segment is for
    labels: torch.Tensor  # (M,) dataset label (-1 for open-vocabulary names without one)
    names: list[str]
    bank_rows: torch.Tensor  # (M,) positions in the bank view, for provenance
    placements: list[Placement] | None = None  # drawn ahead (in a worker) for the images they go with
    sizes: list[tuple[int, int]] | None = None  # the (H, W) the placements were drawn for

    @staticmethod
    def pack(arrays: Sequence[Any]) -> list[torch.Tensor]:
        """(4, h, w) uint8 arrays -> tensors that are views into one flat buffer."""
        flat = torch.empty(sum(int(a.size) for a in arrays), dtype=torch.uint8)
        return _views(flat, [tuple(a.shape) for a in arrays], arrays)

    def _moved(self, move: Callable[[torch.Tensor], torch.Tensor]) -> PasteSegments:
        """The same segments after ``move`` of their one flat buffer (a single copy)."""
        shapes = [tuple(r.shape) for r in self.rgba]
        rgba = _views(move(flat_base(self.rgba)), shapes)
        return PasteSegments(rgba, self.image, self.labels, self.names, self.bank_rows, self.placements, self.sizes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PasteSegments:
        """The segments on ``device``: one copy of their buffer, or themselves when already there."""
        if all(_on_device(r, torch.device(device)) for r in self.rgba[:1]):
            return self
        return self._moved(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PasteSegments:
        return self._moved(lambda t: t.pin_memory())

    def for_image(self, b: int) -> list[int]:
        return (self.image == b).nonzero().flatten().tolist()

    @staticmethod
    def concat(parts: Sequence[PasteSegments]) -> PasteSegments:
        """One batch's segments from parts fetched for one image each (frameworks that collate the
        samples themselves, as mmdet does): image ``b`` of the result is part ``b``'s image; layouts
        drawn with the parts are kept, re-indexed into the joined segments."""
        if not parts:
            raise ValueError("PasteSegments.concat needs at least one part")
        if any(len(p.placements or []) > 1 or bool((p.image != 0).any()) for p in parts):
            raise ValueError("PasteSegments.concat joins parts fetched for one image each (fetch(1))")
        starts = np.cumsum([0] + [len(p.rgba) for p in parts])
        drawn = all(p.placements is not None for p in parts)
        placements = [Placement(q.boxes, q.segment + int(start), q.flip, q.angle)
                      for p, start in zip(parts, starts) for q in p.placements] if drawn else None
        rgba = PasteSegments.pack([r.numpy() for p in parts for r in p.rgba])
        image = torch.cat([torch.full((len(p.rgba),), b, dtype=torch.long) for b, p in enumerate(parts)])
        return PasteSegments(rgba, image, torch.cat([p.labels for p in parts]), [n for p in parts for n in p.names],
                             torch.cat([p.bank_rows for p in parts]), placements,
                             [sz for p in parts for sz in p.sizes] if drawn else None)

    def __reduce__(self):  # one buffer across processes, not a storage per view
        shapes = [tuple(r.shape) for r in self.rgba]
        flat = flat_base(self.rgba)
        return _unpack, (flat, shapes, self.image, self.labels, self.names, self.bank_rows, self.placements,
                         self.sizes)


def _on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` lives on ``device`` ("cuda" meaning the current CUDA device)."""
    if device.index is None and device.type != "cpu":
        device = torch.empty(0, device=device).device
    return tensor.device == device


def _unpack(flat, shapes, image, labels, names, bank_rows, placements, sizes) -> PasteSegments:
    """Rebuild pickled :class:`PasteSegments` as views into the one buffer that travelled."""
    return PasteSegments(_views(flat, shapes), image, labels, names, bank_rows, placements, sizes)


def _views(flat: torch.Tensor, shapes: list[tuple[int, ...]], fill: Sequence[Any] | None = None) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` with these shapes, optionally filled from NumPy arrays."""
    out, start = [], 0
    for k, shape in enumerate(shapes):
        n = int(torch.Size(shape).numel())
        view = flat[start : start + n].view(shape)
        if fill is not None:
            np.copyto(view.numpy(), fill[k])
        out.append(view)
        start += n
    return out


def _restack(images: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(images)``, without the copy when they already are the rows of one batch (as
    the batched paste and the accelerator relighting return them)."""
    base = consecutive_base(images) if all(im.shape == images[0].shape for im in images) else None
    return torch.stack(images) if base is None else base.view(len(images), *images[0].shape)


class CopyPaste:
    """Paste segments from a :class:`~sos_aug.SegmentBank` into images, keeping targets exact.

    Call it as ``cp(images, targets, generator=None)`` with a list of (3, H, W) images (any sizes) or
    a (B, 3, H, W) batch, and torchvision-style targets (``boxes`` XYXY, ``labels``, ``masks``,
    optional ``iscrowd``/``area``; plain tensors or tv_tensors). It returns new images and targets
    with pasted instances appended and marked in ``is_pasted``. A single image and target work too.
    A target without ``masks`` is box-only: each instance counts as its filled box, is dropped when
    the pastes leave less of it visible than the drop rule allows and otherwise keeps its box as it
    came; pasted instances add their tight boxes, and no mask is made up.

    Args:
        bank: where segments come from; sampled under the bank view's sampling mode.
        layout: a :class:`~sos_aug.layout.Layout` (default :class:`RandomLayout`).
        num_pastes: (low, high) segments per image, inclusive.
        p: probability that an image gets pasted into at all.
        feather_sigma: 0 for hard alpha; otherwise Gaussian feathering of the alpha, in pixels.
        drop: a :class:`DropRule`, or its mode name.
        label_map: bank category (name or id) -> dataset label; None keeps the bank's ids as labels.
        open_vocabulary: keep segments whose category has no label (label -1, names in ``names``).
        relight: a relighter or a list of them (:mod:`sos_aug.relight`), run on the pasted segments
            after compositing, e.g. ``[RelightNet.pretrained(), LabBlend()]``; background pixels and
            targets are unchanged by it.
        backend: how images are composited (:func:`sos_aug.composite.paste`): ``"window"`` image by
            image, touching only each piece's window (the fastest on the CPU); ``"kernel"`` same-size
            images at once in two Triton kernels (CUDA); ``"groups"`` same-size images at once, pieces
            warped in a few batched matmuls by size; ``"loop"`` same-size images at once, piece by
            piece; ``"auto"`` (default) ``"window"`` on the CPU, the kernels on CUDA where Triton
            runs, else groups. Batched backends loop over rotated or feathered pieces. Results agree
            up to float rounding (see :mod:`sos_aug.paste_kernel`, :mod:`sos_aug.batched_warp`).
        batched: a shorthand: ``False`` is ``backend="window"``; ``True`` batches same-size images
            (with ``backend="auto"``, piece by piece on the CPU).
        referring: a :class:`~sos_aug.grounding.Referring` that adds ``target["referring"]``, verified
            referring expressions over existing and pasted instances, drawn from the same generator.
        boxes: ``"tight"`` (default): every output box is the tight pixel-edge box of its output
            mask, as mmdet does after pasting; ``"keep"``: instances no segment covers keep the
            boxes they came with (fractional after a resize, say), covered and pasted ones get
            their mask's tight box.
    """

    def __init__(
        self,
        bank: SegmentBank,
        layout: Layout | None = None,
        num_pastes: tuple[int, int] = (1, 10),
        p: float = 1.0,
        feather_sigma: float = 0.0,
        drop: DropRule | str = "visible_fraction",
        label_map: Mapping[str | int, int] | None = None,
        open_vocabulary: bool = False,
        relight: Relighter | Sequence[Relighter] | None = None,
        batched: bool | None = None,
        backend: str = "auto",
        boxes: str = "tight",
        referring: Referring | None = None,
        warp: str | None = None,
    ):
        if boxes not in ("tight", "keep"):
            raise ValueError(f"boxes must be 'tight' or 'keep', got {boxes!r}")
        if num_pastes[0] < 0 or num_pastes[1] < num_pastes[0]:
            raise ValueError(f"num_pastes must be (low, high) with 0 <= low <= high, got {num_pastes}")
        if warp is not None:  # its name until this version
            warnings.warn("CopyPaste(warp=...) is now CopyPaste(backend=...)", DeprecationWarning, stacklevel=2)
            backend = warp
        check_backend(backend)
        self.layout = layout or RandomLayout()
        self.num_pastes, self.p, self.feather_sigma = num_pastes, p, feather_sigma
        self.drop = drop if isinstance(drop, DropRule) else DropRule(drop)
        self.open_vocabulary = open_vocabulary
        self.relight = relight
        self.batched, self.backend = batched, backend
        self.boxes = boxes
        self.referring = referring
        self.skipped = 0  # segments that could not be read (counted, warned about)
        self.label_of = _resolve_labels(bank, label_map, open_vocabulary)
        usable = [c for c, lab in self.label_of.items() if lab >= 0 or open_vocabulary]
        self.bank = bank.subset(categories=usable) if len(usable) < len(bank.categories) else bank
        if len(self.bank) == 0:
            raise ValueError(
                f"no usable segment in {bank!r}: none of its categories maps to a dataset label "
                "(check label_map, or pass open_vocabulary=True)"
            )
        max_cat = max(self.label_of) + 1
        self._label_table = torch.full((max_cat,), -1, dtype=torch.long)
        for c, lab in self.label_of.items():
            self._label_table[c] = lab
        self._cats = torch.from_numpy(self.bank.index["category"].astype("int64"))
        self.label_names = _label_names(bank, label_map)

    # -- draw --------------------------------------------------------------------------------------
    def fetch(self, num_images: int, generator: torch.Generator | None = None) -> PasteSegments:
        """Draw how many and which segments each image gets, and decode them (CPU work)."""
        lo, hi = self.num_pastes
        counts = torch.randint(lo, hi + 1, (num_images,), generator=generator)
        counts *= torch.rand(num_images, generator=generator) < self.p
        rows = self.bank.sample(int(counts.sum()), generator)
        image = torch.repeat_interleave(torch.arange(num_images), counts)
        arrays, ok = [], torch.ones(len(rows), dtype=torch.bool)
        for k, r in enumerate(rows.tolist()):
            try:
                arrays.append(self.bank.read_rgba(r)[0])
            except BankFormatError as err:  # a damaged segment is skipped and counted, never fatal mid-epoch
                ok[k] = False
                self.skipped += 1
                if self.skipped == 1 or self.skipped % 1000 == 0:
                    warnings.warn(f"CopyPaste skipped {self.skipped} unreadable segment(s); latest: {err}",
                                  stacklevel=2)
        rows, image = rows[ok], image[ok]
        rgba = PasteSegments.pack(arrays)
        cats = self._cats[rows]
        names = [self.bank.categories[int(c)]["name"] for c in cats]
        return PasteSegments(rgba, image, self._label_table[cats], names, rows)

    def draw_placements(
        self, sizes: Sequence[tuple[int, int]], targets: Sequence[Target], segments: PasteSegments,
        generator: torch.Generator | None = None,
    ) -> list[Placement]:
        """Draw one placement per image (on the CPU, so CPU and GPU runs replay the same layout):
        the random parameters that :meth:`paste` applies."""
        placements = []
        norm_boxes = [_normalised_boxes(t, h, w) for t, (h, w) in zip(targets, sizes)]
        for b, ((h, w), target) in enumerate(zip(sizes, targets)):
            idx = segments.for_image(b)
            seg_hw = torch.tensor([list(segments.rgba[i].shape[-2:]) for i in idx], dtype=torch.long).reshape(-1, 2)
            step = grid_step(h, w)
            masks = target.get("masks")
            if masks is None:  # box-only: an instance occupies its box
                masks = filled_boxes(_xyxy(target).cpu(), h, w)
            grid = masks[:, ::step, ::step].bool().cpu()
            others = [nb for i, nb in enumerate(norm_boxes) if i != b]
            scene = Scene(h, w, seg_hw, [segments.names[i] for i in idx], _xyxy(target).cpu(), grid, step,
                          torch.cat(others) if others else None)
            placement = self.layout(scene, generator)
            placement.segment = torch.tensor(idx, dtype=torch.long)[placement.segment] if idx else placement.segment
            placements.append(placement)
        return placements

    # -- apply -------------------------------------------------------------------------------------
    def __call__(self, images, targets, segments: PasteSegments | None = None,
                 generator: torch.Generator | None = None):
        single = isinstance(images, torch.Tensor) and images.ndim == 3
        if single or isinstance(targets, Mapping):  # one sample (a non-tensor image is refused below)
            images, targets = [images], [targets]
        if not isinstance(images, (torch.Tensor, list, tuple)):
            images = [images]
        batch = list(images)
        for image, target in zip(batch, targets):
            _check_target(image, target)
        if segments is None:
            segments = self.fetch(len(batch), generator)
        sizes = [tuple(im.shape[-2:]) for im in batch]
        params = segments.placements  # drawn in a worker (CopyPasteCollate(defer=True)), else now
        if params is None:
            params = self.draw_placements(sizes, targets, segments, generator)
        elif segments.sizes is not None and [tuple(x) for x in segments.sizes] != sizes:
            raise ValueError(f"the segments' layouts were drawn for images of sizes {segments.sizes}, but these "
                             f"images are {sizes}: resize before CopyPasteCollate, or draw layouts here "
                             "(segments.placements = None)")
        stacked = isinstance(images, torch.Tensor) and not single
        out_images, out_targets = self.paste(images if stacked else batch, targets, segments, params)
        if self.referring is not None:
            if any("masks" not in t for t in targets):
                raise ValueError("referring expressions are measured on instance masks; these targets have "
                                 "boxes only (drop referring=, or give masks)")
            for image, target in zip(out_images, out_targets):
                target["referring"] = self.refer(image, target, generator)
        if single:
            return out_images[0], out_targets[0]
        if stacked:
            return _restack(out_images), out_targets
        return out_images, out_targets

    def paste(self, images: Sequence[torch.Tensor], targets: Sequence[Target], segments: PasteSegments,
              params: Sequence[Placement]) -> tuple[list[torch.Tensor], list[Target]]:
        """Composite every image with its placement and rewrite its target (no random draw: the
        same inputs give the same outputs, on any device)."""
        if len(images) != len(targets) or len(images) != len(params):
            raise ValueError(f"{len(images)} images, {len(targets)} targets and {len(params)} placements")
        for image, target in zip(images, targets):
            _check_target(image, target)
        device = images[0].device if len(images) else torch.device("cpu")
        rgba = segments.to(device).rgba  # one transfer for all segments
        instances = [_instances(t, device, im.shape[-2:]) for t, im in zip(targets, images)]
        piece_labels = [segments.labels[p.segment] for p in params]
        results = paste(images if isinstance(images, torch.Tensor) else list(images),
                        instances, rgba, params, piece_labels, self.drop, self.feather_sigma,
                        self._backend(device), self.boxes)
        kept_src = [p.segment[r.pasted_kept] for p, r in zip(params, results)]
        out_images, out_targets = [], []
        for image, target, kept, res in zip(images, targets, kept_src, results):
            img, tgt = self._new_target(image, target, segments, kept, res)
            out_images.append(img)
            out_targets.append(tgt)
        if self.relight is not None:
            out_images = self._relight(out_images, results)
        return out_images, out_targets

    def make_params(self, *args, **kwargs) -> list[Placement]:
        """Deprecated name of :meth:`draw_placements` (it did not follow torchvision v2's contract)."""
        warnings.warn("CopyPaste.make_params is now CopyPaste.draw_placements", DeprecationWarning, stacklevel=2)
        return self.draw_placements(*args, **kwargs)

    def apply(self, *args, **kwargs) -> tuple[list[torch.Tensor], list[Target]]:
        """Deprecated name of :meth:`paste`."""
        warnings.warn("CopyPaste.apply is now CopyPaste.paste", DeprecationWarning, stacklevel=2)
        return self.paste(*args, **kwargs)

    def refer(self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None) -> list[dict]:
        """Verified referring expressions for one output (``referring``), pasted segments named by
        their bank text's short phrase where it has one."""
        labels = target["labels"].tolist()
        names = target.get("names") or [self.label_names.get(int(lab), str(lab)) for lab in labels]
        phrases: list[str | None] = [None] * len(labels)
        pasted = target["is_pasted"].nonzero().flatten().tolist()
        pointers = self.bank.index["text"][target["pasted_rows"].cpu().numpy()] if pasted else []
        for row, pointer in zip(pasted, pointers):
            phrases[row] = self.bank.text(int(pointer)).get("short_phrase")
        return self.referring(image, target, names, phrases, generator)

    def _backend(self, device: torch.device) -> str:
        """The compositing backend for images on ``device`` (``backend``, with ``batched`` as a shorthand)."""
        if self.batched is False:
            return "window"
        if self.batched and self.backend == "auto" and device.type == "cpu":
            return "loop"  # batched on the CPU: the batched path piece by piece
        return self.backend

    def _relight(self, images: list[torch.Tensor], results: list[PasteResult]) -> list[torch.Tensor]:
        """Relight the pasted segments' visible pixels; every other pixel stays bit-identical."""
        plain = [im.as_subclass(torch.Tensor) for im in images]
        first = [len(r.labels) - int(r.is_pasted.sum()) for r in results]  # where the pasted rows start
        masks = [r.masks[f:] for r, f in zip(results, first)]  # views
        boxes = [r.boxes[f:] for r, f in zip(results, first)]  # tight: the relighter need not recompute them
        relit = relight(self.relight, RelightBatch(plain, plain, masks, boxes))
        return [tv_tensors.wrap(new, like=im) if isinstance(im, tv_tensors.Image) else new
                for im, new in zip(images, relit)]

    def _new_target(self, image: torch.Tensor, target: Target, segments: PasteSegments, kept_src: torch.Tensor,
                    res: PasteResult):
        """The pasted image and its new target (existing instances first, then the pasted ones) in
        the input's types; ``kept_src`` are the segments whose pieces survived. A box-only target
        (no ``masks``) stays box-only: its surviving boxes and areas are the ones it came with."""
        out = {k: v for k, v in target.items() if k not in _INSTANCE_KEYS}
        boxes, area = res.boxes, res.area
        if "masks" in target:
            out["masks"] = _wrap_like(target["masks"], res.masks.to(target["masks"].dtype))
        else:
            existing = ~res.is_pasted
            given = _xyxy(target).to(boxes)[res.keep_existing]
            boxes, area = boxes.clone(), area.clone()
            boxes[existing] = given
            area[existing] = (torch.as_tensor(target["area"]).to(area)[res.keep_existing] if "area" in target
                              else (given[:, 2:] - given[:, :2]).prod(1).to(area))
        out.update(labels=res.labels, boxes=_wrap_boxes(target["boxes"], boxes, image.shape[-2:]),
                   iscrowd=res.iscrowd, area=area, is_pasted=res.is_pasted)
        return self._finish(image, target, segments, kept_src, res.keep_existing, res, out)

    def _finish(self, image, target: Target, segments: PasteSegments, kept_src: torch.Tensor, keep: torch.Tensor,
                res: PasteResult, out: Target):
        """Names (open vocabulary), provenance, and the image in the caller's type."""
        if self.open_vocabulary or "names" in target:
            labels = target["labels"]
            old_names = target.get("names") or [str(int(x)) for x in labels]
            out["names"] = [nm for nm, k in zip(old_names, keep.tolist()) if k] + [
                segments.names[int(i)] for i in kept_src]
        out["pasted_rows"] = segments.bank_rows[kept_src]
        img = res.image
        if isinstance(image, tv_tensors.Image):
            img = tv_tensors.wrap(img, like=image)
        return img, out


_INSTANCE_KEYS = {"boxes", "labels", "masks", "iscrowd", "area", "is_pasted", "names", "pasted_rows", "referring"}


def _instances(target: Target, device: torch.device, hw: tuple[int, int]) -> Instances:
    """A target's instances as compositing reads them, on ``device`` (crowd flags in any dtype: one
    conversion for the batch is cheaper than one per image); a box-only one's boxes as filled masks."""
    crowd = target["iscrowd"] if "iscrowd" in target else torch.zeros(len(target["labels"]), dtype=torch.bool)
    area = target.get("area")
    boxes = _xyxy(target).to(device)
    masks = target["masks"].to(device).as_subclass(torch.Tensor).bool() if "masks" in target \
        else filled_boxes(boxes, *hw)
    return Instances(masks, boxes, target["labels"].as_subclass(torch.Tensor).to(device), crowd.to(device),
                     None if area is None or "masks" not in target else torch.as_tensor(area).to(device))


def _check_target(image: torch.Tensor, target: Target) -> None:
    if not isinstance(image, torch.Tensor):
        shape = getattr(image, "shape", None)
        what = f"{type(image).__module__}.{type(image).__name__}" + (f" of shape {tuple(shape)}" if shape else "")
        raise TypeError(f"CopyPaste takes (3, H, W) torch tensors (uint8, or float in [0, 1]); got {what} "
                        "(a NumPy HWC image: torch.from_numpy(array).permute(2, 0, 1))")
    if not isinstance(target, Mapping):
        raise TypeError(f"CopyPaste takes a target dict per image (boxes, labels, masks); got {type(target).__name__}")
    if image.is_floating_point() and image.device.type == "cpu" and image.numel() and float(image.amax()) > 1.0:
        raise ValueError(f"float images must hold values in [0, 1]; this one reaches {float(image.amax()):.1f} "
                         "(0-255 values: pass them as uint8, or divide by 255)")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"CopyPaste needs (3, H, W) RGB images, got shape {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"CopyPaste got an empty image, shape {tuple(image.shape)}: nothing to paste into")
    for key in ("boxes", "labels"):
        if key not in target:
            raise ValueError(f"CopyPaste needs target[{key!r}] (torchvision detection format; masks optional); "
                             f"got {sorted(target)}")
    n = len(target["labels"])
    if len(_xyxy(target)) != n:
        raise ValueError(f"target has {n} labels and {len(_xyxy(target))} boxes")
    if "masks" not in target:
        return  # box-only: boxes are the instances
    if target["masks"].shape[0] != n:
        raise ValueError(f"target has {n} labels, {len(target['boxes'])} boxes and {len(target['masks'])} masks")
    if tuple(target["masks"].shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(f"masks are {tuple(target['masks'].shape[-2:])} but the image is {tuple(image.shape[-2:])}")


def _xyxy(target: Target) -> torch.Tensor:
    boxes = target["boxes"]
    if isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
        return box_convert(boxes.as_subclass(torch.Tensor), boxes.format.name.lower(), "xyxy")
    return torch.as_tensor(boxes).as_subclass(torch.Tensor).reshape(-1, 4)


def _normalised_boxes(target: Target, h: int, w: int) -> torch.Tensor:
    boxes = _xyxy(target).cpu().double()
    crowd = target.get("iscrowd")
    if crowd is not None:
        boxes = boxes[~crowd.cpu().bool()]
    return boxes / torch.tensor([w, h, w, h], dtype=torch.float64)


def _wrap_boxes(like, boxes: torch.Tensor, canvas) -> torch.Tensor:
    if isinstance(like, tv_tensors.BoundingBoxes):
        fmt = like.format.name.lower()
        data = boxes if fmt == "xyxy" else box_convert(boxes, "xyxy", fmt)
        return tv_tensors.BoundingBoxes(data.to(like.dtype), format=like.format, canvas_size=tuple(canvas))
    return boxes.to(like.dtype) if like.is_floating_point() else boxes


def _wrap_like(like, tensor: torch.Tensor) -> torch.Tensor:
    return tv_tensors.Mask(tensor) if isinstance(like, tv_tensors.Mask) else tensor


def _label_names(bank: SegmentBank, label_map) -> dict[int, str]:
    """Dataset label -> a category name: the first name the label map gives it (a COCO file's own
    name before its synonyms), or the bank's name where labels are the bank's ids."""
    if label_map is None:
        return {cid: c["name"] for cid, c in bank.categories.items()}
    out: dict[int, str] = {}
    for key, label in label_map.items():
        if isinstance(key, str):
            out.setdefault(int(label), key)
        elif int(key) in bank.categories:
            out.setdefault(int(label), bank.categories[int(key)]["name"])
    return out


def _resolve_labels(bank: SegmentBank, label_map, open_vocabulary: bool) -> dict[int, int]:
    """Bank category id -> dataset label (-1 where none), by id, then name or synonym (COCO's and
    LVIS's spellings of one category match, :mod:`sos_aug.names`). Categories left without a label
    are reported once, with their segment counts, unless ``open_vocabulary`` keeps them."""
    if label_map is None:
        return {cid: cid for cid in bank.categories}
    by_name = {normalize_name(str(k)): v for k, v in label_map.items() if isinstance(k, str)}
    out = {}
    for cid, cat in bank.categories.items():
        label = label_map.get(cid) if cid in label_map else None
        if label is None:
            label = next((by_name[f] for f in name_forms([cat["name"], *cat.get("synonyms", [])]) if f in by_name),
                         None)
        out[cid] = -1 if label is None else int(label)
    unmatched = [cid for cid, lab in out.items() if lab < 0]
    if unmatched and not open_vocabulary:
        counts = bank.category_counts()
        lost = sorted(unmatched, key=lambda c: -counts.get(c, 0))
        listed = ", ".join(f"{bank.categories[c]['name']} ({counts.get(c, 0)})" for c in lost[:20])
        warnings.warn(f"{len(unmatched)} of {len(out)} categories of bank {bank.root} "
                      f"({sum(counts.get(c, 0) for c in unmatched)} of {sum(counts.values())} segments) match no "
                      f"dataset class and will never be pasted: {listed}{', ...' if len(lost) > 20 else ''}. "
                      "Name them in label_map (or pass open_vocabulary=True) to paste them.", stacklevel=3)
    return out


def label_map_from_coco(ann_file: str | Path) -> dict[str, int]:
    """Category name (and LVIS synonyms) -> category id, from a COCO/LVIS instances file."""
    cats = load_coco(ann_file, ("categories",))["categories"]
    out = {}
    for c in cats:
        for name in [c["name"], *c.get("synonyms", [])]:
            out.setdefault(name, int(c["id"]))
    return out


class CopyPasteCollate:
    """A DataLoader ``collate_fn`` that runs a :class:`CopyPaste` in the workers.

    Each worker draws from its own generator, seeded from the worker's torch seed, so two runs with
    the same DataLoader seed replay exactly and different workers draw differently. With
    ``defer=True`` the workers only fetch and decode segments; the batch then carries them as a
    third element so ``cp(images.cuda(), targets, segments=segments.to("cuda"))`` pastes on the GPU.
    The layout is drawn in the worker too (``segments.placements``): the training step only
    composites, batched, on the device.

    In a worker process it also calls :func:`sos_aug.allocator.keep_freed_memory` once (glibc keeps
    freed memory for the next batch instead of handing each batch fresh pages);
    ``keep_freed_memory=False`` leaves the workers' allocator alone.

    Relighters that compile their CPU code (``compile_cpu=True``) are compiled here, when the
    collate is made (:func:`sos_aug.relight.batch.warm_up`, seconds): workers forked from this
    process (Linux's default) then inherit the compiled code instead of compiling it in every worker
    and every epoch. ``warm_up=False`` skips that.
    """

    def __init__(self, copy_paste: CopyPaste, collate_fn: Callable | None = None, defer: bool = False,
                 keep_freed_memory: bool = True, warm_up: bool = True):
        self.cp, self.collate_fn, self.defer = copy_paste, collate_fn, defer
        self.keep_freed_memory = keep_freed_memory
        if warm_up and not defer and copy_paste.relight is not None and get_worker_info() is None:

            compile_relighters(copy_paste.relight)
        self._generator: torch.Generator | None = None
        self._seed: int | None = None

    def generator(self) -> torch.Generator:
        seed = torch.initial_seed()
        if self._generator is None or self._seed != seed:
            self._generator, self._seed = torch.Generator().manual_seed(seed), seed
        return self._generator

    def __call__(self, batch: list[tuple[torch.Tensor, Target]]):
        if self.keep_freed_memory and get_worker_info() is not None:
            allocator.keep_freed_memory()  # the worker's process only, never the training process
        images, targets = [b[0] for b in batch], [b[1] for b in batch]
        if self.defer:  # draw everything here; the training step only composites
            segments = self.cp.fetch(len(images), self.generator())
            sizes = [tuple(im.shape[-2:]) for im in images]
            segments.placements = self.cp.draw_placements(sizes, targets, segments, self.generator())
            segments.sizes = sizes
            return self._collate(images, targets) + (segments,)
        images, targets = self.cp(images, targets, generator=self.generator())
        return self._collate(images, targets)

    def _collate(self, images, targets) -> tuple:
        if self.collate_fn is not None:
            return tuple(self.collate_fn(list(zip(images, targets))))
        return tuple(images), tuple(targets)
