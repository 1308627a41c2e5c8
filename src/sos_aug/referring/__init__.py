"""Referring expressions: the attribute model of an image's instances, expression candidates and
the resolver that verifies each denotes exactly its targets (:mod:`.expressions`), the grounding
files they are written to (:mod:`.export`), and a whole COCO set at once (:mod:`.dataset`)."""

from .expressions import KINDS, Referring

__all__ = ["KINDS", "Referring"]
