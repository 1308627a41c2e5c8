"""Referring expressions for every augmented image, each verified to denote exactly its targets as
a person would read it.

The scene is known exactly after pasting, so expressions are written from a model of what a person
sees (:mod:`.scene`: clearly visible instances, their everyday nouns, colour terms, sizes, positions,
relations), and each is kept only if its targets all *surely* fit its words and nothing else even
*maybe* does (:mod:`.predicates`, with margins), so no borderline case decides what it denotes.
Instances a person could confuse with a target but not tell apart (too small, cut off, a crowd
region) match whatever is said of their category and so block; instances too small to notice are
never mentioned, but keep their category from being counted. Words that count (ordinals, "both",
"all the", "the three") are used only where the annotation is likely complete: a small count, no
crowd region, nothing hidden in the noise, and never for things that come in heaps.

``CopyPaste(..., referring=Referring())`` adds ``target["referring"]``: a list of records
``{"text", "kind", "targets", "intra_class"}`` (``targets``: row indices into the target's
instances, empty for a no-target expression; ``intra_class``: other instances of the targets'
category are in the image, so only attributes, positions or relations tell them apart, SOS's SFC/SGC
case; ``anchor``: the row a relation is to; ``original`` beside ``text`` where a rewrite hook
changed it). Exports:
:mod:`sos_aug.referring.export`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import predicates as P
from .scene import COLOURS, VISIBLE, Instance, Scene, Visibility, describe
from .words import HEAPS, NUMBERS, ORDINALS, countable, everyday_name, plural

KINDS = ("attribute", "position", "relation", "ordinal", "multi", "no_target")
MAX_COUNT = 5  # categories with more instances than this are never counted in words
RANK_SIZES = 6.0  # ranked instances are within this area ratio (similar depths: "the third from the left")
ANCHOR_AREA = 2.0  # relation anchors have this many times the visibility minimum
ORDINAL_GAP = 0.04  # neighbours in a count from one side are this far apart (share of the width)


@dataclass(frozen=True)
class Spec:
    """A referring expression's meaning: which instances it picks out (see :func:`resolve`)."""

    category: str
    colour: str | None = None
    extreme: str | None = None  # "largest" / "smallest" of its category
    hpos: str | None = None  # "left" / "middle" / "right" third of the image
    vpos: str | None = None  # "top" / "bottom" half
    relation: str | None = None  # one of predicates.RELATIONS
    anchor: int | None = None  # the instance the relation is to
    ordinal: int | None = None  # k-th of its category counted from ``side`` (0-based)
    side: str = "left"
    every: bool = False  # all the instances it matches (multi-target)


def resolve(spec: Spec, scene: Scene) -> set[int]:
    """Every instance the expression *could* denote: each that maybe fits all of its words. An
    unclear instance of the category (crowd, small, cut off) fits whatever is said of it."""
    members = scene.members(spec.category)
    confused = {x.index for x in scene.confusers(spec.category)}
    if spec.ordinal is not None:
        ranked = _ordinal_candidates(spec, scene) if counted(spec.category, scene) else {x.index for x in members}
        return ranked | confused
    return confused | {x.index for x in members if x.status != VISIBLE or fits(spec, x, scene)[1]}


def fits(spec: Spec, x: Instance, scene: Scene) -> P.Truth:
    """(sure, maybe): whether ``x`` fits every word of ``spec`` (an ordinal's rank aside)."""
    sure, maybe = True, True
    checks = []
    if spec.colour is not None:
        checks.append(P.colour(x, spec.colour))
    if spec.hpos is not None:
        checks.append(P.hpos(x, spec.hpos, scene.width))
    if spec.vpos is not None:
        checks.append(P.vpos(x, spec.vpos, scene.height))
    if spec.extreme is not None:
        checks.append(P.extreme(x, spec.extreme, scene.members(spec.category)))
    if spec.relation is not None:
        anchor = scene.instances[spec.anchor]
        checks.append((False, False) if anchor.index == x.index else P.related(x, anchor, spec.relation, scene))
    for s, m in checks:
        sure, maybe = sure and s, maybe and m
    return sure, maybe


def counted(category: str, scene: Scene, heaps: frozenset[str] = HEAPS) -> bool:
    """Whether a category's instances may be counted in words: a small number of them, every
    annotated one clearly visible (none hidden as a speck, cut off or a crowd region), and not a
    thing that comes in heaps or a plural-only noun."""
    every = scene.all_of(category)
    return (0 < len(every) <= MAX_COUNT and all(x.status == VISIBLE for x in every)
            and countable(every[0].noun, category, heaps) and not scene.confusers(category))


def _comparable(members: list[Instance]) -> bool:
    """Whether instances are of similar apparent size (so at similar depths), as a count from one side
    needs: a person counts the row of things, not the near one and the far ones together."""
    areas = [x.area for x in members]
    return max(areas) <= RANK_SIZES * min(areas)


def _ranked(spec: Spec, scene: Scene) -> list[Instance]:
    members = sorted(scene.members(spec.category), key=lambda x: (x.cx, x.index))
    return members if spec.side == "left" else members[::-1]


