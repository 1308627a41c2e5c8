"""Relighting pasted segments: SOS's Lab blending, Reinhard transfer toward the surroundings, and a
small distilled net that runs batched inside CopyPaste (``CopyPaste(..., relight=...)``)."""

from .batch import RelightBatch, relight
from .classical import LabBlend, ReinhardTransfer
from .net import RelightNet

__all__ = ["LabBlend", "ReinhardTransfer", "RelightBatch", "RelightNet", "relight"]
