"""CopyPasteMapper and DevicePasteLoader with detectron2's own DatasetMapper on coco-mini: polygon
annotations, the LSJ augmentations (ResizeScale + FixedSizeCrop), the core's invariants on what the
model would receive. detectron2 is not on the package index: these tests skip where it is not
built (what it stands on, CopyPaste on box-only targets and into unpadded extents, is tested in
test_copy_paste_extents.py)."""

from __future__ import annotations

import copy
from pathlib import Path

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


def test_polygons_rasterised_in_their_boxes_are_detectron2s_bitmasks(coco_mini):
    """What the mapper's polygons become (coco.polygon_masks): BitMasks.from_polygon_masks bit for bit
    on real COCO polygons scaled (0.1x-4x) and moved, partly or wholly outside the image, several
    parts per instance."""
    import json

    from sos_aug.coco import polygon_masks

    anns = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())["annotations"]
    polygons = [a["segmentation"] for a in anns if isinstance(a["segmentation"], list)]
    assert any(len(p) > 1 for p in polygons)
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(50, 700, 2))
        instances = []
        for j in rng.integers(0, len(polygons), int(rng.integers(1, 9))):
            scale, (dx, dy) = rng.uniform(0.1, 4.0), rng.uniform(-300, 600, 2)
            instances.append([np.asarray(p) * scale + np.tile([dx, dy], len(p) // 2) for p in polygons[j]])
        masks = PolygonMasks(instances)
        expected = BitMasks.from_polygon_masks(masks, h, w).tensor
        assert torch.equal(polygon_masks(masks.polygons, h, w), expected)
    assert polygon_masks([], 5, 7).shape == (0, 5, 7)


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


def test_no_paste_lands_in_fixed_size_crops_padding(cfg, dicts):
    """LSJ zoomed out far enough that FixedSizeCrop pads: the valid region is where the transforms
    put the original image (computed from them, not from the pixels), and outside it neither a
    pasted mask nor a pixel changes."""
    from detectron2.data import detection_utils as utils

    augs = [T.ResizeScale(min_scale=0.2, max_scale=0.6, target_height=320, target_width=320),
            T.FixedSizeCrop(crop_size=(320, 320)), T.RandomFlip(prob=0.0)]
    mapper = DatasetMapper(cfg, is_train=True, augmentations=augs, image_format="BGR", use_instance_mask=True,
                           instance_mask_format="polygon", recompute_boxes=True)
    sos = CopyPasteMapper(cfg, mapper=mapper)
    pasted_total = 0
    for seed in range(10):
        d = dicts[seed % len(dicts)]
        np.random.seed(seed)
        image = utils.read_image(d["file_name"], format="BGR")
        transforms = T.AugmentationList(augs)(T.AugInput(image))
        x0, y0, x1, y1 = transforms.apply_box(np.array([[0, 0, image.shape[1], image.shape[0]]]))[0]
        valid = torch.zeros(320, 320, dtype=torch.bool)
        valid[max(0, round(y0)):round(y1), max(0, round(x0)):round(x1)] = True
        assert not valid.all()  # this draw padded
        np.random.seed(seed)
        before = mapper(copy.deepcopy(d))
        np.random.seed(seed)
        torch.manual_seed(seed)
        after = sos(copy.deepcopy(d))
        inst = after["instances"]
        pasted = inst.gt_masks.tensor[inst.is_pasted]
        assert not pasted[:, ~valid].any()
        assert torch.equal(after["image"][:, ~valid], before["image"][:, ~valid])
        pasted_total += len(pasted)
    assert pasted_total >= 10


def test_enabled_without_a_bank_fails_and_disabled_says_pasting_is_off(cfg, caplog):
    empty = cfg.clone()
    empty.INPUT.SOS.BANK = ""
    with pytest.raises(ValueError, match="BANK is empty"):
        CopyPasteMapper(empty, mapper=lambda d: d)
    off = cfg.clone()
    off.INPUT.SOS.ENABLED = False
    with caplog.at_level("INFO", logger="sos_aug.integrations.detectron2"):
        mapper = CopyPasteMapper(off, mapper=lambda d: d)
    assert mapper.cp is None and "copy-paste is off" in caplog.text


def test_the_config_takes_the_options_mmdet_has(cfg, train_bank):
    c = cfg.clone()
    c.INPUT.SOS.DROP = "mmdet"
    c.INPUT.SOS.FEATHER_SIGMA = 1.5
    c.INPUT.SOS.RELIGHT = ["net"]
    cp = copy_paste_from_config(c)
    assert cp.drop.mode == "mmdet" and cp.feather_sigma == 1.5 and cp.relight is not None
    merged = get_cfg()
    add_sos_config(merged)
    root = Path(__file__).resolve().parents[1]
    merged.merge_from_file(str(root / "configs" / "detectron2" / "mask_rcnn_R_50_FPN_lsj_coco-1pct_sos.yaml"))
    assert merged.INPUT.LSJ_SIZE == 1024 and merged.MODEL.BACKBONE.FREEZE_AT == 0


def small_split(src: Path, out: Path, n: int) -> Path:
    import json

    data = json.loads(src.read_text())
    ids = sorted({a["image_id"] for a in data["annotations"]})[:n]
    data["images"] = [im for im in data["images"] if im["id"] in set(ids)]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in set(ids)]
    out.write_text(json.dumps(data))
    return out


@pytest.mark.slow
def test_the_example_trains_evaluates_and_evaluates_again_alone(tmp_path, coco_mini, train_bank):
    """examples/detectron2/train_net.py end to end on a small COCO-format set: two iterations with
    the shipped yaml, the evaluation after training, then --eval-only on the weights it wrote."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("d2_train_net_e2e", root / "examples" / "detectron2" / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    val = small_split(coco_mini / "annotations" / "instances_val2017.json", tmp_path / "val.json", 3)
    common = ["--config-file", str(root / "configs" / "detectron2" / "mask_rcnn_R_50_FPN_lsj_coco-1pct_sos.yaml"),
              "--train-json", str(coco_mini / "annotations" / "instances_train2017.json"),
              "--train-images", str(coco_mini / "train2017"), "--val-json", str(val),
              "--val-images", str(coco_mini / "val2017")]
    opts = ["INPUT.SOS.BANK", str(train_bank.root), "INPUT.LSJ_SIZE", "192", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "SOLVER.BASE_LR", "0.001",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SEED", "0", "INPUT.MIN_SIZE_TEST", "192",
            "INPUT.MAX_SIZE_TEST", "256", "OUTPUT_DIR", str(tmp_path / "run")]
    for name in ("sos_train", "sos_val"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    train_net.main(train_net.parser().parse_args(common + opts))
    assert (tmp_path / "run" / "model_final.pth").is_file()
    assert (tmp_path / "run" / "coco_instances_results.json").is_file()  # COCOEvaluator ran after training
    (tmp_path / "run" / "coco_instances_results.json").unlink()
    for name in ("sos_train", "sos_val"):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    again = train_net.main(train_net.parser().parse_args(
        common + ["--eval-only"] + opts + ["MODEL.WEIGHTS", str(tmp_path / "run" / "model_final.pth")]))
    assert set(again) == {"bbox", "segm"} and (tmp_path / "run" / "coco_instances_results.json").is_file()
