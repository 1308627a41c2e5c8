"""Offline synthesis (sos_aug.synthesis, `sos-aug synthesize`) from real coco-mini segments: COCO
instances that pycocotools loads and whose masks and boxes hold the transform's invariants, panoptic
PNGs that agree with them, grounding exports, and a killed run or a run in two processes giving the
same bytes as one uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sos_aug.bank import SegmentBank, build_bank, coco_source
from sos_aug.ops.masks import tight_boxes
from sos_aug.synthesis import SynthesisConfig, synthesize

SMALL = dict(num_images=5, size=160, shard_size=2, pastes=(3, 7), seed=3)


def digest(folder) -> dict[str, str]:
    """Every file of a synthesized dataset by content (the settings file and shard parts aside)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "shards" not in p.parts}


@pytest.fixture(scope="module")
def made(tmp_path_factory, train_bank):
    out = tmp_path_factory.mktemp("synth") / "set"
    report = synthesize(train_bank, out, SynthesisConfig(**SMALL, referring=True), progress=False)
    return out, report


def test_instances_load_and_hold_the_invariants(made):
    out, report = made
    coco = COCO(str(out / "instances.json"))
    assert len(coco.getImgIds()) == SMALL["num_images"] == report["images"]
    assert report["annotations"] > SMALL["num_images"]
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        assert Image.open(out / info["file_name"]).size == (SMALL["size"], SMALL["size"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool()
        assert (masks.flatten(1).sum(1) > 0).all()
        union = masks.sum(0)
        assert int(union.max()) == 1  # pasted instances never overlap: later ones cut earlier ones
        tight = tight_boxes(masks).tolist()
        for a, m, t in zip(anns, masks, tight):
            assert a["bbox"] == [t[0], t[1], t[2] - t[0], t[3] - t[1]]
            assert a["area"] == int(m.sum())
            assert a["category_id"] in coco.cats and a["bank_row"] >= 0 and a["source"]
        # the panoptic PNG: each segment id paints exactly its instance's pixels
        pan = json.loads((out / "panoptic.json").read_text())
        entry = next(e for e in pan["annotations"] if e["image_id"] == image_id)
        rgb = np.asarray(Image.open(out / "panoptic" / entry["file_name"])).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert len(entry["segments_info"]) == len(anns)
        for seg, m in zip(entry["segments_info"], masks):
            assert np.array_equal(ids == seg["id"], m.numpy())
            assert seg["area"] == int(m.sum())
        assert (ids[~union.bool().numpy()] == 0).all()


def test_grounding_exports_reference_the_instances(made):
    out, report = made
    grefs = json.loads((out / "grounding" / "grefs.json").read_text())
    ground = json.loads((out / "grounding" / "instances.json").read_text())
    ann_ids = {a["id"] for a in ground["annotations"]}
    assert len(grefs) == report["expressions"] > 0
    assert all(g["ann_id"] == [-1] if g["no_target"] else set(g["ann_id"]) <= ann_ids for g in grefs)
    for line in (out / "grounding" / "odvg.jsonl").read_text().splitlines():
        record = json.loads(line)
        for region in record["grounding"]["regions"]:
            (start, end), = region["tokens_positive"]
            assert record["grounding"]["caption"][start:end] == region["phrase"]


def test_a_killed_run_resumes_to_the_same_bytes_and_two_processes_agree(tmp_path, made, train_bank):
    out, _ = made
    reference = digest(out)
    killed = tmp_path / "killed"
    config = SynthesisConfig(**SMALL, referring=True)
    synthesize(train_bank, killed, config, progress=False)
    (killed / "shards" / "000001.json").unlink()  # killed inside shard 1: its part never written
    (killed / "images" / "00000003.jpg").write_bytes(b"half a jpeg")  # and an image half written
    (killed / "instances.json").unlink()
    synthesize(train_bank, killed, config, progress=False)
    assert digest(killed) == reference
    parallel = tmp_path / "parallel"
    synthesize(train_bank, parallel, config, progress=False, workers=2)
    assert digest(parallel) == reference


def test_backgrounds_single_category_and_settings_guard(tmp_path, train_bank, coco_mini):
    out = tmp_path / "photos"
    config = SynthesisConfig(num_images=3, size=128, shard_size=3, pastes=(2, 4),
                             backgrounds=str(coco_mini / "val2017"), single_category=True, image_format="png")
    synthesize(train_bank, out, config, progress=False)
    coco = COCO(str(out / "instances.json"))
    for image_id in coco.getImgIds():
        cats = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))}
        assert len(cats) <= 1
        pixels = np.asarray(Image.open(out / coco.loadImgs(image_id)[0]["file_name"]))
        assert pixels.reshape(-1, 3).std(0).max() > 5  # a photo, not a flat canvas
    with pytest.raises(ValueError, match="other settings"):
        synthesize(train_bank, out, SynthesisConfig(num_images=4, size=128), progress=False)


