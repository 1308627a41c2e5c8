"""Compositing's front door, :func:`paste`, and its one backend policy, :func:`choose_backend`.

Images (a batch or a list), each image's :class:`~.rules.Instances`, the segments and one
:class:`~sos_aug.layout.Placement` per image in; one complete :class:`~.rules.PasteResult` per image
out (image, masks, boxes, areas, labels, crowd flags, which instances are pasted, which survived),
whichever backend did the work.

Paste order matters: later segments cover earlier ones, and all cover the existing instances. The
rules every backend keeps (and the property tests check):

* an existing mask loses exactly the pixels covered by pasted masks; a pasted mask loses exactly the
  pixels of later pasted masks;
* every box whose mask changed is the tight pixel-edge box of the visible mask (``x1`` = last column
  + 1, as COCO and mmdet count); untouched instances keep their boxes;
* with hard alpha, pixels under a pasted mask are the warped segment's pixels and pixels outside
  every pasted footprint are the input's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layout import Placement
from ..ops import backends
from ..ops.buffers import same_size_groups
from .batched import paste_batch
from .rules import DropRule, Instances, PasteResult
from .window import paste_window

BACKENDS = ("auto", "window", "kernel", "groups")  # what callers choose from


def paste(
    images: torch.Tensor | Sequence[torch.Tensor],
    instances: Sequence[Instances],
    segments: Sequence[torch.Tensor],
    placements: Sequence[Placement],
    piece_labels: Sequence[torch.Tensor],
    drop: DropRule,
    feather_sigma: float = 0.0,
    backend: str = "auto",
    boxes: str = "tight",
) -> list[PasteResult]:
    """Paste ``segments`` into every image as its placement says and update its instances exactly.

    ``images``: a (B, 3, H, W) batch or a list of (3, H, W) images (uint8, or float in [0, 1]);
    ``segments``: (4, h, w) RGBA tensors on the images' device, indexed by ``placements[b].segment``;
    ``piece_labels[b]``: the label of each of placement ``b``'s draws. ``backend``
    (:func:`choose_backend`): ``"window"`` image by image inside each piece's window,
    ``"kernel"``/``"groups"`` same-size images batched (:func:`~.batched.paste_batch`), ``"auto"``
    the best for the device. ``boxes="tight"``: every box is its mask's tight box; ``"keep"``:
    instances pasting leaves alone keep their given boxes. All follow this module's rules."""
    if boxes not in ("tight", "keep"):
        raise ValueError(f"boxes must be 'tight' or 'keep', got {boxes!r}")
    if not (len(images) == len(instances) == len(placements) == len(piece_labels)):
        raise ValueError(f"{len(images)} images, {len(instances)} instance sets, {len(placements)} placements "
                         f"and {len(piece_labels)} label lists")
    if len(images) == 0:
        return []
    segments = list(segments)
    chosen = choose_backend(backend, images[0].device, placements, feather_sigma)
    if chosen == "window":
        return [paste_window(image, inst, segments, placement, labels, drop, feather_sigma, boxes == "tight")
                for image, inst, placement, labels in zip(images, instances, placements, piece_labels)]
    results: list[PasteResult] = [None] * len(images)  # type: ignore[list-item]
    stacked = isinstance(images, torch.Tensor)
    for group in ([list(range(len(images)))] if stacked else same_size_groups(images)):
        batch = images if stacked else torch.stack([images[i] for i in group])
        done = paste_batch(batch, [instances[i] for i in group], segments, [placements[i] for i in group],
                           [piece_labels[i] for i in group], drop, feather_sigma, chosen, boxes == "tight")
        for i, res in zip(group, done):
            results[i] = res
    return results


def choose_backend(backend: str, device: torch.device, placements: Sequence[Placement],
                   feather_sigma: float = 0.0) -> str:
    """The backend :func:`paste` uses, with its whole policy here. ``"auto"``: image by image
    (``"window"``) on the CPU, where touching only each piece's window is fastest; on an accelerator
    the Triton kernels where they run, else size groups. Batched, feathered or rotated pieces go
    piece by piece (``"loop"``, internal): the kernels and the groups handle neither."""
    check_backend(backend)
    if backend == "window" or (backend == "auto" and device.type == "cpu"):
        return "window"
    if feather_sigma > 0 or any(bool(p.angle.any()) for p in placements):
        return "loop"
    if backend == "auto":
        return "kernel" if backends.available(device, "paste") else "groups"
    if backend == "kernel" and not backends.available(device, "paste"):
        raise RuntimeError(f"backend='kernel' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU), "
                           f"with compiling on; the images are on {device}")
    return backend


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown compositing backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}")
