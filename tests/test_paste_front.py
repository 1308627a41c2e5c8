"""The compositing front door (``sos_aug.paste.paste``): one complete, typed result from every
backend, on real COCO images and segments, and the backend policy in ``choose_backend``.

The exactness of each result against an independent oracle is checked through ``CopyPaste`` in
``test_copy_paste_properties.py``; here the backends are checked against each other and against
what the result type promises.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sos_aug import CopyPaste, RandomLayout
from sos_aug.layout import Placement
from sos_aug.ops.masks import tight_boxes
from sos_aug.paste import BACKENDS, DropRule, Instances, PasteResult, choose_backend, paste
from sos_aug.paste.batched import paste_batch

CPU_BACKENDS = ("window", "loop", "groups")  # "kernel" needs Triton on CUDA (tests/test_triton_kernels.py)


def run(images, instances, rgba, placements, piece_labels, rule, backend, boxes="tight"):
    """The front door with ``backend``; ``"loop"`` (internal: the batched backends' piece-by-piece
    path, for rotated and feathered pieces) straight through the batched backend on a stacked batch."""
    if backend == "loop":
        batch = images if isinstance(images, torch.Tensor) else torch.stack(images)
        return paste_batch(batch, instances, list(rgba), placements, piece_labels, rule, backend="loop",
                           tight=boxes == "tight")
    return paste(images, instances, rgba, placements, piece_labels, rule, backend=backend, boxes=boxes)


def draw(train_bank, val_set, picks, seed, num=(1, 8), rotation=0.0, size=None):
    """Real val2017 images (optionally resized to one size), their instances, and segments and
    placements drawn by CopyPaste's layout from the real train2017 bank."""
    cp = CopyPaste(train_bank, layout=RandomLayout(scale=(0.3, 2.5), rotation=rotation), num_pastes=num)
    samples = [val_set[i % len(val_set)] for i in picks]
    if size is not None:
        from torchvision.transforms import v2

        samples = [v2.Resize(size, antialias=True)(*s) for s in samples]
    images = [im.as_subclass(torch.Tensor) for im, _ in samples]
    targets = [t for _, t in samples]
    g = torch.Generator().manual_seed(seed)
    segments = cp.fetch(len(images), g)
    placements = cp.draw_placements([tuple(im.shape[-2:]) for im in images], targets, segments, g)
    instances = [Instances(t["masks"].as_subclass(torch.Tensor).bool(), t["boxes"].as_subclass(torch.Tensor),
                           t["labels"], t["iscrowd"], t["area"]) for t in targets]
    piece_labels = [segments.labels[p.segment] for p in placements]
    return images, instances, segments.rgba, placements, piece_labels


def check_complete(res: PasteResult, inst: Instances, placement: Placement, piece_labels: torch.Tensor,
                   boxes: str = "tight") -> None:
    """Every field is filled and says what the result type promises."""
    m = len(res.masks)
    assert res.masks.dtype == torch.bool and res.masks.shape[1:] == inst.masks.shape[1:]
    assert res.boxes.shape == (m, 4) and res.area.shape == res.labels.shape == res.iscrowd.shape == (m,)
    assert res.is_pasted.dtype == torch.bool and res.is_pasted.shape == (m,)
    assert res.keep_existing.shape == (len(inst.masks),) and res.pasted_kept.shape == (len(placement),)
    assert res.pasted_kept.device.type == "cpu"
    n_old = int(res.keep_existing.sum())
    assert n_old + int(res.pasted_kept.sum()) == m
    assert not res.is_pasted[:n_old].any() and res.is_pasted[n_old:].all()
    # labels and crowd flags: the kept inputs' in order, then the kept draws' in paste order
    assert torch.equal(res.labels, torch.cat([inst.labels[res.keep_existing], piece_labels[res.pasted_kept]]))
    assert torch.equal(res.iscrowd, torch.cat([inst.crowd[res.keep_existing].long(),
                                               torch.zeros(m - n_old, dtype=torch.long)]))
    assert res.area.is_floating_point() and (res.area > 0).all()
    # a changed mask has its pixel count; an unchanged one keeps its input area
    old = inst.masks[res.keep_existing]
    same = (res.masks[:n_old] == old).flatten(1).all(1)
    counts = res.masks.flatten(1).sum(1).float()
    assert torch.equal(res.area[:n_old][same], inst.area[res.keep_existing][same].float())
    assert torch.equal(res.area[:n_old][~same], counts[:n_old][~same])
    assert torch.equal(res.area[n_old:], counts[n_old:])
    # boxes: tight, or (boxes="keep") the input's where the mask did not change
    tight = tight_boxes(res.masks)
    if boxes == "tight":
        assert torch.equal(res.boxes, tight)
    else:
        assert torch.equal(res.boxes[n_old:], tight[n_old:])
        assert torch.equal(res.boxes[:n_old][~same], tight[:n_old][~same])
        assert torch.equal(res.boxes[:n_old][same], inst.boxes[res.keep_existing][same].float())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), picks=st.lists(st.integers(0, 78), min_size=1, max_size=3),
       drop=st.sampled_from(["visible_fraction", "mmdet"]))
