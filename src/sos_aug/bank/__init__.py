"""The segment bank: a compact store of RGBA object segments (see :mod:`.format`)."""

from .builder import BankBuildError, build_bank, merge_banks
from .format import BankFormatError
from .sources import coco_source, rgba_tree_source, xpaste_source
from .store import SAMPLING_MODES, Segment, SegmentBank

__all__ = [
    "SAMPLING_MODES", "BankBuildError", "BankFormatError", "Segment", "SegmentBank", "build_bank",
    "coco_source", "merge_banks", "rgba_tree_source", "xpaste_source",
]
