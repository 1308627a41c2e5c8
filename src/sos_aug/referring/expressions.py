"""Referring expressions for every augmented image, each verified to denote exactly its targets.

The scene is known exactly after pasting, so expressions are written from an attribute model of the
*visible* instances (category or the segment's SOS short phrase, a basic colour term measured in Lab,
size among its category, position, relations, ordinals) and each one is kept only if a resolver over
the same model finds exactly its targets. Crowd regions, ignored instances and instances with too
few visible pixels are never targets, and since their attributes are unknown they count as matching
any expression about their category, so nothing that would need them told apart is emitted.

``CopyPaste(..., referring=Referring())`` adds ``target["referring"]``: a list of records
``{"text", "kind", "targets", "intra_class"}`` (``targets``: row indices into the target's
instances, empty for a no-target expression; ``intra_class``: other instances of the targets'
category are in the image, so only attributes, positions or relations tell them apart, SOS's SFC/SGC
case; ``original`` beside ``text`` where a rewrite hook changed it). Exports:
:mod:`sos_aug.referring.export`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..names import is_person
from ..ops.color import rgb_to_lab
from ..ops.masks import count_pixels, tight_boxes

KINDS = ("attribute", "position", "relation", "ordinal", "multi", "no_target")

# basic colour terms (Berlin & Kay) and an sRGB prototype of each; a pixel takes the nearest in Lab
COLOURS = {"black": (20, 20, 20), "white": (245, 245, 245), "grey": (128, 128, 128), "red": (200, 30, 30),
           "orange": (240, 140, 30), "yellow": (240, 220, 40), "green": (50, 150, 60), "blue": (40, 80, 200),
           "purple": (130, 50, 160), "pink": (240, 150, 190), "brown": (120, 70, 30)}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]
IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
             "knife": "knives", "sheep": "sheep", "skis": "skis", "scissors": "scissors", "glasses": "glasses",
             "shelf": "shelves", "leaf": "leaves", "foot": "feet", "tooth": "teeth", "goose": "geese"}


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun: the last word is inflected."""
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR:
        out = IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        out = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        out = last[:-1] + "ies"
    else:
        out = last + "s"
    return f"{head} {out}" if head else out


@dataclass
class Instance:
    """What the resolver knows of one instance: ``eligible`` ones have every attribute measured."""

    index: int
    category: str
    eligible: bool
    noun: str = ""  # the category name, or the segment's short phrase
    colour: str | None = None  # the dominant basic colour term
    colours: dict[str, float] = field(default_factory=dict)  # share of the visible pixels per term
    area: int = 0
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    order: int = 0  # paste order: existing instances 0, pasted ones 1, 2, ... (later is in front)

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Spec:
    """A referring expression's meaning: which instances it picks out (see :func:`resolve`)."""

    category: str
    colour: str | None = None
    extreme: str | None = None  # "largest" / "smallest" of its category
    hpos: str | None = None  # "left" / "middle" / "right" third of the image
    vpos: str | None = None  # "top" / "bottom" half
    relation: str | None = None  # "left of", "right of", "above", "below", "next to", "in front of"
    anchor: int | None = None  # the instance the relation is to (itself uniquely described by category)
    ordinal: int | None = None  # k-th of its category from the left (0-based)
    every: bool = False  # all the instances it matches (multi-target)


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


COLOUR_SAYS = 0.25  # an instance "is" a colour when that much of it is
COLOUR_ABSENT = 0.05  # and a no-target colour takes less than this of every instance of the category


def describe(image: torch.Tensor, target: dict, names: Sequence[str], phrases: Sequence[str | None] | None = None,
             min_pixels: int = 64) -> list[Instance]:
    """The attribute model of a pasted (or plain) image's instances. ``names[i]`` is instance i's
    category name; ``phrases[i]`` an optional short phrase used as its noun (SOS's text)."""
    image = image.as_subclass(torch.Tensor)
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    boxes = torch.as_tensor(target["boxes"]).as_subclass(torch.Tensor).float().tolist()
    crowd = target.get("iscrowd", torch.zeros(len(masks), dtype=torch.long)).bool().tolist()
    pasted = target.get("is_pasted", torch.zeros(len(masks), dtype=torch.bool)).tolist()
    areas = count_pixels(masks).tolist()
    tight = tight_boxes(masks).tolist()  # the target's boxes may be looser (boxes="keep")
    first_pasted = next((i for i, p in enumerate(pasted) if p), len(pasted))
    out = []
    for i in range(len(masks)):
        eligible = not crowd[i] and areas[i] >= min_pixels
        noun = (phrases[i] if phrases and phrases[i] else names[i]).strip()
        inst = Instance(i, names[i], eligible, noun, area=int(areas[i]), box=tuple(boxes[i]),
                        order=(i - first_pasted + 1) if pasted[i] else 0)
        if eligible and not (is_person(names[i]) or is_person(noun)):  # people get no colour term
            inst.colours = colour_shares(image, masks[i], box=tight[i])
            inst.colour = max(inst.colours, key=inst.colours.get)
        out.append(inst)
    return out