def test_every_backend_returns_a_complete_result_and_they_agree(train_bank, val_set, seed, picks, drop):
    """One call per backend on the same draws (images resized to one size, as a batch): every
    result is complete; the window and loop backends are bit-identical on the CPU; the grouped
    backend (float warps, rounded once) keeps the same instances and labels up to pixels whose
    alpha sits on the threshold."""
    images, instances, rgba, placements, piece_labels = draw(train_bank, val_set, picks, seed, size=(320, 384))
    rule = DropRule(drop)
    out = {name: run(images, instances, rgba, placements, piece_labels, rule, name) for name in CPU_BACKENDS}
    for name, results in out.items():
        assert len(results) == len(images), name
        for res, inst, placement, labels in zip(results, instances, placements, piece_labels):
            check_complete(res, inst, placement, labels)
    for window, loop in zip(out["window"], out["loop"]):
        for field in ("image", "masks", "boxes", "area", "labels", "iscrowd", "is_pasted", "keep_existing",
                      "pasted_kept"):
            assert torch.equal(getattr(window, field), getattr(loop, field)), field
    for window, grouped in zip(out["window"], out["groups"]):
        if torch.equal(window.pasted_kept, grouped.pasted_kept) and torch.equal(window.keep_existing,
                                                                                grouped.keep_existing):
            assert torch.equal(window.labels, grouped.labels)
            assert (window.masks != grouped.masks).sum() <= 0.001 * window.masks.numel()


def test_a_list_of_sizes_and_a_stacked_batch_give_what_image_by_image_gives(train_bank, val_set):
    """The batched backends take a list of mixed sizes (pasted size group by size group) or a
    (B, 3, H, W) batch, and give each image what the window backend gives it (rotated pieces, so
    the batched backend goes piece by piece, bit-identical to the window one)."""
    images, instances, rgba, placements, piece_labels = draw(train_bank, val_set, [0, 1, 2, 3], seed=5,
                                                            rotation=10.0)
    assert len({im.shape for im in images}) > 1  # real images of different sizes
    rule = DropRule()
    by_image = paste(images, instances, rgba, placements, piece_labels, rule, backend="window")
    mixed = paste(images, instances, rgba, placements, piece_labels, rule, backend="groups")
    for a, b in zip(by_image, mixed):
        assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    images, instances, rgba, placements, piece_labels = draw(train_bank, val_set, [4, 5], seed=6, size=(256, 256),
                                                            rotation=10.0)
    stacked = paste(torch.stack(images), instances, rgba, placements, piece_labels, rule, backend="groups")
    listed = paste(images, instances, rgba, placements, piece_labels, rule, backend="window")
    for a, b in zip(stacked, listed):
        assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes) and torch.equal(a.area, b.area)


def test_rotated_pieces_are_complete_too(train_bank, val_set):
    """Rotation sends the batched backends piece by piece; both results stay complete and equal."""
    images, instances, rgba, placements, piece_labels = draw(train_bank, val_set, [7, 8], seed=2, rotation=40.0,
                                                            size=(288, 288))
    assert any(bool(p.angle.any()) for p in placements)
    rule = DropRule()
    window = paste(images, instances, rgba, placements, piece_labels, rule, backend="window")
    grouped = paste(images, instances, rgba, placements, piece_labels, rule, backend="groups")
    for a, b, inst, pl, lab in zip(window, grouped, instances, placements, piece_labels):
        check_complete(a, inst, pl, lab)
        assert torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)


def test_kept_boxes_stay_the_inputs_where_the_mask_did_not_change(train_bank, val_set):
    """``boxes="keep"``: instances no piece covers keep the boxes they came with (here made loose by
    a pixel, so they differ from the tight ones), on every backend."""
    images, instances, rgba, placements, piece_labels = draw(train_bank, val_set, [11, 12], seed=3, size=(256, 320))
    loose = [Instances(i.masks, i.boxes + torch.tensor([-0.5, -0.5, 0.5, 0.5]), i.labels, i.crowd, i.area)
             for i in instances]
    for backend in CPU_BACKENDS:
        results = run(images, loose, rgba, placements, piece_labels, DropRule(), backend, boxes="keep")
        unchanged = 0
        for res, inst, pl, lab in zip(results, loose, placements, piece_labels):
            check_complete(res, inst, pl, lab, boxes="keep")
            n_old = int(res.keep_existing.sum())
            unchanged += int((res.masks[:n_old] == inst.masks[res.keep_existing]).flatten(1).all(1).sum())
        assert unchanged > 0, backend  # the check above had something to check
    with pytest.raises(ValueError, match="boxes must be"):
        paste(images, loose, rgba, placements, piece_labels, DropRule(), boxes="loose")


