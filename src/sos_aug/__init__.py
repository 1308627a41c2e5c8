"""sos_aug: the SOS recipe (synthetic object segments, layout priors, exact targets) as an
on-the-fly PyTorch augmentation."""

from .bank import SegmentBank, build_bank, coco_source, merge_banks, rgba_tree_source, xpaste_source
from .coco import CocoInstances
from .composite import DropRule
from .layout import DatasetStatsLayout, ExistingBoxesLayout, RandomLayout, SOSLayout
from .transforms import CopyPaste, CopyPasteCollate, PasteSegments, label_map_from_coco

__version__ = "0.1.0"
__all__ = [
    "CocoInstances", "CopyPaste", "CopyPasteCollate", "DatasetStatsLayout", "DropRule", "ExistingBoxesLayout",
    "PasteSegments", "RandomLayout", "SOSLayout", "SegmentBank", "build_bank", "coco_source",
    "label_map_from_coco", "merge_banks", "rgba_tree_source", "xpaste_source",
]
