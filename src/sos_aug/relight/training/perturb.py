"""Seeded foreground perturbations: the training family and the two evaluation suites.

``parametric`` changes the lighting and colour inside a mask the way a mismatched paste looks
(white balance, exposure, gamma, contrast, saturation, a directional shading ramp); ``transfer``
moves the foreground's Lab statistics part of the way toward another real object's, as
iHarmony4's HCOCO builds its composites.
"""

from __future__ import annotations

import math

import torch

from ...ops.color import lab_to_rgb, rgb_to_lab
from ...ops.masks import masked_mean, masked_stats


def _rand(n: int, g: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=g).to(device)


def _randn(n: int, g: torch.Generator | None, device) -> torch.Tensor:
    return torch.randn(n, generator=g).to(device)


def parametric(rgb: torch.Tensor, alpha: torch.Tensor, g: torch.Generator | None = None,
               strength: float = 1.0) -> torch.Tensor:
    """Perturb (S, 3, h, w) RGB in [0, 1] inside (S, 1, h, w) alpha; the background is untouched."""
    s, dev = rgb.shape[0], rgb.device
    x = rgb
    wb = torch.exp(0.15 * strength * torch.randn(s, 3, generator=g).to(dev)).view(s, 3, 1, 1)
    exposure = torch.exp(0.3 * strength * _randn(s, g, dev)).view(s, 1, 1, 1)
    gamma = torch.exp(0.25 * strength * _randn(s, g, dev)).view(s, 1, 1, 1)
    contrast = torch.exp(0.2 * strength * _randn(s, g, dev)).view(s, 1, 1, 1)
    saturation = torch.exp(0.3 * strength * _randn(s, g, dev)).view(s, 1, 1, 1)
    ramp = 0.4 * strength * _rand(s, g, dev).view(s, 1, 1, 1)
    theta = 2 * math.pi * _rand(s, g, dev).view(s, 1, 1, 1)
    x = (x * wb * exposure).clamp(0, 1) ** gamma
    mean = masked_mean(x, alpha)
    x = (x - mean) * contrast + mean
    grey = x.mean(1, keepdim=True)
    x = (x - grey) * saturation + grey
    h, w = rgb.shape[-2:]
    yy = torch.linspace(-1, 1, h, device=dev).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w, device=dev).view(1, 1, 1, w)
    x = x * (1 + ramp * (torch.cos(theta) * xx + torch.sin(theta) * yy))
    return rgb * (1 - alpha) + x.clamp(0, 1) * alpha


def transfer(rgb: torch.Tensor, alpha: torch.Tensor, ref_stats: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Move the foreground's Lab mean/std ``amount`` (S,) of the way toward ``ref_stats`` (S, 6)."""
    lab = rgb_to_lab(rgb, dim=1)
    mean, std = masked_stats(lab, alpha)
    tgt_mean, tgt_std = ref_stats[:, :3, None, None], ref_stats[:, 3:, None, None]
    a = amount.view(-1, 1, 1, 1)
    new_mean = mean + a * (tgt_mean - mean)
    new_std = std * (1 + a * (tgt_std / std.clamp(min=1e-3) - 1))
    moved = (lab - mean) / std.clamp(min=1e-3) * new_std + new_mean
    out = lab_to_rgb(moved, dim=1)
    return rgb * (1 - alpha) + out * alpha


def training_perturbation(rgb: torch.Tensor, alpha: torch.Tensor, ref_stats: torch.Tensor,
                          g: torch.Generator | None = None, keep: float = 0.2) -> torch.Tensor:
    """The widened training family: parametric, transfer, or transfer then parametric; a ``keep``
    share stays unperturbed, so that a segment that already fits is left alone."""
    s, dev = rgb.shape[0], rgb.device
    kind = torch.randint(0, 3, (s,), generator=g).to(dev).view(s, 1, 1, 1)
    unchanged = (torch.rand(s, generator=g) < keep).to(dev).view(s, 1, 1, 1)
    strength = 0.5 + _rand(1, g, dev).item()
    par = parametric(rgb, alpha, g, strength)
    amount = 0.3 + 0.7 * _rand(s, g, dev)
    tra = transfer(rgb, alpha, ref_stats, amount)
    both = parametric(tra, alpha, g, 0.6)
    out = torch.where(kind == 0, par, torch.where(kind == 1, tra, both))
    return torch.where(unchanged, rgb, out)