def _hpos(inst: Instance, width: int) -> str:
    return ("left", "middle", "right")[min(2, int(3 * inst.cx / width))]


def _vpos(inst: Instance, height: int) -> str:
    return "top" if inst.cy < height / 2 else "bottom"


def _related(a: Instance, b: Instance, relation: str) -> bool:
    """Whether ``a`` stands in ``relation`` to ``b`` (boxes wholly apart, or pasted over it)."""
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    if relation == "left of":
        return ax2 <= bx1
    if relation == "right of":
        return ax1 >= bx2
    if relation == "above":
        return ay2 <= by1
    if relation == "below":
        return ay1 >= by2
    overlap = min(ax2, bx2) > max(ax1, bx1) and min(ay2, by2) > max(ay1, by1)
    if relation == "next to":  # side by side: rows overlap, a gap under a quarter of their mean width
        gap = max(bx1 - ax2, ax1 - bx2)
        return min(ay2, by2) > max(ay1, by1) and 0 <= gap < 0.25 * ((ax2 - ax1) + (bx2 - bx1)) / 2
    return relation == "in front of" and overlap and a.order > b.order


def resolve(spec: Spec, instances: Sequence[Instance], height: int, width: int) -> set[int]:
    """Every instance the expression could denote. An ineligible instance of the category (crowd,
    barely visible) is taken to match whatever is said of it: its attributes are unknown."""
    members = [x for x in instances if x.category == spec.category]
    if any(not x.eligible for x in members):
        unknown = {x.index for x in members if not x.eligible}
        known = [x for x in members if x.eligible]
    else:
        unknown, known = set(), members
    if spec.colour is not None:  # conservative: any instance that much of this colour matches
        known = [x for x in known if x.colours.get(spec.colour, 0.0) >= COLOUR_SAYS]
    if spec.hpos is not None:
        known = [x for x in known if _hpos(x, width) == spec.hpos]
    if spec.vpos is not None:
        known = [x for x in known if _vpos(x, height) == spec.vpos]
    if spec.relation is not None:
        anchor = next(x for x in instances if x.index == spec.anchor)
        known = [x for x in known if x.index != anchor.index and _related(x, anchor, spec.relation)]
    if spec.extreme is not None and known:
        if unknown:  # the largest could be one we cannot measure
            return {x.index for x in known} | unknown
        pick = max if spec.extreme == "largest" else min
        best = pick(x.area for x in known)
        known = [x for x in known if x.area == best]
    if spec.ordinal is not None:
        if unknown:
            return {x.index for x in known} | unknown
        ranked = sorted(known, key=lambda x: (x.cx, x.index))
        known = [ranked[spec.ordinal]] if spec.ordinal < len(ranked) else []
    return {x.index for x in known} | unknown


