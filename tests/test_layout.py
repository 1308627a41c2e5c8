"""Layouts (sos_aug.layout): SOS's size mix and visibility rules on real images' instance grids,
dataset-statistics sizes, box pools, canvas limits, the upscale cap, and empty scenes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sos_aug import DatasetStatsLayout, ExistingBoxesLayout, RandomLayout, SOSLayout, label_map_from_coco
from sos_aug.layout import Scene, grid_step
from sos_aug.ops.masks import tight_boxes


def _scene(h=480, w=640, k=40, existing=None):
    seg = torch.randint(20, 200, (k, 2), generator=torch.Generator().manual_seed(0))
    boxes = torch.zeros(0, 4) if existing is None else existing
    return Scene(h, w, seg, ["person"] * k, boxes)


def test_sos_layout_size_mix_and_visibility():
    layout = SOSLayout(flip=0.0, max_upscale=None)
    scene = _scene(k=4000)
    sizes = layout.sizes(scene, torch.Generator().manual_seed(0))
    area = sizes.prod(1)
    small, medium = (area <= 32**2).double().mean(), ((area > 32**2) & (area <= 96**2)).double().mean()
    assert abs(small - 0.40) < 0.03 and abs(medium - 0.35) < 0.03
    aspect = sizes[:, 1] / sizes[:, 0]
    assert torch.allclose(aspect, scene.segment_hw[:, 1] / scene.segment_hw[:, 0].double(), rtol=1e-6)
    # placed large first, and with enough visibility everything it accepted stays >= 50% visible
    placement = layout(_scene(k=12), torch.Generator().manual_seed(1))
    areas = (placement.boxes[:, 2:] - placement.boxes[:, :2]).prod(1)
    assert len(placement) >= 1
    boxes = placement.boxes
    for j in range(len(boxes)):
        m = torch.zeros(480, 640, dtype=torch.bool)
        x0, y0, x1, y1 = boxes[j].int().tolist()
        m[y0:y1, x0:x1] = True
        for later in boxes[j + 1 :]:
            a, b, c, d = later.int().tolist()
            m[b:d, a:c] = False
        assert m.sum() >= 0.4 * areas[j]  # grid approximation of the 50% rule
    assert bool((areas[:-1] >= areas[1:] * 0.5).all()) or len(areas) < 2


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), image=st.integers(0, 78), k=st.integers(1, 14),
       rules=st.sampled_from([(0.5, 0.8), (0.9, 0.95), (0.2, 0.5)]))
def test_sos_layout_keeps_every_instance_visible_on_its_grid(val_set, seed, image, k, rules):
    """The SOS rules hold for the final layout on a real image's instances: on the occupancy grid the
    layout checks, every instance (existing or pasted) keeps ``min_visible`` of its cells and the mean
    visibility is at least ``mean_visible``, re-counted here cell by cell."""
    min_visible, mean_visible = rules
    _, target = val_set[image]
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    h, w = masks.shape[-2:]
    step = grid_step(h, w)
    grid = masks[:, ::step, ::step]
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(8, 300, (k, 2), generator=g)
    scene = Scene(h, w, seg, ["person"] * k, target["boxes"].as_subclass(torch.Tensor), grid, step)
    placement = SOSLayout(min_visible=min_visible, mean_visible=mean_visible)(scene, g)
    ys = torch.arange(grid.shape[1]) * step
    xs = torch.arange(grid.shape[2]) * step
    covers = [((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
              for x0, y0, x1, y1 in placement.boxes.int().tolist()]  # a cell is covered if its corner is
    full = [int(m.sum()) for m in [*grid, *covers]]
    cells = list(grid)
    for cover in covers:  # pasted in order; each hides what is under it
        cells = [m & ~cover for m in cells] + [cover]
    fracs = [int(c.sum()) / f for c, f in zip(cells, full) if f > 0]
    assert all(fr >= min_visible for fr in fracs)
    assert not fracs or sum(fracs) / len(fracs) >= mean_visible - 1e-12


def test_dataset_stats_layout_sizes_like_the_category(train_ann):
    layout = DatasetStatsLayout(train_ann)
    person = layout.stats["person"][:, 0]
    scene = _scene(h=400, w=600, k=2000)
    sizes = layout.sizes(scene, torch.Generator().manual_seed(0))
    fracs = sizes.prod(1) / (400 * 600)
    assert abs(fracs.median() - person.median()) / person.median() < 0.15


def test_dataset_stats_layout_places_like_the_category_and_keeps_instances_visible():
    """Two categories, one always in the top fifth of its images, one in the bottom fifth: pasted
    centres follow them (within half a segment's jitter), and the existing instance keeps at least
    min_visible of itself on the occupancy grid."""
    stats = {"sky": [(0.002, x / 10, 0.1) for x in range(1, 10)], "grass": [(0.002, x / 10, 0.9) for x in range(1, 10)]}
    layout = DatasetStatsLayout(stats=stats, min_visible=0.5, flip=0)
    h, w = 300, 400
    existing = torch.zeros(1, h, w, dtype=torch.bool)
    existing[0, :60, :] = True  # the whole top band is taken
    step = grid_step(h, w)
    scene = Scene(h, w, torch.tensor([[10, 10]] * 40), ["sky"] * 20 + ["grass"] * 20,
                  tight_boxes(existing), existing[:, ::step, ::step], step)
    placement = layout(scene, torch.Generator().manual_seed(0))
    centre_y = (placement.boxes[:, 1] + placement.boxes[:, 3]) / 2
    is_sky = placement.segment < 20
    assert ((centre_y[~is_sky] > 0.85 * h) & (centre_y[~is_sky] < 0.95 * h)).all() and (~is_sky).sum() >= 15
    # the sky band is the existing instance's: a few may cover it, never more than half of it
    covered = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in placement.boxes[is_sky].long().tolist():
        covered[y0:y1, x0:x1] = True
    assert (existing[0] & covered).sum() <= 0.5 * existing[0].sum()


def test_existing_boxes_layout_uses_the_pool():
    pool = torch.tensor([[0.1, 0.1, 0.3, 0.5]], dtype=torch.float64)
    placement = ExistingBoxesLayout(pool=pool, flip=0)(_scene(h=100, w=200, k=5), torch.Generator().manual_seed(0))
    b = placement.boxes
    assert ((b[:, 0] >= 19) & (b[:, 2] <= 61) & (b[:, 1] >= 9) & (b[:, 3] <= 51)).all()


def test_random_layout_keeps_boxes_on_canvas_and_label_map_from_coco(val_ann):
    placement = RandomLayout(scale=(0.5, 4.0))(_scene(h=100, w=120, k=50), torch.Generator().manual_seed(0))
    b = placement.boxes
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= 120).all() and (b[:, 3] <= 100).all()
    mapping = label_map_from_coco(val_ann)
    assert mapping["person"] == 1 and mapping["toothbrush"] == 90


def test_max_upscale_caps_enlargement():
    scene = _scene(k=200)
    placement = SOSLayout(max_upscale=1.5)(scene, torch.Generator().manual_seed(0))
    boxes = placement.boxes
    size = torch.stack([boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], 1)
    native = scene.segment_hw[placement.segment].float()
    assert (size <= native * 1.5 + 1).all()


@pytest.mark.parametrize("layout", [RandomLayout(), SOSLayout(), ExistingBoxesLayout()])
def test_layouts_accept_an_image_with_nothing_to_paste(layout):
    placement = layout(_scene(k=0), torch.Generator().manual_seed(0))
    assert len(placement) == 0 and placement.boxes.shape == (0, 4)


def test_existing_boxes_layout_falls_back_with_every_setting_it_was_given():
    """Without a box pool it places like RandomLayout, keeping its scale jitter and upscale cap."""
    scene = _scene(h=100, w=200, k=6)
    mine = ExistingBoxesLayout(flip=0.0, scale_jitter=(0.5, 0.5), max_upscale=1.0)
    same = RandomLayout(flip=0.0, scale_jitter=(0.5, 0.5), max_upscale=1.0)
    a = mine(scene, torch.Generator().manual_seed(3))
    b = same(scene, torch.Generator().manual_seed(3))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.segment, b.segment)
    sizes = (a.boxes[:, 2:] - a.boxes[:, :2]).flip(1)
    assert (sizes <= scene.segment_hw[a.segment] * 1.0 + 1e-6).all()  # the cap held
