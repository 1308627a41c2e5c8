"""A fixed-seed CopyPaste run over coco-mini val2017 hashes to the same bytes release after release:
images, masks, boxes, labels, crowd flags, areas, pasted flags and provenance, on the CPU paths a
worker takes (image by image, and a stacked same-size batch). A refactor that changes any output by
one bit fails here. Relighting is left out: its float convolutions round differently on CPUs with
other vector units, and it is compared within 1/255 elsewhere."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from sos_aug import CopyPaste, SOSLayout, label_map_from_coco
from sos_aug.ops.masks import tight_boxes

GOLDEN = {
    "images": "399af12bf84411e05315e744267ec6d0acd0f4c64acb198a549495ce916f1752",
    "stacked": "6a0e7d85b4b1970960eea6ebddea2830ed145f0aef604b8f31aa79da2162ef8c",
}


def digest(images, targets) -> str:
    h = hashlib.sha256()
    for image, target in zip(images, targets):
        h.update(image.as_subclass(torch.Tensor).contiguous().numpy().tobytes())
        h.update(np.packbits(target["masks"].as_subclass(torch.Tensor).bool().numpy()).tobytes())
        for key in ("boxes", "area"):
            h.update(torch.as_tensor(target[key]).as_subclass(torch.Tensor).float().numpy().tobytes())
        for key in ("labels", "iscrowd", "is_pasted", "pasted_rows"):
            h.update(torch.as_tensor(target[key]).as_subclass(torch.Tensor).long().numpy().tobytes())
    return h.hexdigest()


def test_a_fixed_seed_run_is_byte_identical(train_bank, val_set, val_ann):
    cp = CopyPaste(train_bank, layout=SOSLayout(rotation=10), num_pastes=(2, 8), label_map=label_map_from_coco(val_ann))
    g = torch.Generator().manual_seed(2024)
    samples = [val_set[i] for i in range(0, 79, 3)]
    images, targets = cp([s[0] for s in samples], [s[1] for s in samples], generator=g)
    square = [(F.resize(s[0].as_subclass(torch.Tensor), [256, 256], antialias=True),
               {**s[1], "masks": F.resize(s[1]["masks"].as_subclass(torch.Tensor).to(torch.uint8), [256, 256],
                                          interpolation=F.InterpolationMode.NEAREST).bool()}) for s in samples[:6]]
    for _, t in square:  # boxes and areas of the resized masks
        t["boxes"] = tight_boxes(t["masks"])
        del t["area"]
    batch = torch.stack([s[0] for s in square])
    stacked, stacked_targets = cp(batch, [s[1] for s in square], generator=g)
    found = {"images": digest(images, targets), "stacked": digest(stacked, stacked_targets)}
    assert found == GOLDEN