def test_without_given_areas_untouched_instances_get_their_pixel_counts(train_bank, val_set):
    images, instances, rgba, placements, piece_labels = draw(train_bank, val_set, [9], seed=1)
    bare = [Instances(i.masks, i.boxes, i.labels, i.crowd) for i in instances]
    for backend in CPU_BACKENDS:
        res = run(images, bare, rgba, placements, piece_labels, DropRule(), backend)[0]
        assert torch.equal(res.area, res.masks.flatten(1).sum(1).float()), backend


def test_an_instance_whose_mask_is_empty_is_dropped_not_given_a_zero_box(train_bank, val_set):
    """A polygon too small to rasterise (after a crop or a downscale) leaves an empty mask under a
    real box: on every backend and box mode it is dropped, never returned with a (0, 0, 0, 0) box
    (which a detector's box regression turns into an infinite loss); a crowd region with an empty
    mask (mmdet's polygons make those) is kept, with the box it came with."""
    images, instances, rgba, placements, piece_labels = draw(train_bank, val_set, [2], seed=4, size=(256, 256))
    inst = instances[0]
    empty = torch.zeros(1, *inst.masks.shape[-2:], dtype=torch.bool)
    box = torch.tensor([[3.0, 4.0, 9.0, 8.0]])
    for crowd in (False, True):
        with_empty = Instances(torch.cat([empty, inst.masks]), torch.cat([box, inst.boxes]),
                               torch.cat([inst.labels[:1], inst.labels]),
                               torch.cat([torch.tensor([crowd]), inst.crowd.bool()]),
                               torch.cat([torch.tensor([24.0]), inst.area]))  # the polygon's area, as COCO gives it
        for backend in CPU_BACKENDS:
            for boxes in ("tight", "keep"):
                res = run(images, [with_empty], rgba, placements, piece_labels, DropRule(), backend, boxes=boxes)[0]
                assert bool(res.keep_existing[0]) == crowd, (backend, boxes, crowd)
                assert ((res.boxes[:, 2] > res.boxes[:, 0]) & (res.boxes[:, 3] > res.boxes[:, 1])).all()
                if crowd:
                    assert torch.equal(res.boxes[0], box[0]) and res.iscrowd[0] == 1
                else:
                    check_complete(res, with_empty, placements[0], piece_labels[0], boxes=boxes)


def test_no_placement_returns_the_inputs_unchanged(train_bank, val_set):
    images, instances, rgba, _, _ = draw(train_bank, val_set, [10], seed=0)
    empty = Placement(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                      torch.zeros(0))
    for backend in CPU_BACKENDS:
        res = run(images, instances, rgba, [empty], [torch.zeros(0, dtype=torch.long)], DropRule(), backend)[0]
        assert torch.equal(res.image, images[0]) and torch.equal(res.masks, instances[0].masks)
        assert torch.equal(res.labels, instances[0].labels) and not res.is_pasted.any()
        assert res.pasted_kept.shape == (0,)


def test_the_backend_policy_lives_in_one_place():
    cpu, flat = torch.device("cpu"), [Placement(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long),
                                                torch.zeros(1, dtype=torch.bool), torch.zeros(1))]
    turned = [Placement(flat[0].boxes, flat[0].segment, flat[0].flip, torch.full((1,), 30.0))]
    assert choose_backend("auto", cpu, flat) == "window"  # the window path is the CPU's fastest
    assert choose_backend("window", cpu, turned, 2.0) == "window"  # it handles rotation and feathering
    assert choose_backend("groups", cpu, flat) == "groups"
    # rotated or feathered pieces go piece by piece, a path callers cannot name
    assert choose_backend("groups", cpu, turned) == "loop" and choose_backend("groups", cpu, flat, 1.5) == "loop"
    assert "loop" not in BACKENDS
    for name in ("fast", "loop"):
        with pytest.raises(ValueError, match=f"unknown compositing backend '{name}'"):
            choose_backend(name, cpu, flat)
    from sos_aug.ops import backends

    if not backends.available(cpu, "paste"):
        with pytest.raises(RuntimeError, match="backend='kernel' needs Triton"):
            choose_backend("kernel", cpu, flat)


def test_mismatched_inputs_are_refused_with_their_counts(train_bank, val_set):
    images, instances, rgba, placements, piece_labels = draw(train_bank, val_set, [0, 1], seed=0)
    with pytest.raises(ValueError, match="2 images, 1 instance sets, 2 placements"):
        paste(images, instances[:1], rgba, placements, piece_labels, DropRule())
