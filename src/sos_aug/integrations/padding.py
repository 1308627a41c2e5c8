"""Where an adapter's image ends and its padding begins: mmdet's ``Pad`` and detectron2's
``FixedSizeCrop`` pad the bottom rows and right columns, and neither framework records the size
before padding where the adapter reads it."""

from __future__ import annotations

import torch


def unpadded_extent(image: torch.Tensor) -> tuple[int, int]:
    """The (h, w) of a (C, H, W) image's content when padding fills its last rows and columns
    (mmdet's ``Pad``, detectron2's ``FixedSizeCrop``): trailing rows and columns whose every pixel
    equals the bottom-right one are padding. Without padding this is the image's size (unless its
    own last rows are one flat colour: pastes then only stay off them); an image of one colour
    throughout is all content."""
    differs = (image != image[:, -1:, -1:]).any(0)
    rows = differs.any(1).nonzero()
    if len(rows) == 0:
        return tuple(image.shape[-2:])
    return int(rows[-1]) + 1, int(differs.any(0).nonzero()[-1]) + 1
