"""The torch-only part every framework adapter stands on (sos_aug.integrations.common), over random
layouts on real coco-mini images: rows trace back to their input, masked instances are exact, and
box-only instances keep their boxes or are dropped by the stated rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sos_aug.integrations.common import Instances, make_copy_paste, paste_instances
from sos_aug.ops.masks import filled_boxes, tight_boxes

CLASSES = ["person", "car", "chair", "cup", "dog", "bottle", "bowl", "book"]


def instances(target, with_masks: bool) -> Instances:
    return Instances(target["boxes"].float(), target["labels"], target["masks"].bool() if with_masks else None,
                     target["iscrowd"].bool())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 78), seed=st.integers(0, 2**31 - 1), with_masks=st.booleans())
@example(index=67, seed=33, with_masks=True)  # a piece hidden by later ones still covers what was under it
def test_pasted_rows_trace_back_and_box_only_boxes_stand(train_bank, val_set, index, seed, with_masks):
    cp = make_copy_paste(train_bank, CLASSES, layout="random", num_pastes=(2, 8))
    image, target = val_set[index]
    inst = instances(target, with_masks)
    (out,), (res,) = paste_instances(cp, [image], [inst], generator=torch.Generator().manual_seed(seed))
    old = res.source[~res.is_pasted]
    assert torch.equal(old, old.sort().values) and (old >= 0).all()  # existing rows in input order
    assert torch.equal(res.labels[~res.is_pasted], inst.labels[old])
    assert torch.equal(res.ignore[~res.is_pasted], inst.ignore[old])
    assert not res.ignore[res.is_pasted].any()
    names = [CLASSES[int(lab)] for lab in res.labels[res.is_pasted]]
    assert all(n in CLASSES for n in names)
    if with_masks:
        assert res.masks is not None and len(res.masks) == len(res.labels)
        covered = res.masks[res.is_pasted].any(0)
        changed = (out != image).any(0)
        kept, before = res.masks[~res.is_pasted], inst.masks[old]
        # each survivor is its input less painted pixels: never a kept pasted one, only pixels the paste
        # changed (a piece hidden by later ones is dropped as a target, its pixels still cover)
        assert not (kept & ~before).any() and not (kept & covered).any()
        assert not ((before & ~kept) & ~covered & ~changed).any()
        assert torch.equal(res.boxes[res.is_pasted], tight_boxes(res.masks[res.is_pasted]).float())
    else:
        assert res.masks is None
        assert torch.equal(res.boxes[~res.is_pasted], inst.boxes[old])  # box-only boxes stand as they came
        # the rule: a box is dropped only if the pasted pixels leave too little of its filled box
        h, w = image.shape[-2:]
        filled = filled_boxes(inst.boxes, h, w)
        dropped = sorted(set(range(len(inst))) - set(old.tolist()))
        changed = (out != image).any(0)
        for j in dropped:
            assert (filled[j] & changed).any(), f"box {j} dropped although nothing was pasted over it"


def test_filled_boxes_cover_pixel_centres_and_never_come_out_empty():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.2, 1.2, 1.4, 1.4], [3.5, 0.5, 4.5, 1.5]])
    m = filled_boxes(boxes, 4, 5)
    assert m[0].sum() == 6 and m[0, :3, :2].all()
    assert m[1].sum() == 1 and m[1, 1, 1]  # thinner than a pixel: the pixel holding its centre
    assert m[2].sum() == 1 and m[2, 0, 3]  # [3.5, 4.5) x [0.5, 1.5) holds the centre of pixel (0, 3)


def test_config_values_are_checked(train_bank):
    with pytest.raises(ValueError, match="unknown layout"):
        make_copy_paste(train_bank, CLASSES, layout="grid")
    with pytest.raises(ValueError, match="unknown relighter"):
        make_copy_paste(train_bank, CLASSES, relight="ic-light")
    cp = make_copy_paste(str(train_bank.root), CLASSES, layout="sos", relight=["lab"], sampling="category_balanced")
    assert cp.bank.sampling == "category_balanced" and type(cp.layout).__name__ == "SOSLayout"
    assert {train_bank.categories[int(c)]["name"] for c in cp.bank.index["category"]} <= set(CLASSES)
