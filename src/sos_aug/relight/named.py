"""Relighters by name, as configs and the command line write them: ``"net"``, ``"lab"``,
``"reinhard"``, ``"net+lab"``, or a list of names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .classical import LabBlend, ReinhardTransfer
from .net import RelightNet

NAMES = ("none", "net", "lab", "reinhard", "net+lab")


def make_relighter(spec: str | Sequence[Any] | Any | None, weights: str | None = None):
    """A relighter chain for ``CopyPaste(relight=...)`` from a name, a list of names, or relighters
    (passed through); ``None``/``"none"`` means no relighting. ``weights``: a local RelightNet file
    instead of the packaged one."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, str):
        parts = spec.split("+")
        if not all(p in NAMES[1:4] for p in parts):
            raise ValueError(f"unknown relighter {spec!r}; choose from {', '.join(NAMES)}")
        chain = [_one(p, weights) for p in parts]
        return chain[0] if len(chain) == 1 else chain
    if isinstance(spec, Sequence):
        chain = [make_relighter(s, weights) for s in spec]
        return [c for c in chain if c is not None] or None
    return spec


def _one(name: str, weights: str | None):
    if name == "net":
        return RelightNet.load(weights) if weights else RelightNet.pretrained()
    return LabBlend() if name == "lab" else ReinhardTransfer()
