"""``CopyPaste``: paste bank segments into a batch of images and update their targets exactly.

Like torchvision's v2 transforms, random parameters are drawn first and then applied:
:meth:`CopyPaste.draw` draws how many and which segments each image gets, decodes them and draws
their layout (a DataLoader worker's job; :meth:`~CopyPaste.fetch` and
:meth:`~CopyPaste.draw_placements` are its two halves), and :meth:`CopyPaste.paste` composites on
whatever device the images live on, without a random draw. (The names differ from v2's
``make_params``/``transform`` because the contract does: the draw needs a whole batch's sizes and
targets, and pasting rewrites the image and its target together. Called on one ``(image, target)``
pair, ``CopyPaste`` works as a step of ``v2.Compose``.) :meth:`CopyPaste.from_names` builds one
from the names configs and command lines use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import get_worker_info
from torchvision import tv_tensors
from torchvision.ops import box_convert

from . import allocator
from .bank.format import BankFormatError
from .bank.store import SegmentBank
from .coco import label_map_from_coco
from .layout import Layout, Placement, RandomLayout, Scene, grid_step, make_layout
from .names import name_forms, normalize_name
from .ops.buffers import consecutive_base
from .ops.masks import filled_boxes
from .paste import DropRule, Instances, PasteResult, paste
from .paste.front import check_backend
from .referring.expressions import Referring
from .relight.batch import RelightBatch, Relighter, relight
from .relight.batch import warm_up as compile_relighters
from .relight.named import make_relighter
from .segments import PasteSegments

Target = dict[str, Any]


class CopyPaste:
    """Paste segments from a :class:`~sos_aug.SegmentBank` into images, keeping targets exact.

    Call it as ``cp(images, targets, generator=None)`` with a list of (3, H, W) images (any sizes) or
    a (B, 3, H, W) batch, and torchvision-style targets (``boxes`` XYXY, ``labels``, ``masks``,
    optional ``iscrowd``/``area``; plain tensors or tv_tensors). It returns new images and targets
    with pasted instances appended and marked in ``is_pasted``. A single image and target work too.
    A target without ``masks`` is box-only: each instance counts as its filled box, is dropped when
    the pastes leave less of it visible than the drop rule allows and otherwise keeps its box as it
    came; pasted instances add their tight boxes, and no mask is made up. ``extents`` (one (h, w) per
    image) pastes into each image's top-left part only: the image before padding.

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
        backend: how images are composited (:func:`sos_aug.paste.paste`): ``"window"`` image by
            image, touching only each piece's window (the fastest on the CPU); ``"kernel"`` same-size
            images at once in two Triton kernels (CUDA); ``"groups"`` same-size images at once, pieces
            warped in a few batched matmuls by size; ``"auto"`` (default) ``"window"`` on the CPU, the
            kernels on CUDA where Triton runs, else groups. Batched backends go piece by piece over
            rotated or feathered pieces. Results agree up to float rounding (:mod:`sos_aug.paste`).
        referring: a :class:`~sos_aug.referring.Referring` that adds ``target["referring"]``, verified
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
        backend: str = "auto",
        boxes: str = "tight",
        referring: Referring | None = None,
    ):
        if boxes not in ("tight", "keep"):
            raise ValueError(f"boxes must be 'tight' or 'keep', got {boxes!r}")
        if num_pastes[0] < 0 or num_pastes[1] < num_pastes[0]:
            raise ValueError(f"num_pastes must be (low, high) with 0 <= low <= high, got {num_pastes}")
        check_backend(backend)
        self.layout = layout or RandomLayout()
        self.num_pastes, self.p, self.feather_sigma = tuple(num_pastes), p, feather_sigma
        self.drop = drop if isinstance(drop, DropRule) else DropRule(drop)
        self.open_vocabulary = open_vocabulary
        self.relight = relight
        self.backend = backend
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

    @classmethod
    def from_names(
        cls,
        *,
        bank: str | Path | SegmentBank,
        classes: Sequence[str] | None = None,
        label_map: Mapping[str | int, int] | str | Path | None = None,
        layout: str | Layout = "sos",
        layout_file: str | Path | None = None,
        num_pastes: Sequence[int] = (1, 10),
        prob: float = 1.0,
        relight: str | Sequence[Any] | None = None,
        relight_weights: str | Path | None = None,
        drop: str | DropRule = "visible_fraction",
        feather_sigma: float = 0.0,
        sampling: str | None = None,
        reference: str | Path | None = None,
        t: float = 0.001,
        open_vocabulary: bool = False,
        referring: Referring | None = None,
        backend: str = "auto",
        boxes: str = "tight",
    ) -> CopyPaste:
        """A :class:`CopyPaste` from the values a config or a command line holds, every framework's
        one way in. ``bank``: a bank or its folder. Labels: ``classes`` (the dataset's class names
        in label order: label = position), or ``label_map`` (a mapping, or a COCO/LVIS file whose
        category names map to its ids), or neither (the bank's own category ids). ``layout``: a
        layout or its name (``random``, ``sos``, ``stats``, ``existing``); ``stats`` sizes and
        places segments from ``layout_file``, an annotation file (your training set). ``relight``:
        relighter names (``"net"``, ``"lab"``, ``"net+lab"``, a list) with ``relight_weights`` for
        the net (or relighters themselves). ``sampling``: how the bank is drawn (default: a bank's
        own, ``uniform`` for a folder; ``repeat_factor`` measures f_c on ``reference``, LVIS's rule
        with threshold ``t``). The rest as :class:`CopyPaste` takes them."""
        if classes is not None and label_map is not None:
            raise ValueError("give classes (label = position) or label_map, not both")
        if isinstance(bank, SegmentBank):
            if (sampling is not None and sampling != bank.sampling) or reference is not None:
                bank = bank.with_sampling(sampling or bank.sampling, t, reference)
        else:
            bank = SegmentBank(bank, sampling=sampling or "uniform", t=t, reference=reference)
        if classes is not None:
            label_map = {name: i for i, name in enumerate(classes)}
        elif isinstance(label_map, (str, Path)):
            label_map = label_map_from_coco(label_map)
        if isinstance(layout, str):
            layout = make_layout(layout, layout_file)
        return cls(bank, layout=layout, num_pastes=tuple(num_pastes), p=prob, feather_sigma=feather_sigma, drop=drop,
                   label_map=label_map, open_vocabulary=open_vocabulary,
                   relight=make_relighter(relight, None if relight_weights is None else str(relight_weights)),
                   backend=backend, boxes=boxes, referring=referring)

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

    def draw(self, sizes: Sequence[tuple[int, int]], targets: Sequence[Target],
             generator: torch.Generator | None = None) -> PasteSegments:
        """Every random draw for a batch, ahead of pasting (a worker's share when the paste runs
        later, on the device): which segments each image gets, decoded, and their layout for images
        of ``sizes`` (each image's size, or the part of it to paste into). :meth:`paste` or a call
        with ``segments=`` applies them."""
        segments = self.fetch(len(sizes), generator)
        sizes = [tuple(int(v) for v in s) for s in sizes]
        segments.placements = self.draw_placements(sizes, targets, segments, generator)
        segments.sizes = sizes
        return segments

    # -- apply -------------------------------------------------------------------------------------
    def __call__(self, images, targets, segments: PasteSegments | None = None,
                 generator: torch.Generator | None = None, extents: Sequence[tuple[int, int]] | None = None):
        single = isinstance(images, torch.Tensor) and images.ndim == 3
        if single or isinstance(targets, Mapping):  # one sample (a non-tensor image is refused below)
            images, targets = [images], [targets]
        if not isinstance(images, (torch.Tensor, list, tuple)):
            images = [images]
        batch = list(images)
        for image, target in zip(batch, targets):
            _check_target(image, target)
        if segments is None:
            sizes = [tuple(im.shape[-2:]) for im in batch] if extents is None else [tuple(e) for e in extents]
            segments = self.draw(sizes, [_cropped_target(t, *s) for t, s in zip(targets, sizes)], generator)
        elif segments.placements is None:  # fetched without a layout: draw it here
            sizes = [tuple(im.shape[-2:]) for im in batch] if extents is None else [tuple(e) for e in extents]
            segments.placements = self.draw_placements(sizes, [_cropped_target(t, *s) for t, s in
                                                               zip(targets, sizes)], segments, generator)
            segments.sizes = sizes
        extents = None if segments.sizes is None else _drawn_extents(segments.sizes, batch)
        stacked = isinstance(images, torch.Tensor) and not single and extents is None
        out_images, out_targets = self.paste(images if stacked else batch, targets, segments, segments.placements,
                                             extents)
        if self.referring is not None:
            if any("masks" not in t for t in targets):
                raise ValueError("referring expressions are measured on instance masks; these targets have "
                                 "boxes only (drop referring=, or give masks)")
            for image, target, before in zip(out_images, out_targets, targets):
                target["referring"] = self.refer(image, target, generator, before)
        if single:
            return out_images[0], out_targets[0]
        if isinstance(images, torch.Tensor):
            return _restack(out_images), out_targets
        return out_images, out_targets

    def paste(self, images: Sequence[torch.Tensor], targets: Sequence[Target], segments: PasteSegments,
              params: Sequence[Placement], extents: Sequence[tuple[int, int]] | None = None,
              ) -> tuple[list[torch.Tensor], list[Target]]:
        """Composite every image with its placement and rewrite its target (no random draw: the
        same inputs give the same outputs, on any device); with ``extents``, into each image's
        top-left (h, w) only (the rest, padding, comes back as it was)."""
        if len(images) != len(targets) or len(images) != len(params):
            raise ValueError(f"{len(images)} images, {len(targets)} targets and {len(params)} placements")
        for image, target in zip(images, targets):
            _check_target(image, target)
        if extents is not None:
            return self._paste_into(images, targets, segments, params, extents)
        device = images[0].device if len(images) else torch.device("cpu")
        rgba = segments.to(device).rgba  # one transfer for all segments
        instances = [_instances(t, device, im.shape[-2:]) for t, im in zip(targets, images)]
        piece_labels = [segments.labels[p.segment] for p in params]
        results = paste(images if isinstance(images, torch.Tensor) else list(images),
                        instances, rgba, params, piece_labels, self.drop, self.feather_sigma, self.backend,
                        self.boxes)
        kept_src = [p.segment[r.pasted_kept] for p, r in zip(params, results)]
        out_images, out_targets = [], []
        for image, target, kept, res in zip(images, targets, kept_src, results):
            img, tgt = self._new_target(image, target, segments, kept, res)
            out_images.append(img)
            out_targets.append(tgt)
        if self.relight is not None:
            out_images = self._relight(out_images, results)
        return out_images, out_targets

    def _paste_into(self, images, targets, segments, params, extents) -> tuple[list[torch.Tensor], list[Target]]:
        """:meth:`paste` into each image's top-left extent, grown to cover every instance (so no
        instance pixel is ever cut off), and the padding put back around the result."""
        extents = [_covering(t, *e) for t, e in zip(targets, extents)]
        crops = [im[:, :h, :w] for im, (h, w) in zip(images, extents)]
        cut = [_cropped_target(t, h, w) for t, (h, w) in zip(targets, extents)]
        out_images, out_targets = self.paste(crops, cut, segments, params)
        return ([_uncropped_image(full, out) for full, out in zip(images, out_images)],
                [_uncropped_target(t, *full.shape[-2:]) for t, full in zip(out_targets, images)])

    def refer(self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None,
              before: Target | None = None) -> list[dict]:
        """Verified referring expressions for one output (``referring``): pasted segments named by
        their bank text's short phrase where it has one and judged against their source's size;
        existing instances against their masks in ``before`` (the input target), where given."""
        labels = target["labels"].tolist()
        names = target.get("names") or [self.label_names.get(int(lab), str(lab)) for lab in labels]
        phrases: list[str | None] = [None] * len(labels)
        sources: list[tuple[int, int] | None] = [None] * len(labels)
        originals: list[torch.Tensor | None] = [None] * len(labels)
        pasted = target["is_pasted"].nonzero().flatten().tolist()
        records = self.bank.index[target["pasted_rows"].cpu().numpy()] if pasted else []
        for row, record in zip(pasted, records):
            phrases[row] = self.bank.text(int(record["text"])).get("short_phrase")
            sources[row] = (int(record["height"]), int(record["width"]))
        if before is not None and "masks" in before:
            old = before["masks"].as_subclass(torch.Tensor).bool()
            existing = (~target["is_pasted"]).nonzero().flatten().tolist()
            for row, source_row in zip(existing, target["kept_rows"].tolist()):
                originals[row] = old[source_row]
        return self.referring(image, target, names, phrases, generator, sources, originals)

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
        out["kept_rows"] = keep.nonzero().flatten()  # the input rows of the existing survivors
        img = res.image
        if isinstance(image, tv_tensors.Image):
            img = tv_tensors.wrap(img, like=image)
        return img, out


