"""SOSCopyPaste and SOSBatchCopyPaste in real mmdetection 3.3 pipelines on coco-mini: mmdet's own
CocoDataset, LoadImageFromFile, LoadAnnotations (bitmap and polygon masks, and box-only),
PackDetInputs and DetDataPreprocessor; the core's invariants checked on what mmdet receives."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet is not installed (pip install -e '.[mmdet]')")
from sos_aug.integrations.mmcv_lite import allow_mmcv_lite  # noqa: E402

allow_mmcv_lite()  # as importing the adapter does first: mmdet's mask module imports under mmcv-lite
from invariants import match_existing  # noqa: E402
from mmdet.datasets import CocoDataset  # noqa: E402
from mmdet.models.data_preprocessors import DetDataPreprocessor  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.dataset import ClassBalancedDataset, pseudo_collate, worker_init_fn  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.utils import import_modules_from_strings  # noqa: E402

from sos_aug.ops.masks import tight_boxes  # noqa: E402

CLASSES = CocoDataset.METAINFO["classes"]
init_default_scope("mmdet")  # as mmdet's tools do: type names resolve in mmdet's registries
import_modules_from_strings(["sos_aug.integrations.mmdet"])  # what a config's custom_imports does


def dataset(coco_mini, pipeline, poly2mask=True, with_mask=True):
    load = [dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask, poly2mask=poly2mask)]
    return CocoDataset(ann_file=str(coco_mini / "annotations" / "instances_train2017.json"),
                       data_prefix=dict(img=str(coco_mini / "train2017")) , data_root="",
                       pipeline=load + pipeline, filter_cfg=dict(filter_empty_gt=True), serialize_data=False)


def paste_cfg(bank, **kw):
    return dict(type="SOSCopyPaste", bank=str(bank.root), classes=CLASSES, num_pastes=(2, 6), **kw)


def masks_of(results) -> torch.Tensor:
    m = results["gt_masks"]
    m = m.to_bitmap() if not isinstance(m, BitmapMasks) else m
    return torch.from_numpy(m.masks).bool()


def check_exact(before: dict, after: dict) -> None:
    """Existing instances: their input masks less painted pixels, labels unchanged, in order;
    pasted ones: tight boxes, the label of their bank category, painted over everything before."""
    pasted = torch.from_numpy(after["sos_is_pasted"])
    out_masks, in_masks = masks_of(after), masks_of(before)
    boxes = after["gt_bboxes"].tensor
    labels = after["gt_bboxes_labels"]
    covered = out_masks[pasted].any(0) if pasted.any() else torch.zeros(out_masks.shape[1:], dtype=torch.bool)
    changed = torch.from_numpy((after["img"] != before["img"]).any(2))
    old = match_existing(out_masks[~pasted], in_masks, covered, changed)
    assert np.array_equal(labels[~pasted.numpy()], before["gt_bboxes_labels"][old])
    assert np.array_equal(after["gt_ignore_flags"][~pasted.numpy()], before["gt_ignore_flags"][old])
    rows = pasted.nonzero().flatten()
    assert torch.equal(boxes[rows], tight_boxes(out_masks[rows]).float())
    assert all(0 <= lab < len(CLASSES) for lab in labels[rows].tolist())
    for a in rows.tolist():  # pasted masks are disjoint: later pastes cut earlier ones
        assert out_masks[a].any()
        for b in rows.tolist():
            assert a == b or not (out_masks[a] & out_masks[b]).any()
    assert after["img"].shape == before["img"].shape and after["img"].dtype == np.uint8


def test_sos_copy_paste_in_an_mmdet_pipeline_is_exact(coco_mini, train_bank):
    plain = dataset(coco_mini, [])
    pasting = dataset(coco_mini, [paste_cfg(train_bank)])
    torch.manual_seed(0)
    n_pasted = 0
    for i in range(6):
        before, after = plain[i], pasting[i]
        check_exact(before, after)
        n_pasted += int(after["sos_is_pasted"].sum())
        assert not np.array_equal(before["img"], after["img"])
    assert n_pasted >= 6


def test_polygon_masks_give_the_same_result_as_bitmaps(coco_mini, train_bank):
    """Except crowd regions, which mmdet's LoadAnnotations(poly2mask=False) turns into empty polygons."""
    bitmap = dataset(coco_mini, [paste_cfg(train_bank)], poly2mask=True)
    polygon = dataset(coco_mini, [paste_cfg(train_bank)], poly2mask=False)
    for i in range(3):
        torch.manual_seed(i)
        a = bitmap[i]
        torch.manual_seed(i)
        b = polygon[i]
        assert isinstance(b["gt_masks"], BitmapMasks)
        real = ~a["gt_ignore_flags"]
        assert np.array_equal(a["gt_ignore_flags"], b["gt_ignore_flags"])
        assert np.array_equal(a["gt_masks"].masks[real], b["gt_masks"].masks[real])
        assert np.array_equal(a["img"], b["img"])
        assert torch.equal(a["gt_bboxes"].tensor[real], b["gt_bboxes"].tensor[real])


