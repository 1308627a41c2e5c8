"""What every framework adapter stands on, in plain torch (so CI tests it without the frameworks):
CopyPaste on box-only targets and into each image's unpadded extent, over random layouts on real
coco-mini images; and how an adapter finds the extent (``integrations/padding.py``)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from invariants import match_existing

from sos_aug import CopyPaste
from sos_aug.integrations.padding import unpadded_extent
from sos_aug.ops.masks import filled_boxes, tight_boxes

CLASSES = ["person", "car", "chair", "cup", "dog", "bottle", "bowl", "book"]


def padded(image: torch.Tensor, target: dict, pad: tuple[int, int], value: int = 114):
    """The sample padded at the bottom and right as mmdet's Pad and detectron2's FixedSizeCrop pad."""
    h, w = image.shape[-2:]
    out = torch.full((3, h + pad[0], w + pad[1]), value, dtype=image.dtype)
    out[:, :h, :w] = image
    masks = torch.zeros(len(target["masks"]), h + pad[0], w + pad[1], dtype=torch.bool)
    masks[:, :h, :w] = target["masks"]
    return out, {**target, "masks": masks, "boxes": torch.as_tensor(target["boxes"]).float()}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 78), seed=st.integers(0, 2**31 - 1), with_masks=st.booleans(),
       pad=st.tuples(st.integers(0, 90), st.integers(0, 90)))
@example(index=67, seed=33, with_masks=True, pad=(0, 0))  # a piece hidden by later ones still covers what was under it
def test_pastes_stay_in_the_extent_and_box_only_boxes_stand(train_bank, val_set, index, seed, with_masks, pad):
    """Into a padded image with its extent: the padding comes back bit for bit, no instance reaches
    into it, and the result inside equals pasting the unpadded image with the same draws. Box-only:
    survivors keep their boxes, in order; a box is dropped only where pixels were pasted over it."""
    cp = CopyPaste.from_names(bank=train_bank, classes=CLASSES, layout="random", num_pastes=(2, 8))
    image, target = val_set[index]
    h, w = image.shape[-2:]
    big, big_target = padded(image, target, pad)
    if not with_masks:
        big_target = {k: v for k, v in big_target.items() if k != "masks"}
    assert unpadded_extent(big) == (h, w) or pad == (0, 0)
    out, res = cp(big, big_target, extents=[(h, w)], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out[:, h:], big[:, h:]) and torch.equal(out[:, :, w:], big[:, :, w:])
    plain_target = {k: (v[:, :h, :w] if k == "masks" else v) for k, v in big_target.items()}
    alone, alone_res = cp(image, plain_target, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out[:, :h, :w], alone)
    for key in ("labels", "iscrowd", "is_pasted", "boxes", "area"):
        assert torch.equal(torch.as_tensor(res[key]), torch.as_tensor(alone_res[key])), key
    pasted = res["is_pasted"]
    if with_masks:
        assert res["masks"].shape[-2:] == big.shape[-2:] and not res["masks"][:, h:].any()
        assert not res["masks"][:, :, w:].any() and torch.equal(res["masks"][:, :h, :w], alone_res["masks"])
        assert torch.equal(res["boxes"][pasted], tight_boxes(res["masks"][pasted]).float())
    else:
        assert "masks" not in res
        boxes = big_target["boxes"]
        kept = res["boxes"][~pasted]
        rows = [next(i for i, b in enumerate(boxes) if torch.equal(b, k)) for k in kept]
        assert rows == sorted(rows)  # survivors in input order, their boxes exactly as they came
        filled = filled_boxes(boxes, h, w)
        changed = (out[:, :h, :w] != image).any(0)
        for j in sorted(set(range(len(boxes))) - set(rows)):
            assert (filled[j] & changed).any(), f"box {j} dropped although nothing was pasted over it"


def extent_by_definition(image: torch.Tensor) -> tuple[int, int]:
    """The last row and column holding a pixel unlike the bottom-right one, pixel by pixel."""
    differs = (image != image[:, -1:, -1:]).any(0)
    if not differs.any():
        return tuple(image.shape[-2:])
    rows, cols = differs.nonzero(as_tuple=True)
    return int(rows.max()) + 1, int(cols.max()) + 1


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 70), pad=st.tuples(st.integers(0, 20), st.integers(0, 20)),
       value=st.integers(0, 255), layout=st.sampled_from(["planar", "channels-last", "float"]),
       seed=st.integers(0, 2**16), speckle=st.booleans())
@example(h=10, w=13, pad=(3, 11), value=114, layout="planar", seed=0, speckle=False)  # width 24: read by words
@example(h=10, w=13, pad=(3, 11), value=114, layout="planar", seed=1, speckle=True)
def test_the_extent_found_8_pixels_at_a_time_is_the_definitions(h, w, pad, value, layout, seed, speckle):
    """unpadded_extent (uint8 rows read as 64-bit words where the width allows) agrees with the
    definition on images with any content: content ending in the padding's colour, one stray pixel
    of another colour in the padding, every width and memory layout."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, h + pad[0], w + pad[1]), value, dtype=torch.uint8)
    image[:, :h, :w] = torch.randint(0, 3, (3, h, w), generator=g, dtype=torch.uint8) + value // 2  # near it
    if speckle:
        y, x = (int(torch.randint(0, n, (1,), generator=g)) for n in image.shape[-2:])
        image[int(torch.randint(0, 3, (1,), generator=g)), y, x] ^= 1
    if layout == "channels-last":
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    elif layout == "float":
        image = image.float() / 255
    assert unpadded_extent(image) == extent_by_definition(image)


def test_the_extent_is_where_the_padding_begins_and_grows_to_cover_instances(train_bank, val_set):
    image, target = val_set[3]
    h, w = image.shape[-2:]
    big, big_target = padded(image, target, (40, 17), value=0)
    assert unpadded_extent(big) == (h, w)
    assert unpadded_extent(image) == (h, w)  # no padding: the whole image
    flat = torch.full((3, 20, 30), 7, dtype=torch.uint8)
    assert unpadded_extent(flat) == (20, 30)  # one colour throughout: all of it is the image
    # an extent that would cut an instance is grown to cover it: every survivor is its whole input
    # mask less pasted pixels, parts beyond the extent included
    cp = CopyPaste.from_names(bank=train_bank, classes=CLASSES, num_pastes=(3, 3))
    out, res = cp(big, big_target, extents=[(h // 2, w // 2)], generator=torch.Generator().manual_seed(0))
    pasted = res["is_pasted"]
    covered = res["masks"][pasted].any(0)
    match_existing(res["masks"][~pasted], big_target["masks"], covered, (out != big).any(0))
    assert res["masks"][~pasted][:, h // 2:h].any()  # instances below the extent's edge survive whole
    assert not res["masks"][:, h:].any() and torch.equal(out[:, h:], big[:, h:])


def test_filled_boxes_cover_pixel_centres_and_never_come_out_empty():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.2, 1.2, 1.4, 1.4], [3.5, 0.5, 4.5, 1.5]])
    m = filled_boxes(boxes, 4, 5)
    assert m[0].sum() == 6 and m[0, :3, :2].all()
    assert m[1].sum() == 1 and m[1, 1, 1]  # thinner than a pixel: the pixel holding its centre
    assert m[2].sum() == 1 and m[2, 0, 3]  # [3.5, 4.5) x [0.5, 1.5) holds the centre of pixel (0, 3)
