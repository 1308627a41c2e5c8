"""A COCO/LVIS instances dataset in torchvision's detection format, with dense masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .bank.sources import segmentation_to_mask
from .composite import tight_boxes


class CocoInstances(Dataset):
    """``(image, target)`` pairs: a uint8 (3, H, W) ``tv_tensors.Image`` and a dict with ``boxes``
    (``BoundingBoxes``: tight pixel-edge XYXY boxes of the rasterised masks), ``labels`` (category
    ids), ``masks`` (``Mask``, N x H x W bool), ``iscrowd``, ``area`` (mask pixels) and ``image_id``,
    so torchvision v2 transforms apply to the whole sample.

    Instances whose segmentation is empty or degenerate are left out and counted in ``skipped``.
    """

    def __init__(self, ann_file: str | Path, images: str | Path, image_ids: list[int] | None = None,
                 only_annotated: bool = True):
        self.ann_file, self.images = Path(ann_file), Path(images)
        with open(self.ann_file) as f:
            data = json.load(f)
        self.categories = data["categories"]
        self.anns: dict[int, list] = {}
        for a in data["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        infos = sorted(data["images"], key=lambda im: im["id"])
        if image_ids is not None:
            wanted = set(image_ids)
            infos = [im for im in infos if im["id"] in wanted]
        if only_annotated:
            infos = [im for im in infos if self.anns.get(im["id"])]
        self.infos = infos
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, i: int):
        info = self.infos[i]
        name = info.get("file_name") or Path(info.get("coco_url", "")).name
        path = self.images / name
        with Image.open(path) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        h, w = image.shape[-2:]
        masks, labels, crowd = [], [], []
        for a in self.anns.get(info["id"], []):
            try:
                m = segmentation_to_mask(a["segmentation"], h, w)
            except ValueError as err:
                self.skipped[str(err)] = self.skipped.get(str(err), 0) + 1
                continue
            if not m.any():
                self.skipped["empty_mask"] = self.skipped.get("empty_mask", 0) + 1
                continue
            masks.append(torch.from_numpy(m))
            labels.append(a["category_id"])
            crowd.append(int(a.get("iscrowd", 0)))
        mask_t = torch.stack(masks).bool() if masks else torch.zeros(0, h, w, dtype=torch.bool)
        target = {
            "boxes": tv_tensors.BoundingBoxes(tight_boxes(mask_t), format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor(labels, dtype=torch.long),
            "masks": tv_tensors.Mask(mask_t),
            "iscrowd": torch.tensor(crowd, dtype=torch.long),
            "area": mask_t.flatten(1).sum(1).float(),
            "image_id": info["id"],
        }
        return tv_tensors.Image(image), target


def collate_detection(batch):
    """torchvision detection references' collate: a tuple of images and a tuple of targets."""
    return tuple(zip(*batch))
