"""The COCO builder against pycocotools: one segment per usable instance, alpha = the mask."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, WeightedRandomSampler

from sos_aug.bank import SegmentBank


@pytest.fixture(scope="module")
def coco(train_ann):
    return COCO(str(train_ann))


def usable_annotations(coco):
    out = {}
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        mask = coco.annToMask(ann)
        if mask.sum() > 0:
            out[ann["id"]] = (ann, int(mask.sum()))
    return out


def test_one_segment_per_usable_instance_with_exact_alpha(train_bank, coco):
    expected = usable_annotations(coco)
    assert len(train_bank) == len(expected)
    seen = set()
    for i in range(len(train_bank)):
        seg = train_bank[i]
        ann_id = int(seg.source.rsplit("#", 1)[1])
        ann, pixels = expected[ann_id]
        seen.add(ann_id)
        assert seg.category_id == ann["category_id"]
        assert seg.category == coco.cats[ann["category_id"]]["name"]
        assert int((seg.rgba[3] > 0).sum()) == pixels
        assert set(seg.rgba[3].unique().tolist()) <= {0, 255}
        assert int(train_bank.index["area"][i]) == pixels
    assert seen == set(expected)


def test_crop_pixels_are_the_image_pixels(train_bank, coco, coco_mini):
    from PIL import Image

    seg = train_bank[5]
    name, ann_id = seg.source.removeprefix("coco:").split("#")
    ann = coco.anns[int(ann_id)]
    image = np.asarray(Image.open(coco_mini / "train2017" / name).convert("RGB"))
    mask = coco.annToMask(ann)
    ys, xs = np.nonzero(mask)
    rgba = seg.rgba.numpy()
    # find the crop offset from the alpha and compare the pixels under the mask
    ay, ax = np.nonzero(rgba[3])
    dy, dx = ys.min() - ay.min(), xs.min() - ax.min()
    assert np.array_equal(rgba[:3, ay, ax].T, image[ay + dy, ax + dx])


def test_min_area_and_categories_filter(tmp_path, coco_mini, train_ann, coco):
    from sos_aug.bank import build_bank, coco_source

    build_bank(tmp_path / "b", coco_source(train_ann, coco_mini / "train2017", min_area=2000,
                                           categories=["person", "dog"]), progress=False)
    bank = SegmentBank(tmp_path / "b")
    expected = [a for a, px in usable_annotations(coco).values()
                if px >= 2000 and coco.cats[a["category_id"]]["name"] in ("person", "dog")]
    assert len(bank) == len(expected) > 0
    assert set(bank.index["category"].tolist()) <= {1, 18}


def test_views_filter_without_copying_pixels(train_bank):
    people = train_bank.subset(categories=["person"])
    assert len(people) == int((train_bank.index["category"] == 1).sum())
    assert all(people[i].category == "person" for i in range(0, len(people), 17))
    big = train_bank.subset(min_area=5000, max_area=20000)
    assert ((big.index["area"] >= 5000) & (big.index["area"] <= 20000)).all()
    both = people.subset(min_area=5000)
    assert len(both) == int(((train_bank.index["category"] == 1) & (train_bank.index["area"] >= 5000)).sum())
    assert np.shares_memory(train_bank.index, train_bank._open().index)


def test_sampling_weights(train_bank):
    cats = train_bank.index["category"]
    counts = Counter(cats.tolist())
    balanced = train_bank.sampling_weights("category_balanced")
    per_cat = Counter()
    for c, w in zip(cats.tolist(), balanced.tolist()):
        per_cat[c] += w
    assert all(abs(v - 1.0) < 1e-9 for v in per_cat.values())
    rf = train_bank.sampling_weights("repeat_factor", t=0.05)
    # a category in every image would get 1; rare categories get sqrt(t / f) > 1
    src = train_bank.index["source_id"]
    n_images = len(np.unique(src))
    for c in list(counts)[:10]:
        f = len(np.unique(src[cats == c])) / n_images
        assert np.allclose(rf[cats == c].numpy(), max(1.0, (0.05 / f) ** 0.5))
    with pytest.raises(ValueError, match="unknown sampling mode"):
        train_bank.sampling_weights("nope")
    sampler = WeightedRandomSampler(balanced, 64, generator=torch.Generator().manual_seed(0))
    assert len(list(sampler)) == 64


def test_sample_is_reproducible_and_follows_the_mode(train_bank):
    a = train_bank.sample(1000, torch.Generator().manual_seed(3))
    b = train_bank.sample(1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.max() < len(train_bank)
    balanced = train_bank.with_sampling("category_balanced")
    draws = balanced.sample(20000, torch.Generator().manual_seed(0))
    drawn_cats = Counter(balanced.index["category"][draws.numpy()].tolist())
    share_person_uniform = (train_bank.index["category"] == 1).mean()
    assert drawn_cats[1] / 20000 < share_person_uniform / 4  # person is no longer dominant


def test_bank_pickles_into_dataloader_workers(train_bank):
    blob = pickle.dumps(train_bank.subset(categories=["dog", "cat"]))
    assert len(blob) < 100_000  # path, meta and row numbers; no pixels, no open files
    loader = DataLoader(train_bank, batch_size=None, num_workers=2, sampler=range(0, len(train_bank), 50))
    got = [seg.rgba.shape for seg in loader]
    want = [train_bank[i].rgba.shape for i in range(0, len(train_bank), 50)]
    assert got == want


def test_cli_info_json_and_show(train_bank, tmp_path):
    out = subprocess.run([sys.executable, "-m", "sos_aug.cli", "bank", "info", str(train_bank.root), "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["num_segments"] == len(train_bank)
    counts = Counter(train_bank.index["category"].tolist())
    assert info["num_categories"] == len(counts)
    assert {(c["id"], c["count"]) for c in info["categories"]} == set(counts.items())
    sheet = tmp_path / "sheet.png"
    subprocess.run([sys.executable, "-m", "sos_aug.cli", "bank", "show", str(train_bank.root), "--out", str(sheet),
                    "--n", "12"], check=True, capture_output=True)
    from PIL import Image

    assert Image.open(sheet).size[0] > 200


def test_lvis_style_file_keeps_frequency_and_synonyms(tmp_path, train_ann, coco_mini):
    """LVIS names images by coco_url only and gives categories synonyms and a frequency (r/c/f)."""
    from sos_aug.bank import build_bank, coco_source

    data = json.loads(train_ann.read_text())
    keep = {im["id"] for im in data["images"][:5]}
    images = []
    for im in data["images"]:
        if im["id"] in keep:
            im = {k: v for k, v in im.items() if k != "file_name"}
            images.append(im)
    cats = [{**c, "synonyms": [c["name"], f"{c['name']}_thing"], "frequency": "rcf"[c["id"] % 3]}
            for c in data["categories"]]
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    lvis = tmp_path / "lvis.json"
    lvis.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    report = build_bank(tmp_path / "bank", coco_source(lvis, coco_mini / "train2017"), progress=False)
    bank = SegmentBank(tmp_path / "bank")
    assert report["skipped"] == {} and len(bank) == sum(1 for a in anns if not a["iscrowd"])
    person = bank.categories[1]
    assert person["frequency"] == "rcf"[1] and "person_thing" in person["synonyms"]
    assert bank.category_id("Person Thing") == 1


def test_a_missing_image_folder_is_an_error_up_front(tmp_path, train_ann):
    from sos_aug.bank import coco_source

    with pytest.raises(FileNotFoundError, match="no_such_folder: image folder not found"):
        coco_source(train_ann, tmp_path / "no_such_folder")


def test_cli_info_says_when_it_lists_only_the_top_categories(train_bank):
    def info(*extra):
        return subprocess.run([sys.executable, "-m", "sos_aug.cli", "bank", "info", str(train_bank.root), *extra],
                              capture_output=True, text=True, check=True).stdout

    n = len(Counter(train_bank.index["category"].tolist()))
    assert n > 5
    short = info("--top", "5")
    assert f"and {n - 5} more categories" in short and len(short.splitlines()) == 1 + 5 + 1
    assert "more categories" not in info("--top", str(n))


def test_repeat_factor_measured_on_a_reference_training_set(tmp_path, train_bank, val_ann):
    """f_c comes from the reference file's images, categories matched by id, or by name/synonym
    where ids differ; a category the reference lacks gets r_c = 1."""
    ref = json.loads(val_ann.read_text())
    # LVIS-style: other ids, names written differently, one category known only by a synonym, one missing
    renamed = {}
    for k, c in enumerate(ref["categories"]):
        renamed[c["id"]] = 1000 + k
        c["id"] = 1000 + k
        c["name"] = c["name"].replace(" ", "_").upper()
    ref["categories"][0]["synonyms"], ref["categories"][0]["name"] = [ref["categories"][0]["name"]], "xyz"
    dropped = ref["categories"].pop(1)
    for a in ref["annotations"]:
        a["category_id"] = renamed[a["category_id"]]
    ref["annotations"] = [a for a in ref["annotations"] if a["category_id"] != dropped["id"]]
    path = tmp_path / "lvis_like.json"
    path.write_text(json.dumps(ref))

    coco = COCO(str(val_ann))
    n_images = len(coco.getImgIds())
    t = 0.2
    weights = train_bank.sampling_weights("repeat_factor", t=t, reference=path)
    cats = train_bank.index["category"]
    checked = 0
    for cid, cat in train_bank.categories.items():
        rows = cats == cid
        if not rows.any():
            continue
        in_ref = cat["name"] != coco.loadCats(list(renamed)[1])[0]["name"]
        f = max(len(set(coco.getImgIds(catIds=[cid]))), 1) / n_images
        expected = max(1.0, (t / f) ** 0.5) if in_ref else 1.0
        assert np.allclose(weights[rows].numpy(), expected), cat["name"]
        checked += 1
    assert checked > 10

    # the constructor measures f_c once; the bank pickles with it and samples by it
    bank = SegmentBank(train_bank.root, sampling="repeat_factor", t=t, reference=path)
    clone = pickle.loads(pickle.dumps(bank))
    assert clone.reference_freq == bank.reference_freq
    assert torch.equal(clone.sampling_weights("repeat_factor"), weights)
    with pytest.raises(ValueError, match="none of the bank's categories"):
        empty = {**ref, "categories": [{"id": 1, "name": "not a coco class"}], "annotations": []}
        (tmp_path / "empty.json").write_text(json.dumps(empty))
        SegmentBank(train_bank.root, reference=tmp_path / "empty.json")