@dataclass
class Referring:
    """Write verified referring expressions for one image (see the module docstring).

    Args:
        per_kind: how many expressions of each kind to keep at most per image (kinds in :data:`KINDS`).
        limit: how many expressions per image at most, all kinds together (None: no limit).
        vocabulary: category names a no-target expression may mention (default: those in the image).
        min_pixels: instances with fewer visible pixels are never targets.
        rewrite: ``text -> text`` (a local LLM, say); the target set travels unchanged and the
            template text is kept as ``original``.
    """

    per_kind: dict[str, int] = field(default_factory=lambda: {k: 2 for k in KINDS})
    limit: int | None = None
    vocabulary: Sequence[str] = ()
    min_pixels: int = 64
    rewrite: Callable[[str], str] | None = None

    def __call__(self, image: torch.Tensor, target: dict, names: Sequence[str],
                 phrases: Sequence[str | None] | None = None,
                 generator: torch.Generator | None = None) -> list[dict[str, Any]]:
        h, w = image.shape[-2:]
        instances = describe(image, target, names, phrases, self.min_pixels)
        candidates = self.candidates(instances, h, w, generator)
        records, seen = [], set()
        for kind, text, spec, targets in candidates:
            if self.limit is not None and len(records) >= self.limit:
                break
            if text in seen or self.per_kind.get(kind, 0) <= sum(r["kind"] == kind for r in records):
                continue
            if resolve(spec, instances, h, w) != set(targets):  # the verification: exactly its targets
                continue
            seen.add(text)
            same_class = sum(x.category == spec.category for x in instances)
            record = {"text": text, "kind": kind, "targets": sorted(targets),
                      "intra_class": bool(targets) and same_class > len(targets)}
            if self.rewrite is not None:
                record = {**record, "original": text, "text": self.rewrite(text)}
            records.append(record)
        return records

    def candidates(self, instances: list[Instance], h: int, w: int,
                   g: torch.Generator | None) -> list[tuple[str, str, Spec, list[int]]]:
        """(kind, text, meaning, intended targets) in a seeded random order, to be verified."""
        out: list[tuple[str, str, Spec, list[int]]] = []
        eligible = [x for x in instances if x.eligible]
        by_cat: dict[str, list[Instance]] = {}
        for x in instances:
            by_cat.setdefault(x.category, []).append(x)
        anchors = [a for a in instances if a.eligible and len(by_cat[a.category]) == 1]  # told by category alone
        rng = random.Random(int(torch.randint(2**62, (1,), generator=g)))  # one draw from the caller's generator

        def say(options: list[str]) -> str:
            return options[rng.randrange(len(options))]

        for x in eligible:
            c, n = x.category, x.noun
            many = len(by_cat[c]) > 1
            if not many:
                out.append(("attribute", f"the {n}", Spec(c), [x.index]))
            if x.colour is not None:
                out.append(("attribute", say([f"the {x.colour} {n}", f"the {n} that is {x.colour}"]),
                            Spec(c, colour=x.colour), [x.index]))
            if many:
                for extreme in ("largest", "smallest"):
                    out.append(("attribute", say([f"the {extreme} {n}", f"the {n} that is the {extreme}"]),
                                Spec(c, extreme=extreme), [x.index]))
                k = sorted(by_cat[c], key=lambda y: (y.cx, y.index)).index(x)
                if k < len(ORDINALS):
                    out.append(("ordinal", say([f"the {ORDINALS[k]} {n} from the left",
                                                f"the {ORDINALS[k]} {n} counting from the left"]),
                                Spec(c, ordinal=k), [x.index]))
            hp, vp = _hpos(x, w), _vpos(x, h)
            where = "in the middle" if hp == "middle" else f"on the {hp}"
            out.append(("position", say([f"the {n} {where}", f"the {n} {where} of the image"]),
                        Spec(c, hpos=hp), [x.index]))
            out.append(("position", say([f"the {n} at the {vp}", f"the {n} near the {vp}"]),
                        Spec(c, vpos=vp), [x.index]))
            for anchor in anchors:
                if anchor.index == x.index:
                    continue
                for rel in ("left of", "right of", "above", "below", "next to", "in front of"):
                    if _related(x, anchor, rel):
                        words = {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)
                        out.append(("relation", say([f"the {n} {words} the {anchor.noun}",
                                                     f"the {n} that is {words} the {anchor.noun}"]),
                                    Spec(c, relation=rel, anchor=anchor.index), [x.index]))
        for c, members in by_cat.items():
            group = [x for x in members if x.eligible]
            if len(group) >= 2 and len(group) == len(members):
                noun = plural(group[0].category)
                out.append(("multi", say([f"all the {noun}", f"every {group[0].category}", f"the {noun}"]),
                            Spec(c, every=True), [x.index for x in group]))
                for hp in ("left", "right"):
                    side = [x for x in group if _hpos(x, w) == hp]
                    if 2 <= len(side) < len(NUMBERS):
                        out.append(("multi", f"the {NUMBERS[len(side)]} {noun} on the {hp}",
                                    Spec(c, hpos=hp, every=True), [x.index for x in side]))
        absent = [c for c in self.vocabulary if c not in by_cat]
        for c in absent:
            out.append(("no_target", say([f"the {c}", f"the {plural(c)}"]), Spec(c), []))
        for x in eligible:  # a present category in a colour none of it shows (never people)
            if x.colour is None:
                continue
            free = [col for col in COLOURS
                    if all(y.colours.get(col, 0.0) < COLOUR_ABSENT for y in by_cat[x.category])]
            if free and all(y.eligible for y in by_cat[x.category]):
                col = say(free)
                out.append(("no_target", f"the {col} {x.noun}", Spec(x.category, colour=col), []))
        rng.shuffle(out)
        return out
