"""Layout priors: where, how large, flipped or rotated each pasted segment lands.

A layout only draws parameters (from a CPU ``torch.Generator``, so a run replays exactly and the
same seed gives the same layout on CPU and GPU); :mod:`sos_aug.composite` applies them.
Every layout works on one image at a time, vectorised over its segments and candidate positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .coco import load_coco
from .names import normalize_name


@dataclass
class Placement:
    """Where each pasted segment of one image goes, in paste order.

    ``boxes`` (K, 4) are integer XYXY extents of the resized, unrotated segment; ``segment`` (K,)
    indexes the image's fetched segments; ``flip`` (K,) and ``angle`` (K,, degrees) transform it.
    """

    boxes: torch.Tensor
    segment: torch.Tensor
    flip: torch.Tensor
    angle: torch.Tensor

    def __len__(self) -> int:
        return len(self.segment)


@dataclass
class Scene:
    """What a layout may look at: canvas size, segments to place and the instances already there."""

    height: int
    width: int
    segment_hw: torch.Tensor  # (k, 2) native segment sizes
    categories: list[str]  # segment category names
    existing_boxes: torch.Tensor  # (n, 4) XYXY, CPU
    existing_grid: torch.Tensor | None = None  # (n, gh, gw) bool occupancy at grid resolution
    grid_step: int = 1
    other_boxes: torch.Tensor | None = None  # (m, 4) boxes from other images, normalised to [0, 1]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class Layout:
    """Base: draws sizes (subclass), applies scale jitter, fits the canvas, draws positions,
    flips and rotations. Subclasses override :meth:`sizes` and optionally :meth:`positions`."""

    def __init__(self, flip: float = 0.5, rotation: float = 0.0, scale_jitter: tuple[float, float] = (1.0, 1.0),
                 max_upscale: float | None = None):
        if not 0 <= flip <= 1:
            raise ValueError(f"flip is a probability, got {flip}")
        self.flip, self.rotation, self.scale_jitter = flip, rotation, scale_jitter
        self.max_upscale = max_upscale

    def __call__(self, scene: Scene, generator: torch.Generator | None = None) -> Placement:
        k = len(scene.segment_hw)
        if k == 0:
            return Placement(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                             torch.zeros(0))
        sizes = self.fitted(self.sizes(scene, generator), scene, generator)
        tops, order = self.positions(scene, sizes, generator)
        return self.placement(tops, sizes, order, generator)

    def fitted(self, sizes: torch.Tensor, scene: Scene, g: torch.Generator | None) -> torch.Tensor:
        """Sizes after scale jitter, the upscale cap and fitting the canvas (whole pixels)."""
        sizes = sizes * _uniform(len(sizes), *self.scale_jitter, g)[:, None]
        if self.max_upscale is not None:  # a small crop blown up far past its resolution looks blurred
            sizes = torch.minimum(sizes, scene.segment_hw.double() * self.max_upscale)
        return _fit_canvas(sizes, scene.height, scene.width)

    def placement(self, tops: torch.Tensor, sizes: torch.Tensor, order: torch.Tensor,
                  g: torch.Generator | None) -> Placement:
        """Corners and sizes in paste order, with a flip and an angle drawn per segment."""
        k = len(sizes)
        flip = torch.rand(k, generator=g) < self.flip
        angle = _uniform(k, -self.rotation, self.rotation, g).float()
        boxes = torch.cat([tops.flip(1), tops.flip(1) + sizes.flip(1)], 1)[order]
        return Placement(boxes.float(), order, flip[order], angle[order])

    def sizes(self, scene: Scene, g: torch.Generator | None) -> torch.Tensor:
        """(k, 2) integer heights and widths before jitter."""
        return scene.segment_hw.double()

    def positions(self, scene: Scene, sizes: torch.Tensor, g) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left corners (k, 2) as (y, x), and the paste order (accepted segments only)."""
        k = len(sizes)
        room = torch.tensor([scene.height, scene.width], dtype=torch.float64) - sizes + 1
        tops = (torch.rand(k, 2, generator=g, dtype=torch.float64) * room).floor()
        return tops, torch.arange(k)


