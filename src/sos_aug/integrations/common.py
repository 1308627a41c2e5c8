"""What every framework adapter shares, in plain torch (so CI tests it without the frameworks):
a :class:`CopyPaste` built from config values, and pasting into instances handed over as arrays,
box-only ones included.

The adapters (:mod:`.mmdet`, :mod:`.detectron2`) only convert their framework's types to
:class:`Instances` and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bank.store import SegmentBank
from ..layout import LAYOUTS, Layout
from ..ops.masks import filled_boxes
from ..relight.named import make_relighter
from ..transforms import CopyPaste, PasteSegments


def make_copy_paste(
    bank: str | Path | SegmentBank,
    classes: Sequence[str],
    layout: str | Layout = "random",
    num_pastes: tuple[int, int] = (1, 10),
    prob: float = 1.0,
    relight: str | Sequence[Any] | None = None,
    drop: str = "visible_fraction",
    feather_sigma: float = 0.0,
    sampling: str = "uniform",
    reference: str | Path | None = None,
    t: float = 0.001,
    relight_weights: str | None = None,
) -> CopyPaste:
    """A :class:`CopyPaste` from the values a config holds: the bank's path, the dataset's class
    names in label order (label = position in ``classes``), a layout name (``random``, ``sos``,
    ``existing``), relighter names and the bank's sampling (``repeat_factor`` with ``reference``:
    the training set's instances file, LVIS's rule)."""
    if isinstance(bank, SegmentBank):
        if sampling != bank.sampling or reference is not None:
            bank = bank.with_sampling(sampling, t, reference)
    else:
        bank = SegmentBank(bank, sampling=sampling, t=t, reference=reference)
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
        layout = LAYOUTS[layout]()
    label_map = {name: i for i, name in enumerate(classes)}
    return CopyPaste(bank, layout=layout, num_pastes=tuple(num_pastes), p=prob, feather_sigma=feather_sigma,
                     drop=drop, label_map=label_map, relight=make_relighter(relight, relight_weights))


@dataclass
class Instances:
    """One image's instances as a framework hands them over: XYXY ``boxes`` (N, 4), ``labels`` (N,),
    ``masks`` (N, H, W) bool or ``None`` for a box-only dataset, ``ignore`` (N,) bool (crowd regions
    and ignored instances: kept, never pasted over as targets)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    ignore: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Pasted(Instances):
    """The instances after pasting: existing ones first (those still visible), then pasted ones.
    ``source`` is each row's index in the input :class:`Instances`, -1 for a pasted row."""

    source: torch.Tensor

    @property
    def is_pasted(self) -> torch.Tensor:
        return self.source < 0


def paste_instances(cp: CopyPaste, images: Sequence[torch.Tensor], instances: Sequence[Instances],
                    segments: PasteSegments | None = None, generator: torch.Generator | None = None,
                    extents: Sequence[tuple[int, int]] | None = None) -> tuple[list[torch.Tensor], list[Pasted]]:
    """Paste into (3, H, W) RGB images (uint8, or float in [0, 1]) with their instances.

    Masked instances get CopyPaste's exact masks and boxes. A box-only instance counts as its filled
    box: it is dropped when the pasted segments leave less of it visible than ``cp.drop`` allows,
    otherwise it keeps its input box unchanged; no mask is made up for it, and pasted instances in a
    box-only image come with boxes (their masks' tight boxes) and no masks.

    ``extents``: each image's (h, w) before padding (:func:`unpadded_extent`); segments go into
    that top-left part only, and the padding comes back untouched."""
    extents = [tuple(e) for e in extents] if extents is not None else [tuple(im.shape[-2:]) for im in images]
    crops = [im[:, :h, :w] for im, (h, w) in zip(images, extents)]
    cut = [_cropped(inst, h, w) for inst, (h, w) in zip(instances, extents)]
    targets = [_target(im, inst) for im, inst in zip(crops, cut)]
    out_images, out_targets = cp(crops, targets, segments=segments, generator=generator)
    pasted = [_pasted(inst, t) for inst, t in zip(cut, out_targets)]
    return ([_uncropped_image(full, out) for full, out in zip(images, out_images)],
            [_uncropped(p, *full.shape[-2:]) for p, full in zip(pasted, images)])


def unpadded_extent(image: torch.Tensor) -> tuple[int, int]:
    """The (h, w) of a (C, H, W) image's content when padding fills its last rows and columns
    (mmdet's ``Pad``, detectron2's ``FixedSizeCrop``): trailing rows and columns whose every pixel
    equals the bottom-right one are padding. Without padding this is the image's size (unless its
    own last rows are one flat colour: pastes then only stay off them); an image of one colour
    throughout is all content."""
    differs = (image != image[:, -1:, -1:]).any(0)
    rows = differs.any(1).nonzero()
    if len(rows) == 0:
        return tuple(image.shape[-2:])
    return int(rows[-1]) + 1, int(differs.any(0).nonzero()[-1]) + 1


def _cropped(inst: Instances, h: int, w: int) -> Instances:
    if inst.masks is None or tuple(inst.masks.shape[-2:]) == (h, w):
        return inst
    return Instances(inst.boxes, inst.labels, inst.masks[:, :h, :w], inst.ignore)


def _uncropped_image(full: torch.Tensor, pasted: torch.Tensor) -> torch.Tensor:
    """The pasted top-left part back in a copy of the full (padded) image."""
    if pasted.shape == full.shape:
        return pasted
    out = full.clone()
    out[:, : pasted.shape[-2], : pasted.shape[-1]] = pasted
    return out


def _uncropped(p: Pasted, height: int, width: int) -> Pasted:
    """Masks zero-padded back to the full image's size (nothing is ever in the padding)."""
    if p.masks is None or tuple(p.masks.shape[-2:]) == (height, width):
        return p
    masks = p.masks.new_zeros((len(p.masks), height, width))
    masks[:, : p.masks.shape[-2], : p.masks.shape[-1]] = p.masks
    return Pasted(p.boxes, p.labels, masks, p.ignore, p.source)


def _target(image: torch.Tensor, inst: Instances) -> dict:
    """A CopyPaste target whose labels are the instances' row numbers, so that every surviving row
    can be traced back to its input (pasted rows are told apart by ``is_pasted``)."""
    h, w = image.shape[-2:]
    n = len(inst)
    masks = inst.masks if inst.masks is not None else filled_boxes(inst.boxes, h, w)
    return {"boxes": inst.boxes.float().reshape(-1, 4), "labels": torch.arange(n, device=inst.labels.device),
            "masks": masks.bool(), "iscrowd": inst.ignore.long()}


def _pasted(inst: Instances, target: dict) -> Pasted:
    is_pasted = target["is_pasted"]
    source = torch.where(is_pasted, -1, target["labels"])
    old = source[~is_pasted]
    labels = target["labels"].clone()
    labels[~is_pasted] = inst.labels.to(labels.device)[old].to(labels.dtype)
    boxes = torch.as_tensor(target["boxes"]).as_subclass(torch.Tensor).float()
    masks = torch.as_tensor(target["masks"]).as_subclass(torch.Tensor).bool()
    if inst.masks is None:  # box-only: the input boxes stand, no mask is handed back
        boxes = boxes.clone()
        boxes[~is_pasted] = inst.boxes.float().to(boxes.device)[old]
        masks = None
    ignore = target["iscrowd"].bool()
    return Pasted(boxes, labels, masks, ignore, source)
