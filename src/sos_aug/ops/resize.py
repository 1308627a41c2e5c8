"""Antialiased resizing and the segment warp (resize, flip, rotate), as torch's antialiased
bilinear resize computes them, on any device and dtype."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F


def warp_segment(rgba: torch.Tensor, height: int, width: int, flip: bool, angle: float) -> torch.Tensor:
    """Resize (antialiased), flip and rotate a (4, h, w) segment (uint8, or float kept unrounded);
    rotation grows the canvas."""
    out = resize_aa(rgba, height, width)
    if flip:
        out = out.flip(-1)
    if angle:
        out = F.rotate(out, float(angle), interpolation=InterpolationMode.BILINEAR, expand=True)
    return out


def resize_aa(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a (C, h, w) uint8 or float tensor (float kept unrounded), as
    torchvision's ``F.resize(..., antialias=True)`` computes it, without its per-call checks (they
    cost more than the resize of a small window)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    if image.dtype == torch.uint8:  # torch's native uint8 kernel, the one F.resize calls
        return torch._C._nn._upsample_bilinear2d_aa(image[None], [height, width], False, None)[0]
    return _resize_float(image, height, width)


def _resize_float(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a float (C, h, w) tensor: F.interpolate's kernel without its
    per-call checks. That kernel (torch 2.14, CPU) returns the first output row in every row when the
    output is one pixel wide, so that case runs transposed (one pixel high is right). CUDA's kernel
    refuses large downscales (its taps must fit in shared memory): those take the same filter as
    two weight matrices."""
    transposed = width == 1 and height > 1
    source, size = (image.transpose(-1, -2), [width, height]) if transposed else (image, [height, width])
    try:
        out = torch._C._nn._upsample_bilinear2d_aa(source[None], size, False, None)[0]
    except RuntimeError as err:
        if "shared memory" not in str(err):
            raise
        out = resize_by_weights(source, *size)
    return out.transpose(-1, -2) if transposed else out


def aa_weights(pos: torch.Tensor, scale: torch.Tensor, inv_support: torch.Tensor, in_size: torch.Tensor,
               taps: torch.Tensor) -> torch.Tensor:
    """(G, O, I) weights of torch's antialiased bilinear resize (align_corners=False) for output
    coordinates ``pos`` (G, O), input positions ``taps`` (I,), per piece ``scale`` = in/out size and
    ``inv_support`` = 1 / max(scale, 1) (G, 1). Taps at or past ``in_size`` (G, 1) weigh 0; rows
    sum to 1 (a row with no weight, which only padding has, stays 0)."""
    center = (pos + 0.5) * scale
    w = (1 - ((taps + 0.5 - center.unsqueeze(-1)) * inv_support.unsqueeze(-1)).abs()).clamp_(min=0)
    w *= taps < in_size.unsqueeze(-1)
    return w / w.sum(-1, keepdim=True).clamp_(min=torch.finfo(w.dtype).tiny)


def resize_by_weights(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A float (C, h, w) image resized as torch's antialiased bilinear resize does, by one weight
    matrix per axis: for downscales too large for a device's own kernel."""
    (hs, ws), dev = image.shape[-2:], image.device

    def weights(out: int, size: int) -> torch.Tensor:
        scale = size / out
        pos = torch.arange(out, device=dev, dtype=torch.float32)[None]
        return aa_weights(pos, torch.tensor([[scale]], device=dev), torch.tensor([[1 / max(scale, 1.0)]], device=dev),
                          torch.tensor([[size]], device=dev), torch.arange(size, device=dev))[0]

    with full_fp32_matmul():
        return weights(height, hs) @ image.float() @ weights(width, ws).T


@contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Run matmuls in full fp32, whatever the caller set (TF32 would move pixels by ~0.3 levels and
    flip mask pixels next to the alpha threshold)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
