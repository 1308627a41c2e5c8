"""The relighting protocol: a relighter takes a :class:`RelightBatch` (composites, the composites
before relighting, each image's visible pasted masks) and returns relit images, changing only pixels
under those masks. It is a callable on the batch, or, for an ``nn.Module`` (whose call is its
forward), an object with a ``relight_batch`` method. :func:`relight` runs a chain of them;
:func:`warm_up` compiles their CPU code once, before DataLoader workers fork."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..ops.buffers import same_size_groups

Relighter = Callable[["RelightBatch"], list]


@dataclass
class RelightBatch:
    images: list[torch.Tensor]  # (3, H, W) uint8, or float in [0, 1]: the current composites
    plain: list[torch.Tensor]  # the composites before any relighting
    masks: list[torch.Tensor]  # (K, H, W) bool visible pasted masks (disjoint), in paste order
    boxes: list[torch.Tensor] | None = None  # (K, 4) their tight XYXY boxes, when the caller has them
    relit: bool = False  # whether an earlier step of the chain relit ``images`` (LabBlend blends toward it)


def relight_one(relighter: Relighter, batch: RelightBatch) -> list[torch.Tensor]:
    """One relighter on a batch, whichever form of the protocol it takes."""
    method = getattr(relighter, "relight_batch", None)
    return method(batch) if method is not None else relighter(batch)


def as_chain(relighters: Relighter | Sequence[Relighter]) -> list[Relighter]:
    """One relighter or a list of them, as a list."""
    return list(relighters) if isinstance(relighters, (list, tuple)) else [relighters]


def relight(relighters: Relighter | Sequence[Relighter], batch: RelightBatch) -> list[torch.Tensor]:
    """Run relighters in order (``[RelightNet.pretrained(), LabBlend()]`` composes). Each one works in
    the windows of the pasted segments and writes only pixels under their masks."""
    for step in as_chain(relighters):
        batch = replace(batch, images=relight_one(step, batch), relit=True)
    return batch.images


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """A window as float in [0, 1], whatever the image's dtype."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def by_device(images: list[torch.Tensor], plain: list[torch.Tensor], masks: list[torch.Tensor],
              on_cpu: Callable, on_batch: Callable, boxes: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """A classical relighter's two paths: ``on_cpu(image, plain, masks, boxes)`` image by image on
    the CPU, ``on_batch(images, plain, masks, boxes)`` on accelerators for stacked images of one
    size (the masks' tight boxes where the caller has them, else None); images without pasted
    segments come back as they are."""

    out, on_device = list(images), []
    for i, (image, m) in enumerate(zip(images, masks)):
        if len(m) and image.device.type == "cpu":
            out[i] = on_cpu(image, plain[i], m, None if boxes is None else boxes[i])
        elif len(m):
            on_device.append(i)
    for group in same_size_groups([images[i] for i in on_device]):
        idx = [on_device[j] for j in group]
        changed = on_batch(torch.stack([images[i] for i in idx]), torch.stack([plain[i] for i in idx]),
                           [masks[i] for i in idx], None if boxes is None else [boxes[i] for i in idx])
        for i, image in zip(idx, changed):
            out[i] = image
    return out


# Segments of the warm-up batch, (top, left, height, width) in a 200 x 260 image: distinct sizes (no
# two equal, none equal to a fixed dimension), and boxes both inside and at the borders, so that the
# compiled code covers what real batches bring
_WARM_UP_BOXES = ((0, 0, 23, 37), (60, 110, 41, 29), (110, 17, 31, 53), (150, 211, 27, 49), (1, 170, 47, 19),
                  (88, 1, 22, 34))


def warm_up(relighters, threads: int = 1) -> None:
    """Compile here, once, what ``relighters`` compile on the CPU (the compiled pixel loops of the
    net and LabBlend; the net's forward where ``compile_cpu``), by relighting a small synthetic
    uint8 batch with torch at ``threads`` threads, as DataLoader workers run (compiled torch code is
    guarded on the thread count): workers forked afterwards inherit the compiled code instead of
    each compiling it again, every epoch. Only the steps that say so (``compiles_cpu_code``) run;
    a chain without any does nothing."""

    chain = [step for step in as_chain(relighters) if getattr(step, "compiles_cpu_code", False)]
    if not chain:
        return
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 200, 260), dtype=torch.uint8, generator=g)
    masks = torch.zeros(len(_WARM_UP_BOXES), 200, 260, dtype=torch.bool)
    for mask, (top, left, height, width) in zip(masks, _WARM_UP_BOXES):
        mask[top : top + height, left : left + width] = torch.rand(height, width, generator=g) > 0.2
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        relight(chain, RelightBatch([image], [image], [masks]))
    finally:
        torch.set_num_threads(previous)
