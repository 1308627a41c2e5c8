"""The training-effect benchmark (benchmarks/train_effect.py) and the low-data split it draws: every
arm trains two steps on real coco-mini images with finite losses and writes its result; a rerun
skips finished runs; the split is mmdetection's."""

from __future__ import annotations

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


@pytest.mark.slow
def test_every_arm_trains_and_a_rerun_skips_finished_runs(tmp_path, coco_mini, train_ann, val_ann):
    args = te.parse_args(["--train", str(train_ann), "--train-images", str(coco_mini / "train2017"),
                          "--val", str(val_ann), "--val-images", str(coco_mini / "val2017"), "--classes", "",
                          "--percent", "10", "--steps", "2", "--size", "128", "--eval-every", "1",
                          "--val-limit", "2", "--paste-p", "1"])
    s = te.settings_from(args)
    results_dir = tmp_path / "results"
    results = te.run_grid(s, list(te.ARMS), [0], tmp_path / "out", ckpt_every=1, progress=False,
                          results_dir=results_dir)
    assert [r["arm"] for r in results] == list(te.ARMS)
    for r in results:
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert {"bbox_AP", "segm_AP", "bbox_AP50", "segm_per_category"} <= set(r["metrics"])
        assert [c["step"] for c in r["curve"]] == [1, 2]
        assert (results_dir / f"{r['arm']}-s0.json").exists()
        assert not (tmp_path / "out" / s.key() / "runs" / f"{r['arm']}-s0" / "checkpoint.pt").exists()
    assert all(r["pasted"] > 0 for r in results if r["arm"] != "none")
    before = {p: p.stat().st_mtime_ns for p in results_dir.glob("*.json")}
    again = te.run_grid(s, list(te.ARMS), [0], tmp_path / "out", progress=False, results_dir=results_dir)
    assert [r["losses"] for r in again] == [r["losses"] for r in results]  # read back, not retrained
    summary = te.summarize(again)
    assert set(summary) == set(te.ARMS) and "bbox_AP_vs_none" in summary["sos"]
    assert json.loads(json.dumps(summary)) == summary
    table = te.markdown_table(summary).splitlines()
    assert len(table) == 2 + len(te.ARMS) and table[2].startswith("| none | 1 |")
    assert f"{summary['sos']['segm_AP']['mean']:.2f}" in next(row for row in table if row.startswith("| sos |"))
    assert before.keys() == {p for p in results_dir.glob("*.json")}


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, coco_mini, train_ann, val_ann):
    args = te.parse_args(["--train", str(train_ann), "--train-images", str(coco_mini / "train2017"),
                          "--val", str(val_ann), "--val-images", str(coco_mini / "val2017"), "--classes", "",
                          "--percent", "10", "--steps", "3", "--size", "128", "--eval-every", "10",
                          "--val-limit", "1"])
    s = te.settings_from(args)
    data = te.load_data(s, tmp_path / "w")
    whole = te.train_run("sos", 0, s, data, tmp_path / "whole", progress=False)

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
            te.train_run("sos", 0, s, data, tmp_path / "cut", ckpt_every=1, progress=False)
    finally:
        te.Batcher.next = real
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    resumed = te.train_run("sos", 0, s, data, tmp_path / "cut", ckpt_every=1, progress=False)
    assert resumed["losses"][:2] == whole["losses"][:2] and len(resumed["losses"]) == 3
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-4)


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
