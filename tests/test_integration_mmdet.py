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

from sos_aug.names import normalize_name  # noqa: E402
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
    return dict(type="SOSCopyPaste", bank=str(bank.root), classes=CLASSES, **{"num_pastes": (2, 6), **kw})


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


def test_the_adapter_imports_with_the_mmdet_extra_alone(tmp_path, coco_mini, train_bank):
    """A fresh process with nothing from tests/ or benchmarks/: a config's custom_imports loads the
    adapter under mmcv-lite, its pipeline runs on COCO images, and a compiled op says what to install."""
    import json
    import subprocess
    import sys

    config = tmp_path / "cfg.py"
    config.write_text(
        "custom_imports = dict(imports=['sos_aug.integrations.mmdet'], allow_failed_imports=False)\n"
        "train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, "
        "with_mask=True),\n"
        f"    dict(type='SOSCopyPaste', bank={str(train_bank.root)!r}, classes='CocoDataset', num_pastes=(2, 4)),\n"
        "    dict(type='PackDetInputs')]\n")
    script = f"""
import json
from mmengine.config import Config
from mmengine.registry import init_default_scope
cfg = Config.fromfile({str(config)!r})
init_default_scope('mmdet')
from mmdet.datasets import CocoDataset
ds = CocoDataset(ann_file={str(coco_mini / "annotations" / "instances_train2017.json")!r},
                 data_prefix=dict(img={str(coco_mini / "train2017")!r}), data_root='', pipeline=cfg.train_pipeline,
                 filter_cfg=dict(filter_empty_gt=True), serialize_data=False)
inst = ds[0]['data_samples'].gt_instances
from sos_aug.integrations.mmcv_lite import MissingMMCVOp, allow_mmcv_lite
try:
    from mmcv.ops import nms
    import torch
    nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    op = 'ran'
except MissingMMCVOp as e:
    op = str(e)
print(json.dumps({{'rows': len(inst.labels), 'pasted': inst.is_pasted.tolist(), 'lite': allow_mmcv_lite(), 'op': op}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == len(out["pasted"]) and any(out["pasted"])
    if out["lite"]:  # mmcv-lite here: the op stands in and names the fix
        assert "mim install mmcv" in out["op"] and "nms" in out["op"]


def test_is_pasted_reaches_the_model_row_for_row_beside_ignored_instances(coco_mini, train_bank):
    """PackDetInputs splits instances by gt_ignore_flags; is_pasted follows the same rows."""
    unpacked = dataset(coco_mini, [paste_cfg(train_bank)])
    packed = dataset(coco_mini, [paste_cfg(train_bank), dict(type="PackDetInputs")])
    crowded = [i for i in range(len(unpacked)) if unpacked.get_data_info(i)["instances"]
               and any(x["ignore_flag"] for x in unpacked.get_data_info(i)["instances"])]
    assert crowded, "coco-mini train2017 has crowd regions"
    for i in crowded[:3] + [0, 1]:
        torch.manual_seed(i)
        raw = unpacked[i]
        torch.manual_seed(i)
        sample = packed[i]["data_samples"]
        valid, ignored = ~raw["gt_ignore_flags"], raw["gt_ignore_flags"]
        gt, ig = sample.gt_instances, sample.ignored_instances
        assert gt.is_pasted.tolist() == raw["sos_is_pasted"][valid].tolist()
        assert ig.is_pasted.tolist() == raw["sos_is_pasted"][ignored].tolist() == [False] * int(ignored.sum())
        assert torch.equal(gt.bboxes.tensor[gt.is_pasted], raw["gt_bboxes"].tensor[valid][raw["sos_is_pasted"][valid]])


def _in_padding(masks: torch.Tensor, h: int, w: int) -> bool:
    return bool(masks[:, h:].any() or masks[:, :, w:].any())


def test_a_pad_before_the_transform_keeps_pastes_out_of_the_padding(coco_mini, train_bank):
    resize = dict(type="Resize", scale=(320, 320), keep_ratio=True)
    unpadded = dataset(coco_mini, [resize])
    padded = dataset(coco_mini, [resize, dict(type="Pad", size=(384, 384), pad_val=dict(img=114)),
                                 paste_cfg(train_bank, num_pastes=(6, 10))])
    pasted_any = 0
    for i in range(8):
        h, w = unpadded[i]["img_shape"]
        torch.manual_seed(i)
        after = padded[i]
        assert after["img"].shape[:2] == (384, 384)
        masks, pasted = masks_of(after), torch.from_numpy(after["sos_is_pasted"])
        assert not _in_padding(masks[pasted], h, w)
        pad = np.ones((384, 384), bool)
        pad[:h, :w] = False
        assert (after["img"][pad] == 114).all()  # the padding is untouched
        pasted_any += int(pasted.sum())
        if pasted.any():
            assert masks[pasted][:, :h, :w].flatten(1).any(1).all()
    assert pasted_any >= 16


def test_the_batch_augment_keeps_pastes_out_of_a_pipeline_pad(coco_mini, train_bank):
    """Pad in the pipeline after (or before) the worker's draw, then the batch's own padding: pastes
    land only in the resized image, and no pixel of either padding changes."""
    meta_keys = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "sos_segments")
    resize, pad = dict(type="Resize", scale=(300, 300), keep_ratio=True), dict(type="Pad", size=(320, 320))
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    unpadded = dataset(coco_mini, [resize])
    for steps in ([paste_cfg(train_bank, defer=True), pad], [pad, paste_cfg(train_bank, defer=True)]):
        ds = dataset(coco_mini, [resize, *steps, dict(type="PackDetInputs", meta_keys=meta_keys)])
        torch.manual_seed(5)
        batch = pseudo_collate([ds[i] for i in range(3)])
        pre = DetDataPreprocessor(mean=mean, std=std, bgr_to_rgb=True, pad_size_divisor=64, pad_mask=True,
                                  batch_augments=[dict(type="SOSBatchCopyPaste", bank=str(train_bank.root),
                                                       classes=CLASSES, mean=mean, std=std)])
        plain = DetDataPreprocessor(mean=mean, std=std, bgr_to_rgb=True, pad_size_divisor=64, pad_mask=True)
        before, after = plain(copy.deepcopy(batch), training=True), pre(copy.deepcopy(batch), training=True)
        for i, sample in enumerate(after["data_samples"]):
            h, w = unpadded[i]["img_shape"]
            inst = sample.gt_instances
            masks = torch.from_numpy(inst.masks.masks).bool()
            assert inst.is_pasted.any() and not _in_padding(masks[inst.is_pasted], h, w)
            changed = (before["inputs"][i] - after["inputs"][i]).abs().amax(0) > 1e-3
            assert not _in_padding(changed[None], h, w)


def test_deferred_draws_fail_clearly_when_the_image_changes_or_the_key_is_missing(coco_mini, train_bank):
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    augment = [dict(type="SOSBatchCopyPaste", bank=str(train_bank.root), classes=CLASSES, mean=mean, std=std)]
    pre = DetDataPreprocessor(mean=mean, std=std, bgr_to_rgb=True, pad_size_divisor=32, batch_augments=augment)
    meta_keys = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "sos_segments")
    resized_after = dataset(coco_mini, [paste_cfg(train_bank, defer=True), dict(type="Resize", scale=(200, 200)),
                                        dict(type="PackDetInputs", meta_keys=meta_keys)])
    with pytest.raises(ValueError, match="after every transform that resizes"):
        pre(pseudo_collate([resized_after[0]]), training=True)
    no_key = dataset(coco_mini, [paste_cfg(train_bank, defer=True), dict(type="PackDetInputs")])
    with pytest.raises(ValueError, match="meta_keys"):
        pre(pseudo_collate([no_key[0]]), training=True)
    on_device = DetDataPreprocessor(mean=mean, std=std, bgr_to_rgb=True, pad_size_divisor=32,
                                    batch_augments=[{**augment[0], "draw_on_device": True}])
    out = on_device(pseudo_collate([no_key[0]]), training=True)
    assert out["data_samples"][0].gt_instances.is_pasted.any()


def lvis_like(coco_file: Path, out: Path) -> Path:
    """coco-mini's annotations as an LVIS v1 file: LVIS's names for COCO's categories (with
    synonyms and frequencies), images by coco_url."""
    import json

    from sos_aug.names import COCO_TO_LVIS

    data = json.loads(coco_file.read_text())
    for c in data["categories"]:
        c["name"] = COCO_TO_LVIS.get(c["name"], c["name"].replace(" ", "_"))
        c["synonyms"], c["frequency"] = [c["name"]], "f"
    data["annotations"] = [a for a in data["annotations"] if not a.get("iscrowd")]
    for im in data["images"]:
        im["not_exhaustive_category_ids"], im["neg_category_ids"] = [], []
    out.write_text(json.dumps(data))
    return out


def test_the_lvis_config_builds_its_dataset_and_pastes_coco_segments_under_lvis_names(tmp_path, coco_mini,
                                                                                      train_bank):
    from mmdet.datasets import LVISV1Dataset
    from mmengine.config import Config
    from mmengine.dataset import Compose

    root = Path(__file__).resolve().parents[1]
    cfg = Config.fromfile(str(root / "configs" / "mmdet" / "mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1_sos.py"))
    ann = lvis_like(coco_mini / "annotations" / "instances_train2017.json", tmp_path / "lvis_like.json")
    inner = cfg.train_dataloader.dataset.dataset
    ds = LVISV1Dataset(ann_file=str(ann), data_root=str(coco_mini), data_prefix=dict(img=""), pipeline=[],
                       serialize_data=False, filter_cfg=inner.get("filter_cfg"))
    assert len(ds) > 0
    pipeline = [dict(step) for step in inner.pipeline]
    for step in pipeline:
        if step["type"] == "SOSCopyPaste":
            step.update(bank=str(train_bank.root), reference=str(ann), num_pastes=(8, 8))
    with pytest.warns(UserWarning, match=r"1 of 80 categories .* hot dog"):  # LVIS v1 has no hot dog
        run = Compose(pipeline)
    lvis_names = LVISV1Dataset.METAINFO["classes"]
    bank_names = {normalize_name(c["name"]) for c in train_bank.categories.values()}
    from sos_aug.names import name_forms

    torch.manual_seed(0)
    seen = set()
    for i in range(4):
        inst = run(ds[i])["data_samples"].gt_instances
        for label in inst.labels[inst.is_pasted].tolist():
            forms = set(name_forms([lvis_names[label]]))
            assert forms & bank_names, lvis_names[label]  # an LVIS class that is one of the bank's categories
            seen.add(lvis_names[label])
    assert seen & {"bus_(vehicle)", "car_(automobile)", "doughnut", "sofa", "television_set", "cellular_telephone",
                   "laptop_computer", "wineglass", "flowerpot", "orange_(fruit)", "train_(railroad_vehicle)"} or \
        len(seen) >= 5


def test_channel_and_mask_conversions_round_trip_exactly(coco_mini, train_bank):
    """The adapter's conversions (OpenCV channel swaps, masks viewed as bool) give mmdet's arrays
    back bit for bit, from planar and channels-last images alike."""
    from sos_aug.integrations.mmdet import from_target, to_target

    results = dataset(coco_mini, [])[0]
    bgr, masks = results["img"].copy(), results["gt_masks"].masks.copy()
    image, target = to_target(results)
    assert torch.equal(image, torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1))
    assert torch.equal(target["masks"], torch.from_numpy(masks).bool())
    target["is_pasted"] = torch.zeros(len(target["labels"]), dtype=torch.bool)
    for layout in (image, image.contiguous()):  # a channels-last view, and planar
        out = from_target(dict(results), layout, target)
        assert np.array_equal(out["img"], bgr) and out["img"].flags["C_CONTIGUOUS"]
        assert np.array_equal(out["gt_masks"].masks, masks)
    rgb = from_target(dict(results), image.contiguous(), target, bgr=False)["img"]
    assert np.array_equal(rgb, bgr[..., ::-1])
