"""detectron2: ``CopyPasteMapper`` (pastes in the data workers, after the mapper's augmentations,
LSJ's ``ResizeScale`` + ``FixedSizeCrop`` included) and ``DevicePasteLoader`` (pastes the segments
the workers drew on the device, after transfer).

Config keys live under ``cfg.INPUT.SOS`` (:func:`add_sos_config`)::

    cfg.INPUT.SOS.ENABLED = True
    cfg.INPUT.SOS.BANK = "banks/coco_train"
    cfg.INPUT.SOS.LAYOUT = "sos"            # random | sos | existing
    cfg.INPUT.SOS.NUM_PASTES = (1, 10)
    cfg.INPUT.SOS.RELIGHT = ["net", "lab"]
    cfg.INPUT.SOS.SAMPLING = "repeat_factor"   # with REFERENCE: the training set's json (LVIS)

and the trainer builds its loader with ``mapper=CopyPasteMapper(cfg, is_train=True)``. Polygon
annotations come back as ``BitMasks`` (the exact form of an occluded polygon), so detectron2's
polygon assertion never sees a cut polygon. Labels are positions in the training datasets'
``thing_classes``; crowd annotations never reach the mapper's output (DatasetMapper drops them).
Segments go into the image, never into the padding ``FixedSizeCrop`` adds (LSJ).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.structures import BitMasks, Boxes, PolygonMasks
from detectron2.structures import Instances as D2Instances

from ..coco import polygon_masks
from ..copy_paste import CopyPaste
from ..segments import PasteSegments
from .padding import unpadded_extent

SEGMENTS_KEY = "sos_segments"
logger = logging.getLogger(__name__)


def add_sos_config(cfg: CfgNode) -> None:
    """Add ``cfg.INPUT.SOS`` with its defaults (disabled: set ``ENABLED`` and ``BANK``), and
    ``cfg.INPUT.LSJ_SIZE`` (0: off) that the shipped yaml and example use, where it is missing."""
    cfg.INPUT.SOS = CfgNode()
    cfg.INPUT.SOS.ENABLED = False
    cfg.INPUT.SOS.BANK = ""
    cfg.INPUT.SOS.LAYOUT = "random"  # random | sos | stats | existing
    cfg.INPUT.SOS.LAYOUT_FILE = ""  # stats: the annotation file whose instances give sizes and places
    cfg.INPUT.SOS.NUM_PASTES = (1, 10)
    cfg.INPUT.SOS.PROB = 1.0
    cfg.INPUT.SOS.RELIGHT = []
    cfg.INPUT.SOS.RELIGHT_WEIGHTS = ""  # relighting net weights ("": the shipped ones)
    cfg.INPUT.SOS.DROP = "visible_fraction"  # or "mmdet": when an occluded instance is dropped
    cfg.INPUT.SOS.FEATHER_SIGMA = 0.0  # alpha feathering in pixels (0: hard edges)
    cfg.INPUT.SOS.SAMPLING = "uniform"
    cfg.INPUT.SOS.REFERENCE = ""
    cfg.INPUT.SOS.REPEAT_THRESH = 0.001
    cfg.INPUT.SOS.ON_DEVICE = False  # draw in the workers, composite after transfer (DevicePasteLoader)
    if "LSJ_SIZE" not in cfg.INPUT:
        cfg.INPUT.LSJ_SIZE = 0  # >0: large-scale jitter to this square (examples/detectron2/train_net.py)


def copy_paste_from_config(cfg: CfgNode) -> CopyPaste:
    """The :class:`CopyPaste` that ``cfg.INPUT.SOS`` describes; labels follow the first training
    dataset's ``thing_classes``."""
    sos = cfg.INPUT.SOS
    if not sos.BANK:
        raise ValueError("cfg.INPUT.SOS.ENABLED is True but cfg.INPUT.SOS.BANK is empty: set it to a bank folder "
                         "(sos-aug bank build --coco ... --out BANK)")
    name = cfg.DATASETS.TRAIN[0]
    if not hasattr(MetadataCatalog.get(name), "thing_classes"):
        DatasetCatalog.get(name)  # a COCO-format dataset sets its thing_classes when first loaded
    classes = MetadataCatalog.get(name).thing_classes
    return CopyPaste.from_names(bank=sos.BANK, classes=classes, layout=sos.LAYOUT, layout_file=sos.LAYOUT_FILE or None,
                                num_pastes=tuple(sos.NUM_PASTES), prob=sos.PROB, relight=list(sos.RELIGHT) or None,
                                relight_weights=sos.RELIGHT_WEIGHTS or None, drop=sos.DROP,
                                feather_sigma=sos.FEATHER_SIGMA, sampling=sos.SAMPLING,
                                reference=sos.REFERENCE or None, t=sos.REPEAT_THRESH)


