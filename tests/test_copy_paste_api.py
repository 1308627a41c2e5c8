"""CopyPaste's interface: input kinds, tv_tensors, reproducibility, boxes, errors."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from sos_aug import CopyPaste, RandomLayout, SOSLayout


def test_same_seed_same_output_and_different_seed_differs(train_bank, val_set):
    cp = CopyPaste(train_bank, layout=SOSLayout(rotation=15), num_pastes=(3, 8))
    images, targets = zip(*[val_set[i] for i in range(3)])
    a = cp(list(images), list(targets), generator=torch.Generator().manual_seed(5))
    b = cp(list(images), list(targets), generator=torch.Generator().manual_seed(5))
    c = cp(list(images), list(targets), generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert all(torch.equal(x["masks"], y["masks"]) for x, y in zip(a[1], b[1]))
    assert not all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a[1], c[1]))


@pytest.mark.parametrize("backend", ["window", "groups"])
def test_stacked_batch_float_images_and_empty_targets(train_bank, val_set, backend):
    cp = CopyPaste(train_bank, num_pastes=(2, 4), backend=backend)
    resize = v2.Resize((256, 256), antialias=True)
    images, targets = zip(*[resize(*val_set[i]) for i in range(2)])
    batch = torch.stack([im.as_subclass(torch.Tensor).float() / 255 for im in images])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 256, 256, dtype=torch.bool)}
    out, out_targets = cp(batch, [targets[0], empty], generator=torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out_targets[1]["is_pasted"].all() and len(out_targets[1]["labels"]) >= 2
    # the other path on the same draws gives the same result: the same instances, masks that differ
    # at most on a piece's border pixels (the grouped warp resizes in float, the window one in uint8)
    other = CopyPaste(train_bank, num_pastes=(2, 4), backend="groups" if backend == "window" else "window")
    again, again_targets = other(batch, [targets[0], empty], generator=torch.Generator().manual_seed(0))
    for a, b in zip(out_targets, again_targets):
        assert all(torch.equal(a[k], b[k]) for k in ("labels", "iscrowd", "is_pasted"))
        differ = (a["masks"] ^ b["masks"]).flatten(1).sum(1)
        assert (differ <= 0.02 * a["masks"].flatten(1).sum(1) + 4).all()
        assert (a["boxes"] - b["boxes"]).abs().max() <= 1
    assert (out - again).abs().gt(2 / 255).float().mean() < 0.002


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_on_every_path(train_bank, val_set, dtype):
    """Half-precision batches (what an AMP pipeline may hold) paste on every CPU path and keep their
    dtype and range; image by image and rotated (piece by piece, batched) agree exactly, the grouped
    warp up to border pixels."""
    from sos_aug import RandomLayout

    resize = v2.Resize((128, 160), antialias=True)
    images, targets = zip(*[resize(*val_set[i]) for i in range(3)])
    batch = torch.stack([im.as_subclass(torch.Tensor) for im in images]).to(dtype) / 255
    outs = {}
    for name, backend, rotation in (("window", "window", 0.0), ("groups", "groups", 0.0),
                                    ("window_turned", "window", 20.0), ("loop_turned", "groups", 20.0)):
        cp = CopyPaste(train_bank, layout=RandomLayout(rotation=rotation), num_pastes=(2, 5), backend=backend)
        out, out_targets = cp(batch, list(targets), generator=torch.Generator().manual_seed(3))
        assert out.dtype == dtype and out.min() >= 0 and out.max() <= 1
        outs[name] = out_targets
    assert all(torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(outs["window_turned"], outs["loop_turned"]))
    for a, b in zip(outs["window"], outs["groups"]):
        assert torch.equal(a["labels"], b["labels"])
        assert ((a["masks"] ^ b["masks"]).flatten(1).sum(1) <= 0.02 * a["masks"].flatten(1).sum(1) + 4).all()


def test_tv_tensors_in_and_out_with_other_box_formats(train_bank, val_set):
    image, target = val_set[0]
    h, w = image.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
    cxcywh = v2.ConvertBoundingBoxFormat("CXCYWH")(boxes)
    tgt = {**target, "boxes": cxcywh, "masks": tv_tensors.Mask(target["masks"])}
    out_image, out = CopyPaste(train_bank, num_pastes=(3, 3))(image, tgt, generator=torch.Generator().manual_seed(0))
    assert isinstance(out_image, tv_tensors.Image)
    assert isinstance(out["boxes"], tv_tensors.BoundingBoxes) and out["boxes"].format.name == "CXCYWH"
    assert isinstance(out["masks"], tv_tensors.Mask)
    back = v2.ConvertBoundingBoxFormat("XYXY")(out["boxes"])
    from sos_aug.ops.masks import tight_boxes

    assert torch.allclose(back.as_subclass(torch.Tensor), tight_boxes(out["masks"].as_subclass(torch.Tensor).bool()))


def test_open_vocabulary_keeps_unmapped_names(train_bank, val_set):
    cp = CopyPaste(train_bank, label_map={"person": 1}, open_vocabulary=True, num_pastes=(6, 6))
    image, target = val_set[1]
    _, out = cp(image, target, generator=torch.Generator().manual_seed(2))
    pasted = out["is_pasted"]
    names = [n for n, p in zip(out["names"], pasted.tolist()) if p]
    labels = out["labels"][pasted].tolist()
    assert len(names) == len(labels) > 0
    assert all((lab == 1) == (n == "person") for n, lab in zip(names, labels))
    assert all(lab in (1, -1) for lab in labels)


def test_bad_targets_fail_clearly(train_bank, val_set):
    cp = CopyPaste(train_bank)
    image, target = val_set[0]
    with pytest.raises(ValueError, match="boxes"):
        cp(image, {"masks": target["masks"], "labels": target["labels"]})
    with pytest.raises(ValueError, match="3 labels and"):
        cp(image, {"boxes": target["boxes"][:2], "labels": target["labels"][:3]})
    with pytest.raises(ValueError, match="empty image"):
        cp(torch.zeros(3, 0, 0, dtype=torch.uint8), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
    with pytest.raises(ValueError, match="num_pastes"):
        CopyPaste(train_bank, num_pastes=(5, 2))


@pytest.mark.parametrize("index", [0, 5, 11, 23])
def test_box_only_targets_keep_their_boxes_or_are_dropped_by_the_rule(train_bank, val_set, index):
    """A target without masks: its instances count as filled boxes, survivors keep the boxes they came
    with, the rest are the ones the pastes leave less than min_visible of; pasted instances get the
    same tight boxes as in a masked run of the same draws; no mask appears."""
    from sos_aug.ops.masks import filled_boxes

    cp = CopyPaste(train_bank, layout=RandomLayout(), num_pastes=(3, 8))
    image, target = val_set[index]
    boxes = target["boxes"].as_subclass(torch.Tensor).float() + 0.25  # fractional, as after a resize
    box_only = {"boxes": boxes, "labels": target["labels"], "iscrowd": target["iscrowd"]}
    masked = {**box_only, "masks": filled_boxes(boxes, *image.shape[-2:])}
    out_b, tb = cp(image, box_only, generator=torch.Generator().manual_seed(index))
    out_m, tm = cp(image, masked, generator=torch.Generator().manual_seed(index))
    assert "masks" not in tb and torch.equal(out_b, out_m)
    assert torch.equal(tb["is_pasted"], tm["is_pasted"]) and torch.equal(tb["labels"], tm["labels"])
    pasted = tb["is_pasted"]
    assert pasted.any()
    assert torch.equal(tb["boxes"][pasted], tm["boxes"][pasted])
    kept = tb["boxes"][~pasted]
    rows = [next(i for i, b in enumerate(boxes) if torch.equal(b, k)) for k in kept]
    assert rows == sorted(rows)  # survivors in input order, boxes exactly as they came
    covered = tm["masks"][pasted].any(0)
    filled = filled_boxes(boxes, *image.shape[-2:])
    visible = (filled & ~covered).flatten(1).sum(1).double() / filled.flatten(1).sum(1)
    crowd = target["iscrowd"].bool()
    expected = [i for i in range(len(boxes)) if (visible[i] >= 0.25 or crowd[i]) and visible[i] > 0]
    assert rows == expected


def test_damaged_segment_is_skipped_and_counted_not_fatal(tmp_path, train_bank, val_set):
    import shutil

    from sos_aug import SegmentBank

    copy = tmp_path / "bank"
    shutil.copytree(train_bank.root, copy)
    bank = SegmentBank(copy)
    rec = bank.index[0]
    category = bank[0].category
    shard = copy / bank.meta["shards"][int(rec["shard"])]["file"]
    data = bytearray(shard.read_bytes())
    start = int(rec["offset"])
    data[start : start + 4] = b"XXXX"  # break the first segment's header in place
    shard.write_bytes(bytes(data))
    people = SegmentBank(copy).subset(categories=[category])
    cp = CopyPaste(people, num_pastes=(20, 20))
    image, target = val_set[0]
    with pytest.warns(UserWarning, match="unreadable segment"):
        for seed in range(10):
            cp(image, target, generator=torch.Generator().manual_seed(seed))
    assert cp.skipped > 0


def test_bad_images_are_named_clearly(train_bank, val_set):
    """A NumPy HWC image and float images in 0-255 are refused with what was expected, not pasted
    wrongly (pasted pixels in [0, 1] on a 0-255 canvas come out black)."""
    import numpy as np

    cp = CopyPaste(train_bank, num_pastes=(1, 2))
    image, target = val_set[0]
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    with pytest.raises(TypeError, match=r"torch tensors.*numpy.ndarray of shape .*permute"):
        cp(hwc, target)
    with pytest.raises(ValueError, match=r"\[0, 1\].*uint8"):
        cp(image.float(), target)
    out, _ = cp(image.float() / 255, target, generator=torch.Generator().manual_seed(0))
    assert out.is_floating_point() and float(out.amax()) <= 1.0


def test_every_box_is_tight_by_default_and_input_boxes_stay_only_when_asked(train_bank, val_set):
    """After a resize, boxes are fractional and no longer their masks' tight boxes: by default every
    output box becomes its mask's tight box (as mmdet does after pasting); boxes="keep" leaves the
    instances no segment covers with the boxes they came with."""
    from sos_aug.ops.masks import tight_boxes

    image, target = v2.Resize((301, 397), antialias=True)(*val_set[3])
    fractional = target["boxes"].as_subclass(torch.Tensor)
    assert not torch.equal(fractional, fractional.round())
    for mode in ("tight", "keep"):
        cp = CopyPaste(train_bank, num_pastes=(1, 2), boxes=mode)
        _, out = cp(image, target, generator=torch.Generator().manual_seed(5))
        boxes = out["boxes"].as_subclass(torch.Tensor)
        tight = tight_boxes(out["masks"].as_subclass(torch.Tensor).bool()).float()
        if mode == "tight":
            assert torch.equal(boxes, tight)
        else:
            untouched = [i for i in range(int((~out["is_pasted"]).sum()))
                         if any(torch.equal(boxes[i], b) for b in fractional)]
            assert untouched and all(not torch.equal(boxes[i], tight[i]) for i in untouched)
    with pytest.raises(ValueError, match="boxes must be"):
        CopyPaste(train_bank, boxes="loose")


def test_paste_draws_nothing_and_draw_is_fetch_then_placements(train_bank, val_set):
    """``draw`` is ``fetch`` then ``draw_placements`` on the same generator, and ``paste`` is
    deterministic: pasting the same draws twice gives the same outputs."""
    cp = CopyPaste(train_bank, num_pastes=(2, 4))
    images, targets = zip(*[val_set[i] for i in (0, 1)])
    sizes = [tuple(im.shape[-2:]) for im in images]
    g = torch.Generator().manual_seed(3)
    segments = cp.fetch(2, g)
    params = cp.draw_placements(sizes, targets, segments, g)
    drawn = cp.draw(sizes, targets, torch.Generator().manual_seed(3))
    assert drawn.sizes == sizes and all(torch.equal(a.boxes, b.boxes) and torch.equal(a.segment, b.segment)
                                        for a, b in zip(params, drawn.placements))
    first = cp.paste(images, targets, segments, params)
    second = cp.paste(images, targets, drawn, drawn.placements)
    for (im1, t1), (im2, t2) in zip(zip(*first), zip(*second)):
        assert torch.equal(im1, im2)
        assert all(torch.equal(torch.as_tensor(t1[k]), torch.as_tensor(t2[k])) for k in ("boxes", "masks", "labels"))
    with pytest.raises(ValueError, match="unknown compositing backend"):
        CopyPaste(train_bank, backend="loop")  # internal: rotated or feathered pieces on a batched backend


def test_from_names_builds_what_configs_name(train_bank, train_ann):
    cp = CopyPaste.from_names(bank=str(train_bank.root), classes=["person", "dog"], layout="sos", relight=["lab"],
                              sampling="category_balanced", num_pastes=[2, 3], drop="mmdet", feather_sigma=1.0)
    assert cp.label_of[train_bank.category_id("dog")] == 1 and cp.bank.sampling == "category_balanced"
    assert type(cp.layout).__name__ == "SOSLayout" and cp.num_pastes == (2, 3) and cp.drop.mode == "mmdet"
    stats = CopyPaste.from_names(bank=train_bank, label_map=train_ann, layout="stats", layout_file=train_ann)
    assert type(stats.layout).__name__ == "DatasetStatsLayout" and stats.bank.sampling == train_bank.sampling
    assert stats.label_of[train_bank.category_id("dog")] == 18  # COCO's id, from the file
    for bad, match in (({"layout": "grid"}, "unknown layout"), ({"relight": "ic-light"}, "unknown relighter"),
                       ({"layout": "stats"}, "annotation file"),
                       ({"classes": ["a"], "label_map": {"a": 0}}, "not both")):
        with pytest.raises(ValueError, match=match):
            CopyPaste.from_names(bank=train_bank, **bad)


def test_usable_per_sample_inside_a_torchvision_v2_compose(train_bank, val_set):
    """A v2 pipeline that flips, pastes and resizes one sample: types and targets stay consistent."""
    from sos_aug.ops.masks import tight_boxes

    pipeline = v2.Compose([v2.RandomHorizontalFlip(p=1.0), CopyPaste(train_bank, num_pastes=(2, 4)),
                           v2.Resize((256, 320), antialias=True)])
    torch.manual_seed(0)
    image, target = pipeline(*val_set[2])
    assert isinstance(image, tv_tensors.Image) and image.shape[-2:] == (256, 320)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].canvas_size == (256, 320)
    assert target["is_pasted"].any() and len(target["masks"]) == len(target["labels"]) == len(target["boxes"])
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    assert (target["boxes"].as_subclass(torch.Tensor) - tight_boxes(masks)).abs().max() <= 2  # after the resize
