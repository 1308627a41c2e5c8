"""Colour conversions (ops/color.py) against kornia's, the reference they compute faster."""

from __future__ import annotations

import kornia
import torch

from sos_aug.ops.color import lab_to_rgb, lightness, rgb_to_lab


def test_colour_conversions_match_kornia():
    """The Lab conversions (matrix products, the cube root's knee as a minimum, uint8 linearised by
    lookup) against kornia's, knees and extremes included, along any channel dimension."""
    x = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.linspace(0, 0.08, 50)  # around the sRGB knee (0.04045); dark enough for the Lab knee
    x[:, 1, :4] = torch.tensor([0.0, 1.0, -0.1, 1.2])[:, None].T  # extremes, and out of range (clamped)
    reference = kornia.color.rgb_to_lab(x.clamp(0, 1)[None])[0]
    assert torch.allclose(rgb_to_lab(x), reference, atol=1e-3)
    assert torch.allclose(rgb_to_lab(x.transpose(0, 1).contiguous().transpose(0, 1)), reference, atol=1e-3)
    assert torch.allclose(rgb_to_lab(x[None], dim=1)[0], reference, atol=1e-3)  # (S, 3, H, W) batches
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 2, 256).clone()  # every uint8 level, each channel
    levels[1, 1] = levels[1, 1].flip(0)
    assert torch.allclose(rgb_to_lab(levels), kornia.color.rgb_to_lab(levels[None] / 255)[0], atol=1e-3)
    for rgb in (x, levels):
        assert torch.allclose(lightness(rgb), rgb_to_lab(rgb)[:1], atol=1e-4)
    lab = reference * torch.tensor([1.0, 1.5, 1.5]).view(3, 1, 1)  # some out of gamut
    lab[0, 0, :3] = torch.tensor([0.0, 100.0, 120.0])  # black, white, and above white
    assert torch.allclose(lab_to_rgb(lab), kornia.color.lab_to_rgb(lab[None], clip=True)[0], atol=1e-5)
    assert torch.allclose(lab_to_rgb(lab[None], dim=1)[0], lab_to_rgb(lab), atol=1e-6)
