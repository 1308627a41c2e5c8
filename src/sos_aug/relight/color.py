"""Colour spaces and colour difference: Lab through kornia, CIEDE2000 (kornia has none)."""

from __future__ import annotations

import math

import kornia
import torch


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> CIE Lab (L in [0, 100]), via kornia."""
    return kornia.color.rgb_to_lab(rgb.clamp(0, 1))


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    return kornia.color.lab_to_rgb(lab, clip=True)


def delta_e2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference between Lab tensors (channel dim -3), per pixel.

    Follows Sharma, Wu & Dalal (2005), with kL = kC = kH = 1.
    """
    L1, a1, b1 = lab1.unbind(-3)
    L2, a2, b2 = lab2.unbind(-3)
    c1, c2 = torch.hypot(a1, b1), torch.hypot(a2, b2)
    c_bar7 = ((c1 + c2) / 2) ** 7
    g = 0.5 * (1 - torch.sqrt(c_bar7 / (c_bar7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.atan2(b1, a1p) % (2 * math.pi)
    h2p = torch.atan2(b2, a2p) % (2 * math.pi)
    dLp = L2 - L1
    dCp = c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > math.pi, dh - 2 * math.pi, torch.where(dh < -math.pi, dh + 2 * math.pi, dh))
    dh = torch.where(c1p * c2p == 0, torch.zeros_like(dh), dh)
    dHp = 2 * torch.sqrt(c1p * c2p) * torch.sin(dh / 2)
    L_bar = (L1 + L2) / 2
    c_bar_p = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_bar = torch.where(
        c1p * c2p == 0, h_sum,
        torch.where((h1p - h2p).abs() <= math.pi, h_sum / 2,
                    torch.where(h_sum < 2 * math.pi, (h_sum + 2 * math.pi) / 2, (h_sum - 2 * math.pi) / 2)))
    t = (1 - 0.17 * torch.cos(h_bar - math.radians(30)) + 0.24 * torch.cos(2 * h_bar)
         + 0.32 * torch.cos(3 * h_bar + math.radians(6)) - 0.20 * torch.cos(4 * h_bar - math.radians(63)))
    d_theta = math.radians(30) * torch.exp(-(((torch.rad2deg(h_bar) - 275) / 25) ** 2))
    c_bar_p7 = c_bar_p**7
    r_c = 2 * torch.sqrt(c_bar_p7 / (c_bar_p7 + 25.0**7))
    s_l = 1 + 0.015 * (L_bar - 50) ** 2 / torch.sqrt(20 + (L_bar - 50) ** 2)
    s_c = 1 + 0.045 * c_bar_p
    s_h = 1 + 0.015 * c_bar_p * t
    r_t = -torch.sin(2 * d_theta) * r_c
    return torch.sqrt((dLp / s_l) ** 2 + (dCp / s_c) ** 2 + (dHp / s_h) ** 2 + r_t * (dCp / s_c) * (dHp / s_h))