@pytest.mark.slow
def test_the_synthesize_command(tmp_path, train_bank):
    proc = subprocess.run([sys.executable, "-m", "sos_aug.cli", "synthesize", "--bank", str(train_bank.root), "--out",
                           str(tmp_path / "cli"), "--num-images", "2", "--size", "128", "--pastes", "3", "3",
                           "--referring", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "2 images" in proc.stdout and (tmp_path / "cli" / "grounding" / "grefs.json").is_file()
    rle = json.loads((tmp_path / "cli" / "instances.json").read_text())["annotations"][0]["segmentation"]
    assert mask_utils.decode(rle).sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_the_bar_moves_image_by_image_and_the_start_is_announced(tmp_path, train_bank, workers):
    """One shard of 4 images: the bar passes 1/4, 2/4 and 3/4 (it moved per shard before), and the
    bank opening before it is said, not silent."""
    proc = subprocess.run([sys.executable, "-m", "sos_aug.cli", "synthesize", "--bank", str(train_bank.root), "--out",
                           str(tmp_path / f"w{workers}"), "--num-images", "8", "--shard-size", "4", "--size", "96",
                           "--workers", str(workers)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_MININTERVAL": "0"})  # draw the bar at every update
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("synthesize: loading torch and opening the bank")
    assert all(f" {k}/8 " in proc.stderr for k in (1, 2, 3, 5, 6, 7)), proc.stderr[-1500:]


def _ray_task_pids() -> list[int]:
    """Processes running a synthesis shard as a Ray task (their title is ray::_ray_shard)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"_ray_shard" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_ray_runs_the_shards_and_a_task_killed_midway_is_retried(tmp_path, made, train_bank, coco_mini, val_ann):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    out, _ = made
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # bank build on Ray: the same bank as a local build
        data = json.loads(val_ann.read_text())
        keep = {im["id"] for im in data["images"][:8]}
        small = tmp_path / "small.json"
        small.write_text(json.dumps({**data, "images": [im for im in data["images"] if im["id"] in keep],
                                     "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}))
        local = build_bank(tmp_path / "bank-local", coco_source(small, coco_mini / "val2017"), progress=False)
        remote = build_bank(tmp_path / "bank-ray", coco_source(small, coco_mini / "val2017"), progress=False,
                            ray_address="local")
        assert local["added"] == remote["added"] > 0
        a, b = SegmentBank(tmp_path / "bank-local"), SegmentBank(tmp_path / "bank-ray")
        assert np.array_equal(a.index, b.index)
        assert all(torch.equal(a[i].rgba, b[i].rgba) for i in range(len(a)))

        on_ray = tmp_path / "ray"
        synthesize(train_bank, on_ray, SynthesisConfig(**SMALL, referring=True), progress=False, ray_address="local")
        assert digest(on_ray) == digest(out)

        slow = SynthesisConfig(num_images=3, size=512, shard_size=3, pastes=(12, 19), seed=5)
        alone = tmp_path / "alone"
        synthesize(train_bank, alone, slow, progress=False)
        killed = tmp_path / "killed"
        worker = threading.Thread(target=synthesize, args=(train_bank, killed, slow),
                                  kwargs=dict(progress=False, ray_address="local"))
        worker.start()
        victims = []
        while worker.is_alive() and not victims:  # wait for the task's first image, then kill its process
            if (killed / "images" / "00000000.jpg").exists() and not (killed / "shards" / "000000.json").exists():
                victims = _ray_task_pids()
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        worker.join()
        assert victims, "the task finished before it could be killed"
        assert digest(killed) == digest(alone)  # retried: no image lost, none twice
    finally:
        ray.shutdown()
