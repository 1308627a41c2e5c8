"""Exactness of CopyPaste, as properties over random layouts, sizes and seeds on real COCO images.

The oracle re-derives each pasted piece's hard mask from the drawn parameters and checks the
bookkeeping against it; boxes are checked against torchvision's ``masks_to_boxes``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torchvision.ops import masks_to_boxes

from sos_aug import CopyPaste, DropRule, ExistingBoxesLayout, RandomLayout, SOSLayout, label_map_from_coco
from sos_aug.ops.masks import ALPHA_CUT
from sos_aug.ops.resize import warp_segment
from sos_aug.paste.geometry import PastedPiece, clip_window

LAYOUTS = {
    "random": lambda: RandomLayout(scale=(0.3, 2.5), rotation=0.0),
    "random_rotated": lambda: RandomLayout(scale=(0.5, 2.0), rotation=45.0),
    "sos": lambda: SOSLayout(),
    "existing": lambda: ExistingBoxesLayout(),
}


# every path on the CPU (the batched one goes piece by piece for rotated layouts); with a CUDA device
# also the batched paths there (the Triton kernels are its default), whose pieces are warped by float
# kernels and rounded once, like the grouped path on the CPU
PATHS = ["per_image", "batched_groups"] + (["cuda_batched_groups", "cuda_batched_kernel"]
                                           if torch.cuda.is_available() else [])
BACKENDS = {"per_image": "window", "groups": "groups", "kernel": "kernel"}  # by the path's last word


def on(device, images, targets, segments):
    """The inputs moved to ``device`` (what a training step holds after ``.to(device)``)."""
    if device == "cpu":
        return images, targets, segments
    moved = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return [im.to(device) for im in images], moved, segments.to(device)


def reference_pieces(segments, placement, height, width, grouped=False, device="cpu"):
    """Each piece warped on its own by torchvision/torch, clipped to the canvas and thresholded:
    through the uint8 kernel as the CPU paths do, or (``grouped``) the float kernel rounded once,
    as the grouped path computes it; pixels within float error of the threshold are not decidable
    between two float implementations, so such draws are skipped (on CUDA the reference warps
    there: torch's CUDA and CPU kernels differ by up to 3e-3, its bmm path by less)."""
    pieces = []
    for k in range(len(placement)):
        box = placement.boxes[k]
        segment = segments.rgba[int(placement.segment[k])]
        patch = warp_segment(segment.float().to(device) if grouped else segment, int(box[3] - box[1]),
                             int(box[2] - box[0]), bool(placement.flip[k]), float(placement.angle[k])).cpu()
        where = clip_window(box.tolist(), patch.shape[-2], patch.shape[-1], height, width)
        if where is None:
            continue
        crop, window = where
        patch = patch[(slice(None), *crop)]
        if grouped:
            assume(not ((patch[3] - ALPHA_CUT).abs() < (1e-4 if device == "cpu" else 5e-3)).any())
            mask, rgb = patch[3] >= ALPHA_CUT, patch[:3].round().clamp(0, 255).to(torch.uint8)
        else:
            mask, rgb = patch[3] >= 128, patch[:3]
        if mask.any():
            pieces.append((PastedPiece(rgb, patch[3], mask, window[0].start, window[1].start),
                           int(placement.segment[k])))
    return pieces


def full_mask(piece, height, width):
    m = torch.zeros(height, width, dtype=torch.bool)
    m[piece.window] = piece.mask
    return m


def tight(masks):
    if len(masks) == 0:
        return torch.zeros(0, 4)
    return masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    picks=st.lists(st.integers(0, 78), min_size=1, max_size=4),
    layout=st.sampled_from(sorted(LAYOUTS)),
    num=st.tuples(st.integers(0, 6), st.integers(0, 8)).map(lambda t: (min(t), max(t))),
    drop=st.sampled_from(["visible_fraction", "mmdet"]),
    min_visible=st.floats(0.05, 0.9),
    path=st.sampled_from(PATHS),
)
def test_copypaste_targets_are_exact(train_bank, val_set, val_ann, seed, picks, layout, num, drop, min_visible,
                                     path):
    """Every path: image by image (the CPU default) and batched with all pieces warped in size
    groups (the accelerator default; piece by piece for rotated layouts); on a CUDA device too when
    there is one (layouts drawn on the CPU, results checked there)."""
    rule = DropRule(drop, min_visible=min_visible)
    label_map = label_map_from_coco(val_ann)
    device = "cuda" if path.startswith("cuda_") else "cpu"
    cp = CopyPaste(train_bank, layout=LAYOUTS[layout](), num_pastes=num, drop=rule, label_map=label_map,
                   backend=BACKENDS[path if path == "per_image" else path.rsplit("_", 1)[-1]])
    grouped = device != "cpu" or (path == "batched_groups" and layout != "random_rotated")
    images, targets = zip(*[val_set[i % len(val_set)] for i in picks])
    g = torch.Generator().manual_seed(seed)
    segments = cp.fetch(len(images), g)
    sizes = [tuple(im.shape[-2:]) for im in images]
    params = cp.draw_placements(sizes, targets, segments, g)
    out_images, out_targets = cp.paste(*on(device, images, targets, segments), params)
    out_images = [im.cpu() for im in out_images]
    out_targets = [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in t.items()} for t in out_targets]
    bank_cat = train_bank.index["category"]
    names = {c["id"]: c["name"] for c in train_bank.meta["categories"]}

    for image, target, placement, out_image, out in zip(images, targets, params, out_images, out_targets):
        h, w = image.shape[-2:]
        pieces = reference_pieces(segments, placement, h, w, grouped, device)
        piece_masks = [full_mask(p, h, w) for p, _ in pieces]
        covered = torch.zeros(h, w, dtype=torch.bool)
        for m in piece_masks:
            covered |= m
        masks, boxes, pasted = out["masks"], out["boxes"], out["is_pasted"]
        n_old = int((~pasted).sum())

        # every box is the tight box of its mask (untouched instances came in with tight boxes)
        assert torch.equal(boxes, tight(masks))
        # shapes and types agree
        assert len(masks) == len(boxes) == len(out["labels"]) == len(out["iscrowd"]) == len(out["area"])
        assert masks.dtype == torch.bool and not pasted[:n_old].any() and pasted[n_old:].all()
        assert torch.equal(out["area"], masks.flatten(1).sum(1).float())

        # existing instances: input mask minus covered pixels, kept only above the threshold
        old_masks = target["masks"]
        expected_old = old_masks & ~covered
        kept_old = []
        for i in range(len(old_masks)):
            before, after = int(old_masks[i].sum()), int(expected_old[i].sum())
            old_box, new_box = target["boxes"][i], tight(expected_old[i : i + 1])[0] if after else None
            if after == before:
                keep = True
            elif after == 0:
                keep = False
            elif target["iscrowd"][i]:
                keep = True
            elif drop == "visible_fraction":
                keep = after >= min_visible * before
            else:
                keep = bool((new_box - old_box).abs().max() <= 10) or after > 300
            if keep:
                kept_old.append(i)
        assert n_old == len(kept_old)
        assert torch.equal(masks[:n_old], expected_old[kept_old])
        assert torch.equal(out["labels"][:n_old], target["labels"][kept_old])
        assert torch.equal(out["iscrowd"][:n_old], target["iscrowd"][kept_old])

        # pasted instances: visible part = piece minus later pieces; pairwise disjoint; thresholded
        later = torch.zeros(h, w, dtype=torch.bool)
        visible = [None] * len(pieces)
        for j in range(len(pieces) - 1, -1, -1):
            visible[j] = piece_masks[j] & ~later
            later |= piece_masks[j]
        kept_new = []
        for j, (_, seg_index) in enumerate(pieces):
            full, vis = int(piece_masks[j].sum()), int(visible[j].sum())
            if vis == 0:
                continue
            if drop == "visible_fraction":
                keep = vis >= min_visible * full
            else:
                keep = bool((tight(visible[j][None])[0] - tight(piece_masks[j][None])[0]).abs().max() <= 10) \
                    or vis > 300
            if keep:
                kept_new.append((j, seg_index))
        assert len(masks) - n_old == len(kept_new)
        for row, (j, seg_index) in enumerate(kept_new):
            assert torch.equal(masks[n_old + row], visible[j])
            # labels map by name from the bank category to the dataset's id
            cat = int(bank_cat[int(segments.bank_rows[seg_index])])
            assert int(out["labels"][n_old + row]) == label_map[names[cat]]
            assert int(out["pasted_rows"][row]) == int(segments.bank_rows[seg_index])
        pasted_masks = masks[n_old:]
        if len(pasted_masks) > 1:
            overlap = pasted_masks.float().flatten(1) @ pasted_masks.float().flatten(1).T
            assert torch.equal(overlap.triu(1), torch.zeros_like(overlap))
        assert not (masks[:n_old] & covered).any()

        # pixels: under a piece's visible part the warped segment; outside every footprint the input
        for j, (piece, _) in enumerate(pieces):
            full_rgb = torch.zeros(3, h, w, dtype=torch.uint8)
            full_rgb[(slice(None), *piece.window)] = piece.rgb
            # rounding a float result of two implementations may differ by one level at .5
            diff = (out_image[:, visible[j]].int() - full_rgb[:, visible[j]].int()).abs()
            assert not (diff > int(grouped)).any()
        assert torch.equal(out_image[:, ~covered], image[:, ~covered])


def test_label_map_by_name_skips_unmapped_categories(train_bank, val_set):
    cp = CopyPaste(train_bank, label_map={"person": 7, "Dog": 8}, num_pastes=(5, 5))
    image, target = val_set[0]
    g = torch.Generator().manual_seed(1)
    _, out = cp(image, target, generator=g)
    new = out["labels"][out["is_pasted"]]
    assert len(new) > 0 and set(new.tolist()) <= {7, 8}
    with pytest.raises(ValueError, match="no usable segment"):
        CopyPaste(train_bank, label_map={"unicorn": 1})
