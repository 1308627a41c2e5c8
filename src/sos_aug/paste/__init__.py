"""Compositing: warp segments into images and update their instances exactly.

:func:`paste` is the one way in (:mod:`.front`, with the backend policy); the rules and types are in
:mod:`.rules`, where pieces land in :mod:`.geometry`, and each backend has its file: :mod:`.window`
(image by image, the CPU's), :mod:`.batched` (same-size batches, and the piece-by-piece loop),
:mod:`.groups` (pieces of similar size warped together) and :mod:`.kernel` (two Triton kernels, CUDA).
"""

from .front import BACKENDS, choose_backend, paste
from .rules import DropRule, Instances, PasteResult

__all__ = ["BACKENDS", "DropRule", "Instances", "PasteResult", "choose_backend", "paste"]
