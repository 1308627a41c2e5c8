"""COCO/LVIS instances: a dataset in torchvision's detection format with dense masks, and the
photo-by-photo reader that relighting's training and evaluation use. Unreadable images and bad
segmentations are counted skips, never a crash mid-epoch."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .bank.sources import image_path, load_coco, read_rgb, segmentation_to_mask
from .ops.masks import tight_boxes


@dataclass
class Skips:
    """Bad inputs left out, counted by reason, with the first example of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, what: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, what)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __str__(self) -> str:
        return describe_skips(self.counts, self.examples) or "nothing skipped"


def describe_skips(counts: dict[str, int], examples: dict[str, str]) -> str:
    """'2 missing_image (e.g. path), ...': skip counts by reason, for a report."""
    return ", ".join(f"{n} {reason} (e.g. {examples[reason]})" for reason, n in sorted(counts.items()))


def annotated_photos(ann_file: str | Path, images: str | Path, image_ids: list[int] | None = None,
                     skips: Skips | None = None) -> Iterator[tuple[dict, np.ndarray, list[tuple[dict, np.ndarray]]]]:
    """Each image with non-crowd instances, in id order: its JSON entry, its (H, W, 3) uint8 pixels
    and (annotation, (H, W) bool mask) pairs in file order. Unreadable images and bad or empty
    segmentations go to ``skips``; a missing image folder is an error up front."""
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: image folder not found")
    data = load_coco(ann_file, ("images", "annotations"))
    skips = Skips() if skips is None else skips
    wanted = None if image_ids is None else set(image_ids)
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd"):
            by_image.setdefault(a.get("image_id"), []).append(a)
    for info in sorted(data["images"], key=lambda im: im["id"]):
        anns = by_image.get(info["id"])
        if not anns or (wanted is not None and info["id"] not in wanted):
            continue
        rgb, problem = read_rgb(image_path(images, info))
        if rgb is None:
            skips.add(*problem)
            continue
        pairs = [(a, m) for a in anns if (m := _instance_mask(a, rgb.shape[:2], skips)) is not None]
        if pairs:
            yield info, rgb, pairs


def _instance_mask(ann: dict, hw: tuple[int, int], skips: Skips) -> np.ndarray | None:
    """An annotation's mask at (H, W), or None (counted in ``skips``) if it is bad or empty."""
    try:
        mask = segmentation_to_mask(ann.get("segmentation"), *hw)
    except ValueError as err:
        skips.add(str(err), f"annotation {ann.get('id')}")
        return None
    if not mask.any():
        skips.add("empty_mask", f"annotation {ann.get('id')}")
        return None
    return mask


class CocoInstances(Dataset):
    """``(image, target)`` pairs: a uint8 (3, H, W) ``tv_tensors.Image`` and a dict with ``boxes``
    (``BoundingBoxes``: tight pixel-edge XYXY boxes of the rasterised masks), ``labels`` (category
    ids), ``masks`` (``Mask``, N x H x W bool), ``iscrowd``, ``area`` (mask pixels) and ``image_id``,
    so torchvision v2 transforms apply to the whole sample.

    Instances whose segmentation is empty or degenerate are left out, and an image that cannot be
    read is replaced by the next readable one (with a warning naming the file): both counted in
    ``skipped``, so a bad file never stops an epoch.
    """

    MAX_REPLACEMENTS = 16  # unreadable images in a row before giving up: the folder is wrong, not a file

    def __init__(self, ann_file: str | Path, images: str | Path, image_ids: list[int] | None = None,
                 only_annotated: bool = True):
        self.ann_file, self.images = Path(ann_file), Path(images)
        if not self.images.is_dir():
            raise FileNotFoundError(f"{self.images}: image folder not found")
        data = load_coco(self.ann_file)
        self.categories = data["categories"]
        self.anns: dict[int, list] = {}
        for a in data["annotations"]:
            self.anns.setdefault(a.get("image_id"), []).append(a)
        infos = sorted(data["images"], key=lambda im: im["id"])
        if image_ids is not None:
            wanted = set(image_ids)
            infos = [im for im in infos if im["id"] in wanted]
        if only_annotated:
            infos = [im for im in infos if self.anns.get(im["id"])]
        self.infos = infos
        self.skipped = Skips()

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, i: int):
        self.infos[i]  # past the end is an IndexError, as for any sequence
        tries = min(self.MAX_REPLACEMENTS, len(self))
        for k in range(tries):
            info = self.infos[(i + k) % len(self)]
            rgb, problem = read_rgb(image_path(self.images, info))
            if rgb is not None:
                return self._sample(info, rgb)
            self.skipped.add(*problem)
            warnings.warn(f"CocoInstances: skipped {problem[1]} ({problem[0]}); using the next image", stacklevel=2)
        raise FileNotFoundError(f"{self.images}: {tries} images in a row could not be read ({self.skipped})")

    def _sample(self, info: dict, rgb: np.ndarray):
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
        h, w = image.shape[-2:]
        masks, labels, crowd = [], [], []
        for a in self.anns.get(info["id"], []):
            m = _instance_mask(a, (h, w), self.skipped)
            if m is None:
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
