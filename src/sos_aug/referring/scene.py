"""The attribute model of an image's instances, as a person would see them: which are clearly
visible (may be targets, anchors, counted), which are visible but unclear (too small, cut by the
border, a pasted segment blown up past its source: they match whatever is said of their category,
so they block instead of being ignored), which are too small to notice; and each one's noun, colour
(never for people), area, box and paste order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..names import is_person
from ..ops.color import rgb_to_lab
from ..ops.masks import count_pixels, tight_boxes
from .words import CONFUSABLE, everyday_name

# basic colour terms (Berlin & Kay) and an sRGB prototype of each; a pixel takes the nearest in Lab
COLOURS = {"black": (20, 20, 20), "white": (245, 245, 245), "grey": (128, 128, 128), "red": (200, 30, 30),
           "orange": (240, 140, 30), "yellow": (240, 220, 40), "green": (50, 150, 60), "blue": (40, 80, 200),
           "purple": (130, 50, 160), "pink": (240, 150, 190), "brown": (120, 70, 30)}

VISIBLE, UNCLEAR, IGNORED = "visible", "unclear", "ignored"


@dataclass(frozen=True)
class Visibility:
    """When a person clearly sees an instance (docs/grounding.md shows the defaults on pictures).

    Args:
        min_area: visible pixels, as a share of the image (0.4%: ~35x35 px at COCO's 640x480).
        min_side: the short side of its box, as a share of the image's short side (~29 px at 480).
        noticeable: below this share of the image an instance is too small to notice at all: it is
            never said anything of, but an image with one is never counted in.
        max_upscale: a pasted segment shown larger than this times its source resolution is blurry.
        max_cut: a pasted segment at the image border whose visible box's aspect ratio is this far
            (as a ratio) from its source's is mostly cut off.
        max_dark: an instance under ``dark_below`` of the image with at least this share of its
            pixels black shows no shape or detail to make out (a dark blob, a chair in shadow).
    """

    min_area: float = 0.004
    min_side: float = 0.06
    noticeable: float = 0.0005
    max_upscale: float = 2.0
    max_cut: float = 1.6
    max_dark: float = 0.85
    dark_below: float = 0.05


@dataclass
class Instance:
    """What the resolver knows of one instance; only ``visible`` ones have every attribute measured."""

    index: int
    category: str
    status: str  # VISIBLE, UNCLEAR or IGNORED
    noun: str = ""  # the everyday name, or the segment's short phrase
    crowd: bool = False
    person: bool = False
    colours: dict[str, float] = field(default_factory=dict)  # share of the visible pixels per colour term
    area: int = 0
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # tight box of the visible pixels
    order: int = 0  # paste order: existing instances 0, pasted ones 1, 2, ... (later is in front)

    @property
    def visible(self) -> bool:
        return self.status == VISIBLE

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


@dataclass
class Scene:
    """An image's instances, its size, their visible masks and, for existing instances, their masks
    before pasting (what "in front of" is measured against)."""

    instances: list[Instance]
    height: int
    width: int
    masks: torch.Tensor  # (N, H, W) bool, visible pixels
    originals: list[torch.Tensor | None]

    def members(self, category: str) -> list[Instance]:
        """The instances of a category that a person may notice (not IGNORED)."""
        return [x for x in self.instances if x.category == category and x.status != IGNORED]

    def confusers(self, category: str) -> list[Instance]:
        """Noticeable instances of other categories that a person may take the category's noun to
        mean (:data:`~.words.CONFUSABLE`): they fit whatever is said of it."""
        nouns = {x.noun for x in self.instances if x.category == category}
        others = set().union(*(CONFUSABLE.get(n, frozenset()) for n in nouns)) if nouns else set()
        if not others:
            return []
        return [x for x in self.instances
                if x.status != IGNORED and (x.category in others or everyday_name(x.category) in others)]

    def all_of(self, category: str) -> list[Instance]:
        """Every annotated instance of a category, the unnoticeable included."""
        return [x for x in self.instances if x.category == category]


_PROTOTYPES: dict[torch.device, torch.Tensor] = {}


def _prototypes(device: torch.device) -> torch.Tensor:
    """The colour terms' prototypes in Lab, (11, 3), computed once per device."""
    if device not in _PROTOTYPES:
        rgb = torch.tensor(list(COLOURS.values()), dtype=torch.uint8, device=device).T.contiguous()
        _PROTOTYPES[device] = rgb_to_lab(rgb).T.float()
    return _PROTOTYPES[device]


def lab_colour_terms(pixels: torch.Tensor) -> torch.Tensor:
    """The index into :data:`COLOURS` of each of (3, N) RGB pixels (uint8 or [0, 1]): the basic
    colour term whose prototype is nearest in Lab."""
    lab = rgb_to_lab(pixels.contiguous()).T.float()
    return torch.cdist(lab, _prototypes(pixels.device)).argmin(1)


def colour_shares(image: torch.Tensor, mask: torch.Tensor, max_pixels: int = 1024,
                  box: Sequence[float] | None = None) -> dict[str, float]:
    """The share of the mask's visible pixels (evenly subsampled) each basic colour term takes;
    ``box``, the mask's tight box where known, saves a pass over the whole canvas."""
    image = image.as_subclass(torch.Tensor)
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)
        image, mask = image[:, y0:y1, x0:x1], mask[y0:y1, x0:x1]
    step = max(1, int((mask.shape[-2] * mask.shape[-1] / (4 * max_pixels)) ** 0.5))  # a regular grid first
    image, mask = image[:, ::step, ::step], mask[::step, ::step]
    pixels = image[:, mask]
    if pixels.shape[1] > max_pixels:
        pixels = pixels[:, :: pixels.shape[1] // max_pixels + 1]
    if pixels.shape[1] == 0:
        return {}
    counts = torch.bincount(lab_colour_terms(pixels), minlength=len(COLOURS)).tolist()
    total = sum(counts)
    return {name: c / total for name, c in zip(COLOURS, counts) if c}


def describe(image: torch.Tensor, target: dict, names: Sequence[str], phrases: Sequence[str | None] | None = None,
             sources: Sequence[tuple[int, int] | None] | None = None,
             originals: Sequence[torch.Tensor | None] | None = None, visibility: Visibility = Visibility(),
             everyday: dict[str, str] | None = None) -> Scene:
    """The scene of a pasted (or plain) image. ``names[i]``: instance i's category; ``phrases[i]``: a
    short phrase used as its noun (SOS's text); ``sources[i]``: a pasted segment's source size (H, W);
    ``originals[i]``: an existing instance's mask before pasting; ``everyday``: names people use."""
    image = image.as_subclass(torch.Tensor)
    h, w = image.shape[-2:]
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    n = len(masks)
    crowd = target.get("iscrowd", torch.zeros(n, dtype=torch.long)).bool().tolist()
    pasted = target.get("is_pasted", torch.zeros(n, dtype=torch.bool)).tolist()
    areas = count_pixels(masks).tolist()
    boxes = tight_boxes(masks).tolist()  # the target's boxes may be looser (boxes="keep")
    first_pasted = next((i for i, p in enumerate(pasted) if p), len(pasted))
    out = []
    for i in range(n):
        noun = (phrases[i] if phrases and phrases[i] else everyday_name(names[i], everyday)).strip()
        source = sources[i] if sources is not None else None
        inst = Instance(i, names[i], VISIBLE, noun, crowd=bool(crowd[i]), area=int(areas[i]), box=tuple(boxes[i]),
                        order=(i - first_pasted + 1) if pasted[i] else 0,
                        person=is_person(names[i]) or is_person(noun))
        inst.status = _status(inst, h, w, source, visibility)
        if inst.visible and (not inst.person or inst.area < visibility.dark_below * h * w):
            colours = colour_shares(image, masks[i], box=boxes[i])  # (a large person needs none)
            if _too_dark(inst, colours, h, w, visibility):
                inst.status = UNCLEAR
            elif not inst.person:  # people get no colour term: over a whole person it reads as skin
                inst.colours = colours
        out.append(inst)
    return Scene(out, h, w, masks, list(originals) if originals is not None else [None] * n)


def _too_dark(x: Instance, colours: dict[str, float], h: int, w: int, v: Visibility) -> bool:
    """A small instance that is nearly all black: a person sees a dark patch, not an object."""
    return x.area < v.dark_below * h * w and colours.get("black", 0.0) >= v.max_dark


def _status(x: Instance, h: int, w: int, source: tuple[int, int] | None, v: Visibility) -> str:
    """VISIBLE, UNCLEAR or IGNORED for one instance (see :class:`Visibility`)."""
    if x.area < v.noticeable * h * w:
        return IGNORED
    if x.crowd or x.area < v.min_area * h * w or min(x.width, x.height) < v.min_side * min(h, w):
        return UNCLEAR
    if source is not None and min(source) > 0:
        sh, sw = source
        if max(x.height / sh, x.width / sw) > v.max_upscale:  # at least this much larger than its source
            return UNCLEAR
        at_border = x.box[0] <= 0 or x.box[1] <= 0 or x.box[2] >= w or x.box[3] >= h
        aspect = (x.width / max(x.height, 1.0)) / (sw / sh)
        if at_border and not 1 / v.max_cut <= aspect <= v.max_cut:
            return UNCLEAR
    return VISIBLE
