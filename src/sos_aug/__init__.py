"""sos_aug: the SOS recipe (synthetic object segments, layout priors, exact targets) as an
on-the-fly PyTorch augmentation."""

from .bank import SegmentBank, build_bank, coco_source, merge_banks, rgba_tree_source, xpaste_source

__version__ = "0.1.0"
__all__ = ["SegmentBank", "build_bank", "coco_source", "merge_banks", "rgba_tree_source", "xpaste_source"]
