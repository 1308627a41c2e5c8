"""Masks to boxes (ops/masks.py): ``tight_boxes`` against each mask's pixel coordinates."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sos_aug.ops.masks import tight_boxes


def _reference(masks: torch.Tensor) -> torch.Tensor:
    """Pixel-edge XYXY boxes from each mask's set pixels (zeros for an empty mask)."""
    boxes = torch.zeros(len(masks), 4)
    for i, mask in enumerate(masks):
        ys, xs = mask.nonzero(as_tuple=True)
        if len(ys):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return boxes


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 6), st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_tight_boxes_are_the_masks_pixel_extents(n, h, w, density, seed):
    """Any masks, empty, single-pixel, full or sparse (whose rows in between are empty), as bool and
    as 0/1 uint8 and as a strided view: each box spans exactly its mask's set pixels."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, h, w, generator=g) < density * torch.rand(n, 1, 1, generator=g)
    expected = _reference(masks)
    assert torch.equal(tight_boxes(masks), expected)
    assert torch.equal(tight_boxes(masks.to(torch.uint8)), expected)
    wide = torch.zeros(n, h, w + 3, dtype=torch.bool)
    wide[..., 1 : w + 1] = masks
    assert torch.equal(tight_boxes(wide[..., 1 : w + 1]), expected)  # a view: rows not contiguous


def test_tight_boxes_of_real_coco_masks(val_set):
    """COCO val2017 instances at their own size: the same boxes as the pixels say."""
    for i in range(6):
        masks = val_set[i][1]["masks"].as_subclass(torch.Tensor).bool()
        assert torch.equal(tight_boxes(masks), _reference(masks))
