"""Referring expressions: what a person sees of an image's instances (:mod:`.scene`), what words
say with margins (:mod:`.predicates`), expression candidates and the resolver that verifies each
denotes exactly its targets (:mod:`.expressions`), everyday words (:mod:`.words`), the grounding
files they are written to (:mod:`.export`) and a review gallery (:mod:`.review`). A whole COCO set
at once, pasted first where asked, is :mod:`sos_aug.refer` (above CopyPaste)."""

from .expressions import KINDS, Referring

__all__ = ["KINDS", "Referring"]
