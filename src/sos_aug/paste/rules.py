"""The rules and types of compositing: when an occluded instance is dropped (:class:`DropRule`),
the instances an image enters with (:class:`Instances`) and the complete result it leaves with
(:class:`PasteResult`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DropRule:
    """When an occluded instance is dropped.

    ``visible_fraction``: keep while visible area / area before occlusion >= ``min_visible``.
    ``mmdet``: mmdet's CopyPaste rule, keep while every box edge moved <= ``box_threshold`` px or
    more than ``mask_threshold`` pixels remain. Crowd regions are kept while any pixel remains.
    """

    mode: str = "visible_fraction"
    min_visible: float = 0.25
    box_threshold: float = 10.0
    mask_threshold: int = 300

    def __post_init__(self):
        if self.mode not in ("visible_fraction", "mmdet"):
            raise ValueError(f"unknown drop rule {self.mode!r}; use 'visible_fraction' or 'mmdet'")

    def keep(self, visible: torch.Tensor, before: torch.Tensor, old_box: torch.Tensor, new_box: torch.Tensor,
             crowd: torch.Tensor) -> torch.Tensor:
        if self.mode == "visible_fraction":
            ok = visible.double() >= self.min_visible * before.double()
        else:
            moved = (new_box - old_box).abs().amax(1) if len(old_box) else torch.zeros(0, device=visible.device)
            ok = (moved <= self.box_threshold) | (visible > self.mask_threshold)
        ok = torch.where(crowd, torch.ones_like(ok), ok)
        return ok & (visible > 0)


@dataclass
class Instances:
    """One image's instances as compositing reads them, on the image's device."""

    masks: torch.Tensor  # (N, H, W) bool
    boxes: torch.Tensor  # (N, 4) XYXY
    labels: torch.Tensor  # (N,)
    crowd: torch.Tensor  # (N,) read as bool
    area: torch.Tensor | None = None  # (N,) areas they came with, kept for instances pasting leaves alone


@dataclass
class PasteResult:
    """One composited image and its complete new instances: the existing survivors in their order,
    then the pasted survivors in paste order. Every backend fills every field."""

    image: torch.Tensor
    masks: torch.Tensor  # (M, H, W) bool
    boxes: torch.Tensor  # (M, 4) float XYXY: tight boxes (or, with boxes="keep", the given ones of unchanged masks)
    area: torch.Tensor  # (M,) float; pixel count where pasting changed the mask, else the given area
    labels: torch.Tensor  # (M,)
    iscrowd: torch.Tensor  # (M,) int64
    is_pasted: torch.Tensor  # (M,) bool
    keep_existing: torch.Tensor  # (N,) bool: which existing instances survive
    pasted_kept: torch.Tensor  # (K,) bool, on the CPU: which of the placement's K draws survive
