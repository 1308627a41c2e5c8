"""What a batch pastes: the segments drawn from the bank for each image, decoded into one flat
buffer (:class:`PasteSegments`), and, once drawn, each image's layout. It travels from a DataLoader
worker to the training step in one copy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .layout import Placement
from .ops.buffers import flat_base


@dataclass
class PasteSegments:
    """Decoded segments for a batch: ``rgba[i]`` is a (4, h, w) uint8 tensor for image ``image[i]``.

    The segments are views into one flat buffer, so moving them to a device (or pinning them) is one
    copy, not one per segment.
    """

    rgba: list[torch.Tensor]
    image: torch.Tensor  # (M,) which image each segment is for
    labels: torch.Tensor  # (M,) dataset label (-1 for open-vocabulary names without one)
    names: list[str]
    bank_rows: torch.Tensor  # (M,) positions in the bank view, for provenance
    placements: list[Placement] | None = None  # drawn ahead (in a worker) for the images they go with
    sizes: list[tuple[int, int]] | None = None  # the (H, W) the placements were drawn for

    @staticmethod
    def pack(arrays: Sequence[Any]) -> list[torch.Tensor]:
        """(4, h, w) uint8 arrays -> tensors that are views into one flat buffer."""
        flat = torch.empty(sum(int(a.size) for a in arrays), dtype=torch.uint8)
        return _views(flat, [tuple(a.shape) for a in arrays], arrays)

    def _moved(self, move: Callable[[torch.Tensor], torch.Tensor]) -> PasteSegments:
        """The same segments after ``move`` of their one flat buffer (a single copy)."""
        shapes = [tuple(r.shape) for r in self.rgba]
        rgba = _views(move(flat_base(self.rgba)), shapes)
        return PasteSegments(rgba, self.image, self.labels, self.names, self.bank_rows, self.placements, self.sizes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PasteSegments:
        """The segments on ``device``: one copy of their buffer, or themselves when already there."""
        if all(_on_device(r, torch.device(device)) for r in self.rgba[:1]):
            return self
        return self._moved(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PasteSegments:
        return self._moved(lambda t: t.pin_memory())

    def for_image(self, b: int) -> list[int]:
        return (self.image == b).nonzero().flatten().tolist()

    @staticmethod
    def concat(parts: Sequence[PasteSegments]) -> PasteSegments:
        """One batch's segments from parts fetched for one image each (frameworks that collate the
        samples themselves, as mmdet does): image ``b`` of the result is part ``b``'s image; layouts
        drawn with the parts are kept, re-indexed into the joined segments."""
        if not parts:
            raise ValueError("PasteSegments.concat needs at least one part")
        if any(len(p.placements or []) > 1 or bool((p.image != 0).any()) for p in parts):
            raise ValueError("PasteSegments.concat joins parts fetched for one image each (fetch(1))")
        starts = np.cumsum([0] + [len(p.rgba) for p in parts])
        drawn = all(p.placements is not None for p in parts)
        placements = [Placement(q.boxes, q.segment + int(start), q.flip, q.angle)
                      for p, start in zip(parts, starts) for q in p.placements] if drawn else None
        rgba = PasteSegments.pack([r.numpy() for p in parts for r in p.rgba])
        image = torch.cat([torch.full((len(p.rgba),), b, dtype=torch.long) for b, p in enumerate(parts)])
        return PasteSegments(rgba, image, torch.cat([p.labels for p in parts]), [n for p in parts for n in p.names],
                             torch.cat([p.bank_rows for p in parts]), placements,
                             [sz for p in parts for sz in p.sizes] if drawn else None)

    def __reduce__(self):  # one buffer across processes, not a storage per view
        shapes = [tuple(r.shape) for r in self.rgba]
        flat = flat_base(self.rgba)
        return _unpack, (flat, shapes, self.image, self.labels, self.names, self.bank_rows, self.placements,
                         self.sizes)


def _on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` lives on ``device`` ("cuda" meaning the current CUDA device)."""
    if device.index is None and device.type != "cpu":
        device = torch.empty(0, device=device).device
    return tensor.device == device


def _unpack(flat, shapes, image, labels, names, bank_rows, placements, sizes) -> PasteSegments:
    """Rebuild pickled :class:`PasteSegments` as views into the one buffer that travelled."""
    return PasteSegments(_views(flat, shapes), image, labels, names, bank_rows, placements, sizes)


def _views(flat: torch.Tensor, shapes: list[tuple[int, ...]], fill: Sequence[Any] | None = None) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` with these shapes, optionally filled from NumPy arrays."""
    out, start = [], 0
    for k, shape in enumerate(shapes):
        n = int(torch.Size(shape).numel())
        view = flat[start : start + n].view(shape)
        if fill is not None:
            np.copyto(view.numpy(), fill[k])
        out.append(view)
        start += n
    return out
