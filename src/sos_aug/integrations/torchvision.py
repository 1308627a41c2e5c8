"""Plain PyTorch / torchvision: the pieces a training loop around :class:`~sos_aug.CopyPaste` needs
and torchvision leaves out: large-scale jitter that keeps every per-instance key aligned, and COCO
evaluation of a torchvision detector's outputs with pycocotools."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..ops.masks import tight_boxes

INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area", "is_pasted")


class TightenInstances(torch.nn.Module):
    """After a crop: drop the instances whose mask lost every pixel, from every per-instance key
    alike (``SanitizeBoundingBoxes`` leaves ``iscrowd`` and ``area`` behind), and give every box
    the tight box of its mask (a crop only clamps boxes, so a cut object's box can outgrow what is
    left of it), as detectron2's ``recompute_boxes`` does."""

    def forward(self, image, target: dict):
        keep = target["masks"].flatten(1).any(1)
        out = dict(target)
        for key in INSTANCE_KEYS:
            if key in out and torch.is_tensor(out[key]) and len(out[key]) == len(keep):
                out[key] = _like(out[key], out[key][keep])
        masks = out["masks"].as_subclass(torch.Tensor).bool()
        boxes = target["boxes"]
        if isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
            raise ValueError(f"TightenInstances expects XYXY boxes, got {boxes.format}")
        out["boxes"] = _like(boxes, tight_boxes(masks).to(boxes.dtype))
        if "area" in out:
            out["area"] = _like(out["area"], masks.flatten(1).sum(1).to(out["area"].dtype))
        return image, out


def _like(like: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    return tv_tensors.wrap(tensor, like=like) if isinstance(like, tv_tensors.TVTensor) else tensor


def large_scale_jitter(size: int, scale_range: tuple[float, float] = (0.1, 2.0), flip: float = 0.5) -> v2.Compose:
    """LSJ as in Copy-Paste (Ghiasi et al.): scale the image by a factor in ``scale_range`` of a
    ``size`` square, crop or pad to ``size`` x ``size``, flip; instances cut away are dropped."""
    return v2.Compose([v2.ScaleJitter((size, size), scale_range=scale_range, antialias=True),
                       v2.RandomCrop(size, pad_if_needed=True), v2.RandomHorizontalFlip(flip),
                       TightenInstances()])


def coco_detections(output: dict, image_id: int, score_threshold: float = 0.0) -> dict[str, list[dict]]:
    """A torchvision detector's output for one image as COCO result records: ``bbox`` (XYWH) and,
    where it predicts masks, ``segm`` (RLE of the mask thresholded at 0.5)."""
    out: dict[str, list[dict]] = {"bbox": [], "segm": []}
    masks = output.get("masks")
    for k, (box, score, label) in enumerate(zip(output["boxes"].tolist(), output["scores"].tolist(),
                                                output["labels"].tolist())):
        if score < score_threshold:
            continue
        x1, y1, x2, y2 = box
        common = {"image_id": int(image_id), "category_id": int(label), "score": float(score)}
        out["bbox"].append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray((masks[k, 0] > 0.5).cpu().numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            out["segm"].append({**common, "segmentation": rle})
    return out


def coco_evaluate(gt: COCO | str | Path, detections: Iterable[dict[str, list[dict]]],
                  image_ids: list[int] | None = None) -> dict[str, COCOeval | None]:
    """COCOeval for ``bbox`` and ``segm`` over the records of :func:`coco_detections` (None for a
    kind without a detection); ``image_ids`` restricts the evaluation (a subset of the file)."""
    if not isinstance(gt, COCO):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(gt))
    merged: dict[str, list[dict]] = {"bbox": [], "segm": []}
    for d in detections:
        for kind in merged:
            merged[kind] += d.get(kind, [])
    out: dict[str, COCOeval | None] = {}
    for kind, dets in merged.items():
        if not dets:
            out[kind] = None
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(dets), kind)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[kind] = ev
    return out


def summary(evals: dict[str, COCOeval | None]) -> dict[str, float]:
    """AP and AP50 (in %) of each kind; 0 where nothing was detected."""
    out = {}
    for kind, ev in evals.items():
        out[f"{kind}_AP"] = round(100 * float(ev.stats[0]), 2) if ev else 0.0
        out[f"{kind}_AP50"] = round(100 * float(ev.stats[1]), 2) if ev else 0.0
    return out