def test_box_only_datasets_get_exact_boxes_and_no_masks(coco_mini, train_bank):
    masked = dataset(coco_mini, [paste_cfg(train_bank)])
    boxes_only = dataset(coco_mini, [paste_cfg(train_bank)], with_mask=False)
    plain = dataset(coco_mini, [], with_mask=False)
    for i in range(4):
        torch.manual_seed(i)
        a = masked[i]
        torch.manual_seed(i)
        b = boxes_only[i]
        assert "gt_masks" not in b
        pa, pb = a["sos_is_pasted"], b["sos_is_pasted"]
        # the same segments at the same places: the pasted boxes are the masked run's tight boxes
        assert torch.equal(a["gt_bboxes"].tensor[pa], b["gt_bboxes"].tensor[pb])
        # existing boxes are kept unchanged (a subset of the input, in order) or dropped
        kept = b["gt_bboxes"].tensor[~pb].tolist()
        inputs = plain[i]["gt_bboxes"].tensor.tolist()
        it = iter(inputs)
        assert all(any(k == x for x in it) for k in kept)


def test_it_works_inside_class_balanced_dataset_without_multi_image_mix(coco_mini, train_bank):
    reference = str(coco_mini / "annotations" / "instances_train2017.json")
    inner = dataset(coco_mini, [paste_cfg(train_bank, sampling="repeat_factor", t=0.3, reference=reference),
                                dict(type="PackDetInputs")])
    balanced = ClassBalancedDataset(dataset=inner, oversample_thr=0.3)
    assert len(balanced) > len(balanced.dataset)
    sample = balanced[0]
    inst = sample["data_samples"].gt_instances
    assert len(inst.bboxes) == len(inst.labels) == len(inst.masks)


def test_workers_draw_differently_and_replay(coco_mini, train_bank):
    ds = dataset(coco_mini, [paste_cfg(train_bank)])

    def draw(worker: int) -> np.ndarray:
        worker_init_fn(worker, num_workers=2, rank=0, seed=7)
        return ds[0]["gt_bboxes"].tensor.numpy()

    assert np.array_equal(draw(0), draw(0))
    assert not np.array_equal(draw(0), draw(1))


