"""Colour conversions (ops/color.py) against kornia's."""

from __future__ import annotations

import torch


def test_colour_conversions_match_kornia():
    """The Lab conversions written for the compiler (elementwise) and for eager runs (matrix
    products, the cube root's knee as a minimum, uint8 linearised by lookup) against kornia's, knees
    and extremes included."""
    from sos_aug.ops.color import (
        lab_to_rgb,
        lab_to_rgb_eager,
        lab_to_rgb_fused,
        lightness_eager,
        rgb_to_lab,
        rgb_to_lab_eager,
        rgb_to_lab_fused,
    )

    x = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.linspace(0, 0.08, 50)  # around the sRGB knee (0.04045); dark enough for the Lab knee
    x[:, 1, :4] = torch.tensor([0.0, 1.0, -0.1, 1.2])[:, None].T  # extremes, and out of range (clamped)
    reference = rgb_to_lab(x[None])[0]
    assert torch.allclose(rgb_to_lab_fused(x), reference, atol=1e-3)
    assert torch.allclose(rgb_to_lab_eager(x), reference, atol=1e-3)
    assert torch.allclose(rgb_to_lab_eager(x.transpose(0, 1).contiguous().transpose(0, 1)), reference, atol=1e-3)
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 2, 256).clone()  # every uint8 level, each channel
    levels[1, 1] = levels[1, 1].flip(0)
    assert torch.allclose(rgb_to_lab_eager(levels), rgb_to_lab(levels[None] / 255)[0], atol=1e-3)
    for rgb in (x, levels):
        assert torch.allclose(lightness_eager(rgb), rgb_to_lab_eager(rgb)[:1], atol=1e-4)
    lab = reference * torch.tensor([1.0, 1.5, 1.5]).view(3, 1, 1)  # some out of gamut
    lab[0, 0, :3] = torch.tensor([0.0, 100.0, 120.0])  # black, white, and above white
    for to_rgb in (lab_to_rgb_fused, lab_to_rgb_eager):
        assert torch.allclose(to_rgb(lab), lab_to_rgb(lab[None])[0], atol=1e-5)
