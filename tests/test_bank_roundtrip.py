"""RGBA trees and X-Paste pools written from real COCO crops come back pixel-identical; merging."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sos_aug.bank import SegmentBank, build_bank, merge_banks, rgba_tree_source, xpaste_source


@pytest.fixture(scope="module")
def crops(train_bank):
    """Twelve real segments of three categories: (category name, (4, h, w) uint8 array)."""
    out = []
    for name in ("dog", "person", "car"):
        view = train_bank.subset(categories=[name])
        out += [(name, view[i].rgba.numpy()) for i in range(4)]
    return out


def _png(path, planar):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(planar.transpose(1, 2, 0)).save(path)


def test_rgba_tree_roundtrip_with_texts_and_flags(tmp_path, crops):
    tree = tmp_path / "tree"
    meta, flags, expected = {}, {}, {}
    for k, (cat, rgba) in enumerate(crops):
        sub = f"{cat}_kind{k % 2}"
        _png(tree / cat / sub / f"{1000 + k}.png", rgba)
        meta[f"{cat}_{sub}"] = {"description": f"a photo of a {cat}", "short_phrase": cat, "features": ["real"]}
        flags[f"{1000 + k}"] = {"IsInstance": k % 2, "Integrity": k % 5, "QualityAndRegularity": 4}
        expected[f"{cat}/{sub}/{1000 + k}.png"] = (cat, rgba, meta[f"{cat}_{sub}"], flags[f"{1000 + k}"])
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    build_bank(tmp_path / "bank", rgba_tree_source(tree, tmp_path / "meta.json", tmp_path / "flags.json"),
               progress=False)
    bank = SegmentBank(tmp_path / "bank")
    assert len(bank) == len(crops)
    for i in range(len(bank)):
        seg = bank[i]
        cat, rgba, text, fl = expected[seg.source]
        assert seg.category == cat
        assert np.array_equal(seg.rgba.numpy(), rgba)
        assert seg.text == text
        assert seg.flags == fl
    good = bank.subset(min_flags={"IsInstance": 1, "Integrity": 3})
    assert len(good) == sum(1 for _, _, _, f in expected.values() if f["IsInstance"] >= 1 and f["Integrity"] >= 3)


def test_xpaste_pool_roundtrip_rgba_and_image_mask_pairs(tmp_path, crops, train_ann):
    pool, expected = {}, {}
    ids = {"dog": 18, "person": 1, "car": 3}
    for k, (cat, rgba) in enumerate(crops):
        if k % 2:
            rel = f"seg/{k}.png"
            _png(tmp_path / rel, rgba)
        else:
            Image.fromarray(rgba[:3].transpose(1, 2, 0)).save(tmp_path / f"img{k}.png")
            Image.fromarray(rgba[3]).save(tmp_path / f"mask{k}.png")
            rel = f"img{k}.png|mask{k}.png"
        pool.setdefault(str(ids[cat]), []).append(rel)
        expected[rel] = (cat, rgba)
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    build_bank(tmp_path / "bank", xpaste_source(tmp_path / "pool.json", categories_from=train_ann), progress=False)
    bank = SegmentBank(tmp_path / "bank")
    assert len(bank) == len(crops)
    for i in range(len(bank)):
        seg = bank[i]
        cat, rgba = expected[seg.source]
        assert seg.category == cat and seg.category_id == ids[cat]
        assert np.array_equal(seg.rgba.numpy(), rgba)


def test_merge_and_add_keep_old_shards_and_unify_categories(tmp_path, crops, train_bank):
    tree = tmp_path / "tree"
    for k, (cat, rgba) in enumerate(crops):
        _png(tree / cat / "all" / f"{k}.png", rgba)
    _png(tree / "unicorn" / "all" / "0.png", crops[0][1])
    build_bank(tmp_path / "tree_bank", rgba_tree_source(tree), progress=False)
    merged = tmp_path / "merged"
    merge_banks(merged, [train_bank.root])
    first_shards = {p.name: p.stat().st_ino for p in merged.glob("shard-*.bin")}
    merge_banks(merged, [tmp_path / "tree_bank"])
    bank = SegmentBank(merged)
    assert len(bank) == len(train_bank) + len(crops) + 1
    assert {p.name: p.stat().st_ino for p in merged.glob("shard-*.bin") if p.name in first_shards} == first_shards
    # the tree's "dog" is COCO's dog (id 18); "unicorn" is new and gets a fresh id
    dog = bank.category_id("dog")
    assert dog == 18
    assert bank.category_id("unicorn") not in {c["id"] for c in train_bank.meta["categories"]}
    tail = [bank[len(train_bank) + i] for i in range(len(crops))]
    assert [s.category for s in tail] == ["car"] * 4 + ["dog"] * 4 + ["person"] * 4  # tree order: sorted paths
    for i in range(0, len(train_bank), 97):
        assert np.array_equal(bank[i].rgba.numpy(), train_bank[i].rgba.numpy())
    assert len(list(merged.glob("index-*.bin"))) == 1


def test_adding_a_split_to_an_existing_bank(tmp_path, train_bank, coco_mini, val_ann):
    from sos_aug.bank import coco_source

    out = tmp_path / "bank"
    merge_banks(out, [train_bank.root])
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.bin")}
    report = build_bank(out, coco_source(val_ann, coco_mini / "val2017"), progress=False)
    bank = SegmentBank(out)
    assert len(bank) == len(train_bank) + report["added"] and report["added"] > 500
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.bin") if p.name in before} == before
    assert [p["kind"] for p in bank.meta["provenance"]] == ["merge", "coco"]
    assert np.array_equal(bank.index[: len(train_bank)]["category"], train_bank.index["category"])
    assert bank[len(bank) - 1].source.startswith("coco:")