def test_batch_copy_paste_on_the_padded_batch(coco_mini, train_bank):
    meta_keys = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "sos_segments")
    pipeline = [dict(type="Resize", scale=(320, 320), keep_ratio=True), paste_cfg(train_bank, defer=True),
                dict(type="PackDetInputs", meta_keys=meta_keys)]
    ds = dataset(coco_mini, pipeline)
    torch.manual_seed(3)
    batch = pseudo_collate([ds[0], ds[1], ds[2]])
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    plain = DetDataPreprocessor(mean=mean, std=std, bgr_to_rgb=True, pad_size_divisor=32, pad_mask=True)
    augmented = DetDataPreprocessor(mean=mean, std=std, bgr_to_rgb=True, pad_size_divisor=32, pad_mask=True,
                                    batch_augments=[dict(type="SOSBatchCopyPaste", bank=str(train_bank.root),
                                                         classes=CLASSES, mean=mean, std=std)])
    before = plain(copy.deepcopy(batch), training=True)
    after = augmented(copy.deepcopy(batch), training=True)
    x0, x1 = before["inputs"], after["inputs"]
    assert x0.shape == x1.shape
    for i, (s0, s1) in enumerate(zip(before["data_samples"], after["data_samples"])):
        h, w = s1.img_shape
        pad = torch.ones(x0.shape[-2:], dtype=torch.bool)
        pad[:h, :w] = False
        assert torch.equal(x0[i][:, pad], x1[i][:, pad])  # the padding is never pasted into
        inst = s1.gt_instances
        masks = torch.from_numpy(inst.masks.masks).bool()
        assert masks.shape[-2:] == x1.shape[-2:] and not masks[:, pad].any()
        pasted = inst.is_pasted
        assert pasted.any()
        union = masks[pasted].any(0)
        footprint = torch.zeros_like(union)  # where the worker's layout put the pieces
        boxes = s1.metainfo["sos_segments"].placements[0].boxes
        for x_lo, y_lo, x_hi, y_hi in torch.cat([boxes[:, :2].floor(), boxes[:, 2:].ceil()], 1).long().tolist():
            footprint[max(y_lo, 0):max(y_hi, 0), max(x_lo, 0):max(x_hi, 0)] = True
        changed = (x0[i] - x1[i]).abs().amax(0) > 1e-3
        assert not (changed & ~footprint).any()  # only pixels under the pieces change
        assert (changed & union).sum() > 0.5 * union.sum()
        old_masks = torch.from_numpy(s0.gt_instances.masks.masks).bool()
        rows = match_existing(masks[~pasted], old_masks, union, changed)
        assert torch.equal(inst.labels[~pasted], s0.gt_instances.labels[rows])
        assert type(inst.bboxes) is type(s0.gt_instances.bboxes)  # plain tensors after boxtype2tensor
        assert torch.equal(inst.bboxes[pasted], tight_boxes(masks[pasted]).float())


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "mmdet").glob("*.py"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_load_and_their_training_pipeline_runs(config, coco_mini, train_bank):
    """Each shipped config parses with mmengine (its mmdet base included) and its training pipeline,
    pointed at coco-mini and the test bank, yields what the model takes."""
    from mmengine.config import Config
    from mmengine.dataset import Compose

    cfg = Config.fromfile(str(config))
    dataset = cfg.train_dataloader.dataset
    while "pipeline" not in dataset:
        dataset = dataset.dataset
    pipeline = [dict(step) for step in dataset.pipeline]
    reference = str(coco_mini / "annotations" / "instances_train2017.json")
    for step in pipeline:
        if step["type"] == "SOSCopyPaste":
            step["bank"] = str(train_bank.root)
            if "reference" in step:
                step["reference"] = reference
    for aug in cfg.model.data_preprocessor.get("batch_augments") or []:
        if aug["type"] == "SOSBatchCopyPaste":
            aug["bank"] = str(train_bank.root)
    if "sos_paste" in cfg:
        assert any(step["type"] == "SOSCopyPaste" for step in pipeline)
    ds = CocoDataset(ann_file=reference, data_prefix=dict(img=str(coco_mini / "train2017")), data_root="",
                     pipeline=[], serialize_data=False, filter_cfg=dict(filter_empty_gt=True))
    out = Compose(pipeline)(ds[0])
    inst = out["data_samples"].gt_instances
    assert out["inputs"].shape[0] == 3 and len(inst.bboxes) == len(inst.labels) == len(inst.masks)
