"""What an expression's words say of one instance, with margins: each predicate answers ``(sure,
maybe)``. *sure*: a person would agree at once; *maybe*: a person could agree (a borderline case,
a colour cast, an overlap that might be depth). An expression is emitted only when its targets are
all *sure* and nothing else is even *maybe* (:func:`~.expressions.resolve`), so no borderline case
decides what it denotes."""

from __future__ import annotations

import torch

from .scene import Instance, Scene

Truth = tuple[bool, bool]  # (sure, maybe); sure implies maybe

COLOUR_SURE = 0.35  # an instance is "red" when this much of it is
COLOUR_MAYBE = 0.12  # and might be called red from this much
COLOUR_NONE = 0.04  # a no-target colour takes less than this of every instance of its category
CHROMATIC = ("red", "orange", "yellow", "green", "blue", "purple", "pink")  # no-target colours (not light-bound)

POSITION_MARGIN = 0.05  # of the image width (thirds) or height (halves), either side of a boundary
SIZE_RATIO = 1.6  # "the bigger": at least this many times the area (visible and box) of every other
REACH = 0.25  # an instance whose box has this share of its extent in a part of the image may be said to be there
HPOS = ("left", "middle", "right")
VPOS = ("top", "bottom")
RELATIONS = ("left of", "right of", "above", "below", "next to", "on", "in front of")


def colour(x: Instance, term: str) -> Truth:
    share = x.colours.get(term, 0.0)
    return share >= COLOUR_SURE, share >= COLOUR_MAYBE


def hpos(x: Instance, side: str, width: int) -> Truth:
    """In the left, middle or right third of the image, by the box's centre; a box that reaches
    well into that third (:data:`REACH` of its width) may be said to be there too."""
    c, m = x.cx / width, POSITION_MARGIN
    lo, hi = {"left": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "right": (2 / 3, 1.0)}[side]
    reaches = _overlap(x.box[0], x.box[2], lo * width, hi * width) >= REACH * max(x.width, 1.0)
    if side == "left":
        return c < 1 / 3 - m, c < 1 / 3 + m or reaches
    if side == "right":
        return c > 2 / 3 + m, c > 2 / 3 - m or reaches
    return abs(c - 0.5) < 1 / 6 - m, abs(c - 0.5) < 1 / 6 + m or reaches


def vpos(x: Instance, side: str, height: int) -> Truth:
    """In the top or bottom half of the image, by the box's centre (or reaching well into it)."""
    c, m = x.cy / height, 1.5 * POSITION_MARGIN
    lo, hi = (0.0, 0.5) if side == "top" else (0.5, 1.0)
    reaches = _overlap(x.box[1], x.box[3], lo * height, hi * height) >= REACH * max(x.height, 1.0)
    return (c < 0.5 - m, c < 0.5 + m or reaches) if side == "top" else (c > 0.5 + m, c > 0.5 - m or reaches)


def extreme(x: Instance, which: str, members: list[Instance]) -> Truth:
    """The largest (or smallest) of its category by a clear ratio, both in visible pixels and in
    extent (its box: a half-hidden chair is not smaller to a person)."""
    others = [y for y in members if y.index != x.index]
    if not others:
        return True, True
    sure, maybe = True, False
    for size in (lambda y: float(y.area), lambda y: y.width * y.height):
        own, rest = size(x), [size(y) for y in others]
        if which == "largest":
            sure &= own >= SIZE_RATIO * max(rest)
            maybe |= SIZE_RATIO * own >= max(rest)
        else:
            sure &= SIZE_RATIO * own <= min(rest)
            maybe |= own <= SIZE_RATIO * min(rest)
    return sure, sure or maybe


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return min(a1, b1) - max(a0, b0)


def related(x: Instance, a: Instance, relation: str, scene: Scene) -> Truth:
    """Whether ``x`` stands in ``relation`` to the anchor ``a``, as seen in the picture."""
    (x0, y0, x1, y1), (a0, b0, a1, b1) = x.box, a.box
    rows = _overlap(y0, y1, b0, b1) / max(min(x.height, a.height), 1.0)  # share of the shorter one's rows
    cols = _overlap(x0, x1, a0, a1) / max(min(x.width, a.width), 1.0)
    meet = rows > 0 and cols > 0  # boxes that meet: depth decides, a person may read it either way
    if relation in ("left of", "right of"):  # side by side: rows shared, the target clearly to that side
        # (anything whose centre is on that side may be read so: "right of" a thing at the far left)
        if relation == "right of":
            x0, x1, a0, a1 = -x1, -x0, -a1, -a0
        slack = 0.1 * min(x.width, a.width)
        return x1 <= a0 + slack and rows >= 0.3, (x0 + x1) < (a0 + a1) or meet
    if relation in ("above", "below"):  # one over the other, columns shared, with a gap
        if relation == "below":
            y0, y1, b0, b1 = -y1, -y0, -b1, -b0
        gap = b0 - y1
        return gap >= 0.02 * scene.height and cols >= 0.3, ((y0 + y1) < (b0 + b1) and cols > 0) or meet
    if relation == "next to":  # side by side at a comparable size (so likely at a comparable depth)
        ratio = max(x.area, a.area) / max(min(x.area, a.area), 1)
        gap = max(a0 - x1, x0 - a1)
        span = (x.width + a.width) / 2
        sure = ratio <= 3 and rows >= 0.5 and -0.1 * min(x.width, a.width) <= gap <= 0.3 * span
        return sure, (ratio <= 6 and rows > 0 and gap <= 0.8 * span) or meet
    if relation == "on":  # resting on top: above its middle, within its columns, touching it from above
        maybe = (meet or (cols > 0 and y1 >= b0 - 0.05 * scene.height)) and y0 < b1  # objects on it hide it
        sure = (maybe and cols >= 0.6 and x.area <= 0.5 * a.area and y1 <= b0 + 0.5 * a.height
                and _rests_on(scene.masks[x.index], scene.masks[a.index], x.box) >= 0.3)
        return sure, maybe
    if relation == "in front of":  # the target's visible pixels cover the anchor's own
        maybe = meet and (x.order > a.order or x.order == a.order == 0)  # two existing: depth unknown
        original = scene.originals[a.index]
        if not (maybe and x.order > a.order and original is not None):
            return False, maybe
        covered = int((scene.masks[x.index] & original).sum())
        return covered >= max(0.1 * int(original.sum()), 0.002 * scene.height * scene.width), maybe
    raise ValueError(f"unknown relation {relation!r}")


def _rests_on(top: torch.Tensor, below: torch.Tensor, box: tuple[float, float, float, float],
              reach: int = 4) -> float:
    """The share of ``top``'s columns whose lowest pixel has ``below`` within ``reach`` pixels under
    it; ``box``: ``top``'s tight box (only that window and the ``reach`` rows under it are read)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h = top.shape[0]
    y2 = min(h, y1 + reach)
    top, below = top[y0:y1, x0:x1], below[y0:y2, x0:x1]
    cols = top.any(0).nonzero().flatten()
    if len(cols) == 0:
        return 0.0
    rows = torch.arange(top.shape[0], device=top.device)
    lowest = torch.where(top[:, cols], rows[:, None], -1).amax(0)  # each column's lowest row (in the window)
    hits = torch.zeros(len(cols), dtype=torch.bool, device=top.device)
    for d in range(1, reach + 1):
        r = lowest + d
        inside = r < below.shape[0]
        hits |= below[r.clamp(max=below.shape[0] - 1), cols] & inside
    return float(hits.float().mean())