class CopyPasteMapper:
    """A mapper (``DatasetMapper`` by default, or any callable from a dataset dict to model input)
    followed by SOS copy-paste on its output ``image`` and ``instances``.

    With ``defer=True`` (``cfg.INPUT.SOS.ON_DEVICE``) it draws the segments and their layout only,
    leaving them in ``dataset_dict['sos_segments']`` for :class:`DevicePasteLoader`."""

    def __init__(self, cfg: CfgNode, is_train: bool = True, mapper: Callable[[dict], dict] | None = None,
                 copy_paste: CopyPaste | None = None, defer: bool | None = None):
        self.mapper = mapper or DatasetMapper(cfg, is_train=is_train)
        self.enabled = is_train and (cfg.INPUT.SOS.ENABLED or copy_paste is not None)
        self.cp = copy_paste or (copy_paste_from_config(cfg) if self.enabled else None)
        if is_train and self.cp is None:
            logger.info("CopyPasteMapper: SOS copy-paste is off (cfg.INPUT.SOS.ENABLED is False); mapping only")
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        self.defer = cfg.INPUT.SOS.ON_DEVICE if defer is None else defer

    def __call__(self, dataset_dict: dict) -> dict:
        out = self.mapper(dataset_dict)
        if self.cp is None or "instances" not in out:
            return out
        image, target = to_target(out["image"], out["instances"], self.bgr)
        extent = unpadded_extent(image)  # FixedSizeCrop pads bottom and right
        if self.defer:  # the worker's share: every draw, for the image before padding
            out[SEGMENTS_KEY] = self.cp.draw([extent], [target])
            return out
        pasted_image, pasted = self.cp(image, target, extents=[extent])
        out["image"], out["instances"] = from_target(pasted_image, pasted, out["instances"], self.bgr)
        return out


class DevicePasteLoader:
    """Wrap a detectron2 train loader whose mapper deferred the paste: each batch's images and
    instances go to ``device`` and are pasted there (same-size images in one batched call), so the
    model receives them already on the device. Use it in ``build_train_loader``."""

    def __init__(self, loader: Iterable[list[dict]], copy_paste: CopyPaste, device: str | torch.device = "cuda",
                 bgr: bool = True):
        self.loader, self.cp, self.device, self.bgr = loader, copy_paste, torch.device(device), bgr

    def __iter__(self) -> Iterator[list[dict]]:
        for batch in self.loader:
            yield paste_on_device(self.cp, batch, self.device, self.bgr)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def paste_on_device(cp: CopyPaste, batch: list[dict], device: torch.device, bgr: bool = True) -> list[dict]:
    """Composite the segments each dict carries (``sos_segments``) on ``device``."""
    if not batch or any(SEGMENTS_KEY not in d for d in batch):
        return batch
    images, targets = zip(*[to_target(d["image"].to(device, non_blocking=True), d["instances"].to(device), bgr)
                            for d in batch])
    segments = PasteSegments.concat([d.pop(SEGMENTS_KEY) for d in batch]).to(device)
    out_images, pasted = cp(list(images), list(targets), segments=segments)  # into each drawn extent
    for d, image, target in zip(batch, out_images, pasted):
        d["image"], d["instances"] = from_target(image, target, d["instances"], bgr)
    return batch


def to_target(image: torch.Tensor, instances: D2Instances, bgr: bool = True) -> tuple[torch.Tensor, dict]:
    """A mapper's (C, H, W) image and ``Instances`` -> an RGB image and its target (no ``masks``
    where the mapper gave none)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"CopyPasteMapper needs a (3, H, W) image, got shape {tuple(image.shape)}")
    h, w = image.shape[-2:]
    rgb = image.flip(0) if bgr else image
    target = {"boxes": instances.gt_boxes.tensor.float(), "labels": instances.gt_classes.long()}
    if instances.has("gt_masks"):
        m = instances.gt_masks
        masks = polygon_masks(m.polygons, h, w) if isinstance(m, PolygonMasks) else m.tensor.bool()
        target["masks"] = masks.to(image.device)
    return rgb, target


def from_target(image: torch.Tensor, target: dict, like: D2Instances, bgr: bool = True) -> tuple[torch.Tensor, Any]:
    """Back to detectron2: the image in the mapper's channel order, ``Instances`` with ``gt_boxes``,
    ``gt_classes``, ``gt_masks`` as ``BitMasks`` (where the input had masks) and ``is_pasted``."""
    out = D2Instances(like.image_size)
    out.gt_boxes = Boxes(torch.as_tensor(target["boxes"]).float())
    out.gt_classes = target["labels"].to(like.gt_classes.dtype)
    if "masks" in target:
        out.gt_masks = BitMasks(target["masks"])
    out.is_pasted = target["is_pasted"]
    return (image.flip(0) if bgr else image).contiguous(), out
