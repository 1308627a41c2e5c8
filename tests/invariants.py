"""Checks the adapter tests share: what a framework receives after pasting, against its input."""

from __future__ import annotations

import torch


def match_existing(out: torch.Tensor, old: torch.Tensor, covered: torch.Tensor, changed: torch.Tensor) -> list[int]:
    """Each surviving instance is, in order, an input mask less pixels that were painted over: none of
    a kept pasted instance's pixels, and only pixels the paste changed (a piece hidden by later ones
    is dropped as a target but its pixels still cover what was under it). Returns the input rows."""
    rows, j = [], 0
    for m in out:
        while j < len(old) and not (not (m & ~old[j]).any() and not (m & covered).any()
                                    and not ((old[j] & ~m) & ~covered & ~changed).any() and m.any()):
            j += 1
        assert j < len(old), "an existing instance is not its input mask less painted pixels"
        rows.append(j)
        j += 1
    return rows