def _fit_canvas(sizes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Shrink (keeping aspect) whatever does not fit the canvas; round to at least one pixel."""
    scale = torch.minimum(h / sizes[:, 0], w / sizes[:, 1]).clamp(max=1.0)
    return (sizes * scale[:, None]).round().clamp(min=1)


class RandomLayout(Layout):
    """Random position; the segment's own size times a random scale in ``scale`` (aspect kept)."""

    def __init__(self, scale: tuple[float, float] = (0.5, 1.5), **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def sizes(self, scene: Scene, g) -> torch.Tensor:
        return scene.segment_hw.double() * _uniform(len(scene.segment_hw), *self.scale, g)[:, None]


class SOSLayout(Layout):
    """The SOS prior: sizes from a small/medium/large mix, placed large first, and a placement is
    accepted only while every instance keeps ``min_visible`` of itself and the mean visibility stays
    at least ``mean_visible`` (checked on a coarse occupancy grid, all candidates at once).

    Size classes are areas at 640x480 scale, rescaled to the canvas: small up to 32², medium up to
    96², large up to half the image. ``max_upscale`` (default 3) caps how far a segment is enlarged
    beyond its own resolution; ``None`` keeps the mix exact.
    """

    REFERENCE_AREA = 640 * 480

    def __init__(
        self,
        mix: tuple[float, float, float] = (0.40, 0.35, 0.25),
        min_visible: float = 0.5,
        mean_visible: float = 0.8,
        candidates: int = 32,
        smallest: float = 12.0,
        max_upscale: float | None = 3.0,
        **kwargs,
    ):
        super().__init__(max_upscale=max_upscale, **kwargs)
        if abs(sum(mix) - 1) > 1e-6:
            raise ValueError(f"size mix must sum to 1, got {mix}")
        self.mix = torch.tensor(mix, dtype=torch.float64)
        self.min_visible, self.mean_visible, self.candidates = min_visible, mean_visible, candidates
        self.bounds = torch.tensor([smallest**2, 32.0**2, 96.0**2, self.REFERENCE_AREA / 2], dtype=torch.float64)

    def sizes(self, scene: Scene, g) -> torch.Tensor:
        k = len(scene.segment_hw)
        cls = torch.multinomial(self.mix, k, replacement=True, generator=g)
        lo, hi = self.bounds[cls].log(), self.bounds[cls + 1].log()
        area = (lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)).exp()
        area = area * (scene.height * scene.width / self.REFERENCE_AREA)
        return _size_from_area(area, scene.segment_hw)

    def positions(self, scene: Scene, sizes: torch.Tensor, g) -> tuple[torch.Tensor, torch.Tensor]:
        room = torch.tensor([scene.height, scene.width], dtype=torch.float64) - sizes + 1
        cand = (torch.rand(len(sizes), self.candidates, 2, generator=g, dtype=torch.float64) * room[:, None]).floor()
        return keep_visible(scene, sizes, cand, self.min_visible, self.mean_visible)


def keep_visible(scene: Scene, sizes: torch.Tensor, cand: torch.Tensor, min_visible: float,
                 mean_visible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SOS's acceptance: segments are placed large first, each at its first candidate top-left
    corner (``cand``, (k, r, 2) as (y, x)) that leaves every instance (existing and placed) at least
    ``min_visible`` of itself and their mean at least ``mean_visible``, checked on the scene's coarse
    occupancy grid for all candidates at once; a segment with no such candidate is not pasted.
    Returns the corners (k, 2) and the accepted segments in paste order."""
    k = len(sizes)
    step = scene.grid_step
    grid = scene.existing_grid if scene.existing_grid is not None else torch.zeros(0, 1, 1, dtype=torch.bool)
    visible = grid.float()  # (n, gh, gw) 0/1: the cells each instance still shows
    full = visible.flatten(1).sum(1).double()  # (n,) its cells before any pasting
    shown = full.clone()  # (n,) its cells still visible
    ys = torch.arange(grid.shape[1], dtype=torch.float64) * step
    xs = torch.arange(grid.shape[2], dtype=torch.float64) * step
    tops = torch.zeros(k, 2, dtype=torch.float64)
    accepted = []
    for j in torch.argsort(sizes.prod(1), descending=True, stable=True).tolist():  # large first
        c = cand[j]
        rows = ((ys[None] >= c[:, :1]) & (ys[None] < c[:, :1] + sizes[j, 0])).float()  # (r, gh)
        cols = ((xs[None] >= c[:, 1:]) & (xs[None] < c[:, 1:] + sizes[j, 1])).float()  # (r, gw)
        # cells of each instance each candidate would cover: rows^T . visible . cols, one matmul
        # (exact: sums of 0/1 below 2^24) instead of a (r, n, gh, gw) boolean reduction
        hidden = (torch.matmul(rows, visible) * cols).sum(-1).T.double()  # (r, n)
        after = shown - hidden
        counted = full > 0
        frac = torch.where(counted, after / full.clamp(min=1), torch.ones_like(after))
        n_counted = counted.sum()
        ok = (frac >= min_visible).all(1)
        ok &= (frac[:, counted].sum(1) + 1) / (n_counted + 1) >= mean_visible
        if not ok.any():
            continue  # bounded retries used up: this segment is not pasted
        pick = int(ok.to(torch.uint8).argmax())
        tops[j] = c[pick]
        cover = rows[pick, :, None] * cols[pick, None, :]
        cells = cover.sum().double()[None]
        visible = torch.cat([visible * (1 - cover), cover[None]])
        shown = torch.cat([after[pick], cells])
        full = torch.cat([full, cells])
        accepted.append(j)
    return tops, torch.tensor(accepted, dtype=torch.long)


def _size_from_area(area: torch.Tensor, segment_hw: torch.Tensor) -> torch.Tensor:
    """Heights and widths of the given areas, keeping each segment's aspect ratio."""
    aspect = segment_hw[:, 1].double() / segment_hw[:, 0].double()
    h = (area / aspect).sqrt()
    return torch.stack([h, h * aspect], 1)


class DatasetStatsLayout(Layout):
    """Segments sized and placed as the dataset's own instances are: each segment takes a random
    real instance of its category (from a COCO/LVIS annotation file: your training set) and gets
    its area relative to the image (X-Paste's prior; the segment's aspect is kept) and, with
    ``positions="dataset"`` (default), a place near where such instances are: candidate centres
    are other real instances' of the category, jittered by up to half the segment's size. Placement
    is SOS's: large first, accepted only while every instance keeps ``min_visible`` of itself and
    their mean stays at ``mean_visible`` (:func:`keep_visible`). ``positions="uniform"``: candidates
    anywhere. A category the file lacks draws from all its instances.

    ``stats``: instead of a file, per category name an (N, 3) list of (area fraction, centre x,
    centre y), centres as fractions of the image (:func:`instance_stats_from_coco`)."""

    def __init__(self, ann_file: str | Path | None = None, stats: dict[str, list] | None = None,
                 positions: str = "dataset", min_visible: float = 0.5, mean_visible: float = 0.8,
                 candidates: int = 32, **kwargs):
        super().__init__(**kwargs)
        if positions not in ("dataset", "uniform"):
            raise ValueError(f"positions must be 'dataset' or 'uniform', got {positions!r}")
        if stats is None:
            if ann_file is None:
                raise ValueError("DatasetStatsLayout needs ann_file or stats")
            stats = instance_stats_from_coco(ann_file)
        self.stats = {normalize_name(k): torch.tensor(v, dtype=torch.float64).reshape(-1, 3)
                      for k, v in stats.items() if len(v)}
        if not self.stats:
            raise ValueError("DatasetStatsLayout: the statistics hold no instance")
        self.pooled = torch.cat(list(self.stats.values()))
        self.where, self.candidates = positions, candidates
        self.min_visible, self.mean_visible = min_visible, mean_visible

    def _rows(self, name: str) -> torch.Tensor:
        return self.stats.get(normalize_name(name), self.pooled)

    def sizes(self, scene: Scene, g) -> torch.Tensor:
        picks = torch.rand(len(scene.segment_hw), generator=g, dtype=torch.float64)
        fracs = []
        for name, u in zip(scene.categories, picks):
            rows = self._rows(name)
            fracs.append(rows[min(int(u * len(rows)), len(rows) - 1), 0])
        area = torch.stack(fracs) * scene.height * scene.width if fracs else torch.zeros(0, dtype=torch.float64)
        return _size_from_area(area, scene.segment_hw)

    def positions(self, scene: Scene, sizes: torch.Tensor, g) -> tuple[torch.Tensor, torch.Tensor]:
        k, r = len(sizes), self.candidates
        hw = torch.tensor([scene.height, scene.width], dtype=torch.float64)
        room = hw - sizes + 1
        if self.where == "uniform":
            cand = (torch.rand(k, r, 2, generator=g, dtype=torch.float64) * room[:, None]).floor()
        else:
            picks = torch.rand(k, r, generator=g, dtype=torch.float64)
            jitter = torch.rand(k, r, 2, generator=g, dtype=torch.float64) - 0.5  # +-half the segment's size
            centres = torch.zeros(k, r, 2, dtype=torch.float64)
            for j, name in enumerate(scene.categories):  # (y, x) of real instances of the category
                rows = self._rows(name)
                centres[j] = rows[(picks[j] * len(rows)).long().clamp(max=len(rows) - 1)][:, [2, 1]]
            cand = centres * hw + jitter * sizes[:, None] - sizes[:, None] / 2
            cand = torch.minimum(cand.floor().clamp(min=0), room[:, None] - 1)
        return keep_visible(scene, sizes, cand, self.min_visible, self.mean_visible)


def instance_stats_from_coco(ann_file: str | Path) -> dict[str, list[tuple[float, float, float]]]:
    """Per category name, its non-crowd instances as (area / image area, centre x / width, centre y /
    height), centres of their boxes."""
    data = load_coco(ann_file)
    image_hw = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    stats: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names.values()}
    for a in data["annotations"]:
        if not a.get("iscrowd") and a.get("area", 0) > 0 and a["image_id"] in image_hw:
            h, w = image_hw[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            stats[names[a["category_id"]]].append((a["area"] / (h * w), (x + bw / 2) / w, (y + bh / 2) / h))
    return stats


class ExistingBoxesLayout(Layout):
    """Each segment fills (aspect kept, centred) a box taken from another real annotation: from
    ``pool`` (normalised XYXY boxes in [0, 1]) or, without one, from the
    other images of the batch. Falls back to a random layout where no box is available."""

    def __init__(self, pool: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pool = pool

    def __call__(self, scene: Scene, generator: torch.Generator | None = None) -> Placement:
        pool = self.pool if self.pool is not None else scene.other_boxes
        if pool is None or len(pool) == 0 or len(scene.segment_hw) == 0:
            return RandomLayout(flip=self.flip, rotation=self.rotation, scale_jitter=self.scale_jitter,
                                max_upscale=self.max_upscale)(scene, generator)
        k = len(scene.segment_hw)
        pick = torch.randint(len(pool), (k,), generator=generator)
        box = pool[pick].double() * torch.tensor([scene.width, scene.height] * 2, dtype=torch.float64)
        bh, bw = box[:, 3] - box[:, 1], box[:, 2] - box[:, 0]
        seg = scene.segment_hw.double()
        scale = torch.minimum(bh / seg[:, 0], bw / seg[:, 1])
        sizes = self.fitted((seg * scale[:, None]).clamp(min=1), scene, generator)
        cy, cx = (box[:, 1] + box[:, 3]) / 2, (box[:, 0] + box[:, 2]) / 2
        top = torch.stack([(cy - sizes[:, 0] / 2).round(), (cx - sizes[:, 1] / 2).round()], 1).clamp(min=0)
        top = torch.minimum(top, torch.tensor([scene.height, scene.width], dtype=torch.float64) - sizes)
        return self.placement(top, sizes, torch.arange(k), generator)


LAYOUT_NAMES = ("random", "sos", "stats", "existing")


def make_layout(name: str, ann_file: str | Path | None = None) -> Layout:
    """A layout by the name configs and command lines use, with its defaults: ``random``, ``sos``,
    ``existing``, or ``stats`` (:class:`DatasetStatsLayout`, sized and placed from ``ann_file``)."""
    if name not in LAYOUT_NAMES:
        raise ValueError(f"unknown layout {name!r}; choose from {', '.join(LAYOUT_NAMES)}")
    if name == "stats":
        if ann_file is None:
            raise ValueError("layout 'stats' sizes and places segments as a dataset's instances are: give the "
                             "annotation file (layout_file=..., --coco)")
        return DatasetStatsLayout(ann_file)
    return {"random": RandomLayout, "sos": SOSLayout, "existing": ExistingBoxesLayout}[name]()


def grid_step(height: int, width: int, cells: int = 64) -> int:
    """Pixel step of the coarse occupancy grid layouts check visibility on."""
    return max(1, math.ceil(max(height, width) / cells))