def _ordinal_candidates(spec: Spec, scene: Scene) -> set[int]:
    """The instances that could be k-th from the side: the k-th, and a neighbour whose centre is
    too close to tell which comes first."""
    ranked = _ranked(spec, scene)
    k = spec.ordinal
    if k >= len(ranked):
        return set()
    near = ORDINAL_GAP * scene.width
    return {y.index for y in ranked if abs(y.cx - ranked[k].cx) < near}


def verified(spec: Spec, targets: Sequence[int], scene: Scene) -> bool:
    """The verification: every target surely fits, and exactly the targets maybe do."""
    if resolve(spec, scene) != set(targets):
        return False
    if spec.ordinal is not None:
        return True  # the rank is the claim, and resolve has checked it with margins
    return all(fits(spec, scene.instances[t], scene)[0] for t in targets)


@dataclass
class Referring:
    """Write verified referring expressions for one image (see the module docstring).

    Args:
        per_kind: how many expressions of each kind to keep at most per image (kinds in :data:`KINDS`).
        limit: how many expressions per image at most, all kinds together (None: no limit).
        vocabulary: category names a no-target expression may mention (default: those in the image).
        visibility: when an instance is clearly visible (:class:`~.scene.Visibility`).
        names: everyday names for dataset categories, read before :data:`~.words.EVERYDAY`.
        heaps: categories never counted in words (default :data:`~.words.HEAPS`).
        rewrite: ``text -> text`` (a local LLM, say); the target set travels unchanged and the
            template text is kept as ``original``.
    """

    per_kind: dict[str, int] = field(default_factory=lambda: {k: 2 for k in KINDS})
    limit: int | None = None
    vocabulary: Sequence[str] = ()
    visibility: Visibility = field(default_factory=Visibility)
    names: dict[str, str] = field(default_factory=dict)
    heaps: frozenset[str] = HEAPS
    rewrite: Callable[[str], str] | None = None

    def __call__(self, image: torch.Tensor, target: dict, names: Sequence[str],
                 phrases: Sequence[str | None] | None = None, generator: torch.Generator | None = None,
                 sources: Sequence[tuple[int, int] | None] | None = None,
                 originals: Sequence[torch.Tensor | None] | None = None) -> list[dict[str, Any]]:
        """Records for one image. ``names``: each instance's category; ``phrases``: short phrases
        for pasted segments; ``sources``: a pasted segment's source size (H, W); ``originals``: an
        existing instance's mask before pasting (both from CopyPaste)."""
        scene = describe(image, target, names, phrases, sources, originals, self.visibility, self.names)
        records, seen = [], set()
        for kind, text, spec, targets in self.candidates(scene, generator):
            if self.limit is not None and len(records) >= self.limit:
                break
            if text in seen or self.per_kind.get(kind, 0) <= sum(r["kind"] == kind for r in records):
                continue
            if not verified(spec, targets, scene):
                continue
            seen.add(text)
            same_class = len(scene.members(spec.category))
            record = {"text": text, "kind": kind, "targets": sorted(targets),
                      "intra_class": bool(targets) and same_class > len(targets)}
            if spec.anchor is not None:
                record["anchor"] = spec.anchor
            if self.rewrite is not None:
                record = {**record, "original": text, "text": self.rewrite(text)}
            records.append(record)
        return records

    def candidates(self, scene: Scene, g: torch.Generator | None) -> list[tuple[str, str, Spec, list[int]]]:
        """(kind, text, meaning, intended targets) in a seeded random order (no-target expressions
        that name a present category before those that name an absent one), to be verified."""
        rng = random.Random(int(torch.randint(2**62, (1,), generator=g)))  # one draw from the caller's generator
        anchors = self._anchors(scene)
        out = [c for x in scene.instances if x.visible for c in self._about(x, scene, anchors)]
        out += self._groups(scene, rng)
        hard = self._near_misses(scene, anchors, rng)
        absent = [("no_target", f"the {noun}", Spec(c), []) for c, noun in self._absent(scene)]
        rng.shuffle(out)
        rng.shuffle(hard)
        rng.shuffle(absent)
        return out + hard + absent[:1]

    def _about(self, x: Instance, scene: Scene, anchors: list[tuple[Instance, str]]) -> list:
        """Candidates that single out ``x``: its category alone where that is unique, else the
        qualifiers that set it apart (colour, size, position, a relation, a rank)."""
        c, n = x.category, x.noun
        members = scene.members(c)
        if len(members) == 1:
            return [("attribute", f"the {n}", Spec(c), [x.index])]
        out = []
        for term in COLOURS:
            if not x.person and P.colour(x, term)[0]:
                out.append(("attribute", f"the {term} {n}", Spec(c, colour=term), [x.index]))
        for which, words in (("largest", ("bigger", "biggest")), ("smallest", ("smaller", "smallest"))):
            out.append(("attribute", f"the {words[len(members) > 2]} {n}", Spec(c, extreme=which), [x.index]))
        for side in P.HPOS if len(members) > 2 else ("left", "right"):  # "the middle one" of two is odd
            where = "in the middle" if side == "middle" else f"on the {side}"
            out.append(("position", f"the {n} {where}", Spec(c, hpos=side), [x.index]))
        for side in P.VPOS:
            out.append(("position", f"the {n} at the {side}", Spec(c, vpos=side), [x.index]))
        for anchor, phrase in anchors:
            if anchor.index == x.index or anchor.category == c:
                continue
            for rel in P.RELATIONS:
                if P.related(x, anchor, rel, scene)[0]:
                    out.append(("relation", f"the {n} {_RELATION_WORDS[rel]} {phrase}",
                                Spec(c, relation=rel, anchor=anchor.index), [x.index]))
        if counted(c, scene, self.heaps) and _comparable(members):
            for side in ("left", "right"):
                k = _ranked(Spec(c, side=side), scene).index(x)
                if k == 0:  # of two, "the left one"
                    text = f"the {side} {n}" if len(members) == 2 else f"the {side}most {n}"
                elif k < 3 and len(members) > k + 1:  # "the second from the left" of two is the right one
                    text = f"the {ORDINALS[k]} {n} from the {side}"
                else:
                    continue
                out.append(("ordinal", text, Spec(c, ordinal=k, side=side), [x.index]))
        return out

    def _anchors(self, scene: Scene) -> list[tuple[Instance, str]]:
        """Instances a relation may be to, each with a phrase that names it alone (its category, or
        its colour where the category is not unique), verified as any expression is; anchors are
        clearly large (ANCHOR_AREA times the visibility minimum), since a person looks for them first."""
        found = []
        for a in scene.instances:
            if not a.visible or a.area < ANCHOR_AREA * self.visibility.min_area * scene.height * scene.width:
                continue
            count = len(scene.members(a.category))
            options = [(f"the {a.noun}", Spec(a.category))] if count == 1 else []
            options += [(f"the {t} {a.noun}", Spec(a.category, colour=t)) for t in COLOURS
                        if count > 1 and not a.person and P.colour(a, t)[0]]
            phrase = next((text for text, spec in options if verified(spec, [a.index], scene)), None)
            if phrase is not None:
                found.append((a, phrase))
        return found

    def _groups(self, scene: Scene, rng: random.Random) -> list:
        """Multi-target candidates: all of a counted category, or those of it on one side."""
        out = []
        for c in dict.fromkeys(x.category for x in scene.instances):
            members = scene.members(c)
            if len(members) < 2 or not counted(c, scene, self.heaps):
                continue
            noun, every = plural(members[0].noun), [x.index for x in members]
            whole = f"both {noun}" if len(members) == 2 else f"the {NUMBERS[len(members)]} {noun}"
            out.append(("multi", rng.choice([whole, f"all the {noun}"]) if len(members) > 2 else whole,
                        Spec(c, every=True), every))
            for side in ("left", "right"):
                group = [x.index for x in members if P.hpos(x, side, scene.width)[0]]
                if 2 <= len(group) < len(members):
                    out.append(("multi", f"the {NUMBERS[len(group)]} {noun} on the {side}",
                                Spec(c, hpos=side, every=True), group))
        return out

    def _near_misses(self, scene: Scene, anchors: list[tuple[Instance, str]], rng: random.Random) -> list:
        """No-target candidates that name a present category with a colour or a relation none of it
        has, by a clear margin (gRefCOCO's hard negatives). Colours only chromatic ones: in dim light
        a white sink measures grey, and a person still calls it white. Not positions: people read "the X on the
        right" relative to the other Xs (the right one of two), and of a lone X as that X."""
        out = []
        for c in dict.fromkeys(x.category for x in scene.instances if x.visible):
            members = scene.members(c)
            if any(not x.visible for x in members):
                continue  # something of it is unclear: any claim about the category could be true
            n = members[0].noun
            if not any(x.person for x in members):
                free = [t for t in P.CHROMATIC if all(x.colours.get(t, 0.0) < P.COLOUR_NONE for x in members)]
                if free:
                    t = rng.choice(free)
                    out.append(("no_target", f"the {t} {n}", Spec(c, colour=t), []))
            for anchor, phrase in anchors:
                if anchor.category == c:
                    continue
                rel = rng.choice(("left of", "right of"))  # people read "below" loosely: no denials of it
                if not any(P.related(x, anchor, rel, scene)[1] for x in members):
                    out.append(("no_target", f"the {n} {_RELATION_WORDS[rel]} {phrase}",
                                Spec(c, relation=rel, anchor=anchor.index), []))
        return out

    def _absent(self, scene: Scene) -> list[tuple[str, str]]:
        """(category, noun) of vocabulary categories with no instance in the image."""
        present = {x.category for x in scene.instances}
        return [(c, everyday_name(c, self.names)) for c in self.vocabulary if c not in present]


_RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below",
                   "next to": "next to", "on": "on", "in front of": "in front of"}
