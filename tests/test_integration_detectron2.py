"""CopyPasteMapper and DevicePasteLoader with detectron2's own DatasetMapper on coco-mini: polygon
annotations, the LSJ augmentations (ResizeScale + FixedSizeCrop), the core's invariants on what the
model would receive. detectron2 is not on the package index: these tests skip where it is not
built (its data handling, sos_aug.integrations.common, is tested in test_integration_common.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI: build it from source, "
                    "see the README's detectron2 section)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.structures import BitMasks, PolygonMasks  # noqa: E402
from invariants import match_existing  # noqa: E402

from sos_aug.integrations.detectron2 import (  # noqa: E402
    CopyPasteMapper,
    DevicePasteLoader,
    add_sos_config,
    copy_paste_from_config,
)
from sos_aug.ops.masks import tight_boxes  # noqa: E402

NAME = "sos_coco_mini_train"


@pytest.fixture(scope="module")
def cfg(coco_mini, train_bank):
    if NAME not in DatasetCatalog.list():
        register_coco_instances(NAME, {}, str(coco_mini / "annotations" / "instances_train2017.json"),
                                str(coco_mini / "train2017"))
    c = get_cfg()
    add_sos_config(c)
    c.DATASETS.TRAIN = (NAME,)
    c.INPUT.MASK_FORMAT = "polygon"
    c.INPUT.SOS.ENABLED = True
    c.INPUT.SOS.BANK = str(train_bank.root)
    c.INPUT.SOS.NUM_PASTES = (2, 6)
    return c


@pytest.fixture(scope="module")
def dicts():
    return DatasetCatalog.get(NAME)


def lsj_mapper(cfg):
    augs = [T.ResizeScale(min_scale=0.5, max_scale=1.5, target_height=384, target_width=384),
            T.FixedSizeCrop(crop_size=(384, 384)), T.RandomFlip()]
    return DatasetMapper(cfg, is_train=True, augmentations=augs, image_format="BGR", use_instance_mask=True,
                         instance_mask_format="polygon", recompute_boxes=True)


def check(before: dict, after: dict) -> None:
    inst = after["instances"]
    assert isinstance(inst.gt_masks, BitMasks)
    masks, pasted = inst.gt_masks.tensor, inst.is_pasted
    assert pasted.any()
    assert torch.equal(inst.gt_boxes.tensor[pasted], tight_boxes(masks[pasted]).float())
    classes = MetadataCatalog.get(NAME).thing_classes
    assert all(0 <= c < len(classes) for c in inst.gt_classes.tolist())
    old = before["instances"]
    old_masks = old.gt_masks
    h, w = before["image"].shape[-2:]
    old_masks = BitMasks.from_polygon_masks(old_masks, h, w).tensor if isinstance(old_masks, PolygonMasks) \
        else old_masks.tensor
    covered = masks[pasted].any(0)
    changed = (after["image"] != before["image"]).any(0)
    rows = match_existing(masks[~pasted], old_masks, covered, changed)
    assert torch.equal(inst.gt_classes[~pasted], old.gt_classes[rows])
    assert changed[covered].float().mean() > 0.5


def test_mapper_pastes_exactly_after_lsj_with_polygon_annotations(cfg, dicts):
    plain, sos = lsj_mapper(cfg), CopyPasteMapper(cfg, mapper=lsj_mapper(cfg))
    for i in range(4):
        torch.manual_seed(i)  # detectron2's augmentations draw from NumPy, the paste from torch
        np.random.seed(i)
        before = plain(copy.deepcopy(dicts[i]))
        np.random.seed(i)
        after = sos(copy.deepcopy(dicts[i]))
        assert after["image"].shape == before["image"].shape == (3, 384, 384)
        check(before, after)


def test_device_loader_pastes_what_the_workers_drew(cfg, dicts):
    cp = copy_paste_from_config(cfg)
    deferred = CopyPasteMapper(cfg, mapper=lsj_mapper(cfg), copy_paste=cp, defer=True)
    np.random.seed(0)
    torch.manual_seed(0)
    batch = [deferred(copy.deepcopy(d)) for d in dicts[:3]]
    assert all("sos_segments" in d for d in batch)
    before = [{"image": d["image"].clone(), "instances": d["instances"]} for d in batch]
    (out,) = list(DevicePasteLoader([batch], cp, device="cpu"))
    for b, a in zip(before, out):
        assert "sos_segments" not in a
        check(b, a)


def test_train_net_builds_a_pasting_loader_from_the_shipped_config(coco_mini, train_bank):
    """examples/detectron2/train_net.py with configs/detectron2's yaml: its loader yields LSJ
    batches whose instances include pasted ones."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("d2_train_net", root / "examples" / "detectron2" / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    args = train_net.parser().parse_args([
        "--config-file", str(root / "configs" / "detectron2" / "mask_rcnn_R_50_FPN_lsj_coco-1pct_sos.yaml"),
        "--train-json", str(coco_mini / "annotations" / "instances_train2017.json"),
        "--train-images", str(coco_mini / "train2017"),
        "INPUT.SOS.BANK", str(train_bank.root), "INPUT.LSJ_SIZE", "256", "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", "/tmp/sos_d2_test"])
    if "sos_train" in DatasetCatalog.list():
        DatasetCatalog.remove("sos_train")
        MetadataCatalog.remove("sos_train")
    cfg = train_net.setup(args)
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    assert len(batch) == 2 and all(d["image"].shape[-2:] == (256, 256) for d in batch)
    assert sum(int(d["instances"].is_pasted.sum()) for d in batch) > 0