_INSTANCE_KEYS = {"boxes", "labels", "masks", "iscrowd", "area", "is_pasted", "names", "pasted_rows", "kept_rows",
                  "referring"}


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


def _restack(images: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(images)``, without the copy when they already are the rows of one batch (as
    the batched paste and the accelerator relighting return them)."""
    base = consecutive_base(images) if all(im.shape == images[0].shape for im in images) else None
    return torch.stack(images) if base is None else base.view(len(images), *images[0].shape)


def _drawn_extents(sizes, images: Sequence[torch.Tensor]) -> list[tuple[int, int]] | None:
    """Where the drawn layouts go: ``None`` when they were drawn for the images' full sizes, else
    each image's top-left part of the size drawn for (the image before padding)."""
    full = [tuple(im.shape[-2:]) for im in images]
    drawn = [tuple(int(v) for v in s) for s in sizes]
    if drawn == full:
        return None
    if len(drawn) != len(full) or any(dh > h or dw > w for (dh, dw), (h, w) in zip(drawn, full)):
        raise ValueError(f"the segments' layouts were drawn for images of sizes {drawn}, but these images are "
                         f"{full}: draw them after every transform that resizes or crops (CopyPasteCollate(defer=True) "
                         "draws after the dataset's transforms), or draw here (segments.placements = None)")
    return drawn


def _covering(target: Target, h: int, w: int) -> tuple[int, int]:
    """``(h, w)`` grown to cover every instance of ``target`` (its masks' pixels, or its boxes)."""
    if "masks" in target:
        masks = target["masks"].as_subclass(torch.Tensor)
        masks = masks.view(torch.uint8) if masks.dtype == torch.bool else masks  # bool reductions are ~10x slower
        if masks.shape[-2] > h and masks.numel() and masks[:, h:].amax():
            h = int(masks.amax((0, 2)).nonzero()[-1]) + 1
        if masks.shape[-1] > w and masks.numel() and masks[:, :, w:].amax():
            w = int(masks.amax((0, 1)).nonzero()[-1]) + 1
    elif len(target["labels"]):
        boxes = _xyxy(target)
        h, w = max(h, int(boxes[:, 3].max().ceil())), max(w, int(boxes[:, 2].max().ceil()))
    return h, w


def _cropped_target(target: Target, h: int, w: int) -> Target:
    """``target`` with its masks cut to the top-left (h, w) (views; boxes as they are)."""
    if "masks" not in target or tuple(target["masks"].shape[-2:]) == (h, w):
        return target
    return {**target, "masks": target["masks"][..., :h, :w]}


def _uncropped_image(full: torch.Tensor, pasted: torch.Tensor) -> torch.Tensor:
    """The pasted top-left part back in a copy of the full (padded) image, in its type."""
    if pasted.shape == full.shape:
        return pasted
    out = _framed(pasted, full.as_subclass(torch.Tensor))
    return tv_tensors.wrap(out, like=full) if isinstance(full, tv_tensors.Image) else out


def _framed(top_left: torch.Tensor, frame: torch.Tensor | None, height: int = 0, width: int = 0) -> torch.Tensor:
    """A new (..., H, W) tensor holding ``top_left`` in its top-left corner and, around it, the
    pixels of ``frame`` (zeros where None, at ``height`` x ``width``). Every byte is written once:
    a clone or a zero fill first would write the top-left twice (a full mask stack at 1024²)."""
    h, w = top_left.shape[-2:]
    shape = frame.shape if frame is not None else (*top_left.shape[:-2], height, width)
    out = top_left.new_empty(shape)
    out[..., :h, :w] = top_left
    for rows, cols in ((slice(h, None), slice(None)), (slice(None, h), slice(w, None))):  # bottom, right
        if frame is None:
            out[..., rows, cols] = 0
        else:
            out[..., rows, cols] = frame[..., rows, cols]
    return out


def _uncropped_target(target: Target, height: int, width: int) -> Target:
    """Masks zero-padded back to the full image's size (nothing is ever in the padding)."""
    if "masks" not in target or tuple(target["masks"].shape[-2:]) == (height, width):
        return target
    masks = target["masks"].as_subclass(torch.Tensor)
    full = _framed(masks, None, height, width)
    boxes = target["boxes"]
    if isinstance(boxes, tv_tensors.BoundingBoxes):
        boxes = tv_tensors.wrap(boxes, like=boxes, canvas_size=(height, width))
    return {**target, "masks": _wrap_like(target["masks"], full), "boxes": boxes}


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

    The relighters' compiled CPU code (the net's and LabBlend's pixel loops; the net's forward
    with ``compile_cpu=True``) is compiled here, when the collate is made
    (:func:`sos_aug.relight.batch.warm_up`; seconds, or less where numba's cache has it): workers
    forked from this process (Linux's default) then inherit it instead of compiling it in every
    worker and every epoch. ``warm_up=False`` skips that.
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
            segments = self.cp.draw([tuple(im.shape[-2:]) for im in images], targets, self.generator())
            return self._collate(images, targets) + (segments,)
        images, targets = self.cp(images, targets, generator=self.generator())
        return self._collate(images, targets)

    def _collate(self, images, targets) -> tuple:
        if self.collate_fn is not None:
            return tuple(self.collate_fn(list(zip(images, targets))))
        return tuple(images), tuple(targets)
