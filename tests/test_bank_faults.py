"""Bad input is skipped and counted (or, with strict, named); builds are resumable and atomic."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sos_aug.bank import BankBuildError, BankFormatError, SegmentBank, build_bank, coco_source


@pytest.fixture()
def broken_set(tmp_path, coco_mini, train_ann):
    """Six real images and their annotations, plus one of each fault the builder must survive."""
    data = json.loads(train_ann.read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:6]
    keep = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    folder = tmp_path / "images"
    folder.mkdir()
    for im in images:
        shutil.copy(coco_mini / "train2017" / im["file_name"], folder / im["file_name"])
    corrupt, missing = images[0], images[1]
    (folder / corrupt["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / missing["file_name"]).unlink()
    next_id = max(a["id"] for a in anns) + 1
    target = images[2]["id"]
    anns.append({"id": next_id, "image_id": target, "category_id": 1, "iscrowd": 0, "segmentation": [],
                 "bbox": [0, 0, 1, 1], "area": 0})
    anns.append({"id": next_id + 1, "image_id": target, "category_id": 999, "iscrowd": 0,
                 "segmentation": [[10, 10, 40, 10, 40, 40]], "bbox": [10, 10, 30, 30], "area": 450})
    anns.append({"id": next_id + 2, "image_id": target, "category_id": 1, "iscrowd": 0,
                 "segmentation": [[10, 10, 20, 20]], "bbox": [10, 10, 10, 10], "area": 0})
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({**data, "images": images, "annotations": anns}))
    # image faults count images (one each here); instance faults count annotations
    assert sum(1 for a in anns if a["image_id"] == missing["id"] and not a["iscrowd"]) > 1
    return ann_file, folder, {"corrupt_image": 1, "missing_image": 1, "empty_mask": 1,
                              "unknown_category": 1, "degenerate_mask": 1}, corrupt["file_name"]


def test_bad_inputs_are_skipped_counted_and_reported(tmp_path, broken_set):
    ann_file, folder, expected, _ = broken_set
    report = build_bank(tmp_path / "bank", coco_source(ann_file, folder), progress=False)
    assert report["skipped"] == expected
    bank = SegmentBank(tmp_path / "bank")
    assert bank.meta["skipped"] == expected
    assert bank.info()["skipped"] == expected
    assert all(s.category != "" for s in (bank[i] for i in range(len(bank))))


def test_strict_names_the_file(tmp_path, broken_set):
    ann_file, folder, _, corrupt_name = broken_set
    with pytest.raises(BankBuildError, match=corrupt_name):
        build_bank(tmp_path / "bank", coco_source(ann_file, folder), strict=True, progress=False)


KILLER = """
import os, signal, sys
from sos_aug.bank import build_bank, coco_source
out, ann, images, kill_at = sys.argv[1:5]
def hook(n):
    if n == int(kill_at):
        os.killpg(0, signal.SIGKILL)
build_bank(out, coco_source(ann, images), workers=2, checkpoint_every=10, progress=False, on_unit=hook)
"""


def test_killed_build_resumes_to_the_same_bank(tmp_path, coco_mini, train_ann):
    images = coco_mini / "train2017"
    build_bank(tmp_path / "clean", coco_source(train_ann, images), progress=False)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "killed"), str(train_ann), str(images), "37"],
                          start_new_session=True, capture_output=True)
    assert proc.returncode == -9
    state = json.loads((tmp_path / "killed" / ".partial" / "state.json").read_text())
    assert 0 < state["units_done"] < 37  # checkpointed before the kill, with bytes written after it
    with pytest.raises(BankFormatError, match="resumed"):
        SegmentBank(tmp_path / "killed")
    build_bank(tmp_path / "killed", coco_source(train_ann, images), progress=False)
    clean, resumed = SegmentBank(tmp_path / "clean"), SegmentBank(tmp_path / "killed")
    assert np.array_equal(clean.index, resumed.index)
    for a, b in zip(clean.meta["shards"], resumed.meta["shards"]):
        assert (tmp_path / "clean" / a["file"]).read_bytes() == (tmp_path / "killed" / b["file"]).read_bytes()
    assert not (tmp_path / "killed" / ".partial").exists()


def test_partial_of_another_build_is_not_mixed_in(tmp_path, coco_mini, train_ann):
    images = coco_mini / "train2017"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "b"), str(train_ann), str(images), "12"],
                          start_new_session=True, capture_output=True)
    assert proc.returncode == -9
    with pytest.raises(BankBuildError, match="interrupted build"):
        build_bank(tmp_path / "b", coco_source(train_ann, images, min_area=500), progress=False)


def test_truncated_shard_and_index_are_named(tmp_path, train_bank):
    copy = tmp_path / "bank"
    shutil.copytree(train_bank.root, copy)
    shard = copy / train_bank.meta["shards"][0]["file"]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(BankFormatError, match=shard.name):
        SegmentBank(copy)
    shutil.rmtree(copy)
    shutil.copytree(train_bank.root, copy)
    index = copy / train_bank.meta["index"]
    with open(index, "r+b") as f:
        f.truncate(100)
    with pytest.raises(BankFormatError, match=index.name):
        SegmentBank(copy)


def test_shard_truncated_after_open_fails_on_read_naming_it(tmp_path, train_bank):
    copy = tmp_path / "bank"
    shutil.copytree(train_bank.root, copy)
    bank = SegmentBank(copy)
    shard = copy / bank.meta["shards"][0]["file"]
    with open(shard, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(BankFormatError, match=shard.name):
        bank[len(bank) - 1]


def test_missing_bank_and_bad_json_are_clear(tmp_path):
    with pytest.raises(BankFormatError, match="without meta.json, so no bank"):
        SegmentBank(tmp_path)
    with pytest.raises(BankFormatError, match="no such folder"):
        SegmentBank(tmp_path / "not_built")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        coco_source(bad, tmp_path)


def test_the_terminal_report_counts_images_and_shows_an_example(tmp_path, broken_set):
    import subprocess
    import sys

    ann_file, folder, _, corrupt_name = broken_set
    proc = subprocess.run([sys.executable, "-m", "sos_aug.cli", "bank", "build", "--coco", str(ann_file),
                           "--images", str(folder), "--out", str(tmp_path / "bank"), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "corrupt_image=" in ln)
    assert "corrupt_image=1, e.g." in line and corrupt_name in line and "annotations not used" in line
    assert "missing_image=1, e.g." in proc.stdout
