"""Buffers: tensors that are views into one flat buffer (one copy to move a batch's segments, no copy
to restack a batch's rows), and grouping images that can be stacked."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def flat_base(segments: list[torch.Tensor]) -> torch.Tensor:
    """The segments as one flat buffer, in order: the one they are views of, or a packed copy."""
    if not segments:
        return torch.zeros(0, dtype=torch.uint8)
    base = consecutive_base(segments)
    return base if base is not None else torch.cat([t.reshape(-1) for t in segments])


def consecutive_base(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D buffer that these contiguous tensors are back-to-back views of, in order, or None.
    Segments of a batch and the rows of a batched paste are such views: whoever needs them as one
    tensor can take this instead of copying."""
    first = tensors[0]
    total = sum(t.numel() for t in tensors)
    storage = first.untyped_storage()
    if first.storage_offset() + total > storage.nbytes() // first.element_size():
        return None
    start = first.data_ptr()
    for t in tensors:
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or t.dtype != first.dtype
                or not t.is_contiguous() or t.data_ptr() != start):
            return None
        start += t.numel() * t.element_size()
    return first.as_subclass(torch.Tensor).as_strided((total,), (1,))


def channels_last(image: torch.Tensor) -> bool:
    """Whether a (3, H, W) image is channels-last (interleaved) in memory: torchvision's uint8
    resize returns those; CPU relighting reads and writes either layout in place."""
    return image.stride() == (1, 3 * image.shape[2], 3)


def same_size_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of images that can be stacked into one batch: same shape, dtype and device."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((tuple(image.shape), image.dtype, image.device), []).append(i)
    return list(groups.values())
