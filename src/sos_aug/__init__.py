"""sos_aug: the SOS recipe (synthetic object segments, layout priors, exact targets) as an
on-the-fly PyTorch augmentation.

The public names are imported on first use (PEP 562), so ``import sos_aug`` and ``sos-aug --help``
do not pay for torch, torchvision and kornia until something needs them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_HOMES = {
    "SegmentBank": "bank", "build_bank": "bank", "coco_source": "bank", "merge_banks": "bank",
    "rgba_tree_source": "bank", "xpaste_source": "bank",
    "CocoInstances": "coco", "label_map_from_coco": "coco",
    "DropRule": "paste",
    "Referring": "referring",
    "DatasetStatsLayout": "layout", "ExistingBoxesLayout": "layout", "Layout": "layout", "Placement": "layout",
    "RandomLayout": "layout", "SOSLayout": "layout", "Scene": "layout",
    "CopyPaste": "copy_paste", "CopyPasteCollate": "copy_paste", "PasteSegments": "segments",
}
__all__ = [
    "CocoInstances", "CopyPaste", "CopyPasteCollate", "DatasetStatsLayout", "DropRule", "ExistingBoxesLayout",
    "Layout", "PasteSegments", "Placement", "RandomLayout", "Referring", "SOSLayout", "Scene", "SegmentBank",
    "build_bank",
    "coco_source", "label_map_from_coco", "merge_banks", "rgba_tree_source", "xpaste_source",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'sos_aug' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .bank import SegmentBank, build_bank, coco_source, merge_banks, rgba_tree_source, xpaste_source
    from .coco import CocoInstances, label_map_from_coco
    from .copy_paste import CopyPaste, CopyPasteCollate
    from .layout import DatasetStatsLayout, ExistingBoxesLayout, Layout, Placement, RandomLayout, Scene, SOSLayout
    from .paste import DropRule
    from .referring import Referring
    from .segments import PasteSegments
