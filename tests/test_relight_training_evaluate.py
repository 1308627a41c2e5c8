"""The evaluation's parts (relight/evaluate.py, relight/perturb.py, relight/family.py): metrics on a
hand-computed case, the oracle's fit, and perturbations that leave the background alone."""

from __future__ import annotations

import math

import torch

from sos_aug.relight.family import N_PARAMS, apply_family, fit_family
from sos_aug.relight.training.evaluate import metrics
from sos_aug.relight.training.perturb import parametric


def test_metrics_on_a_hand_computed_case():
    truth = torch.zeros(3, 2, 2)
    pred = truth.clone()
    pred[:, 0, 0] = 10 / 255  # one foreground pixel off by 10 levels in every channel
    mask = torch.tensor([[True, True], [False, False]])
    m = metrics(pred, truth, mask)
    assert math.isclose(m["mse"], 100 / 4, rel_tol=1e-5)
    assert math.isclose(m["fmse"], 100 / 2, rel_tol=1e-5)
    assert math.isclose(m["psnr"], 10 * math.log10(255**2 / 25), rel_tol=1e-5)
    assert m["de2000"] > 0 and metrics(truth, truth, mask)["de2000"] == 0


def test_oracle_fit_recovers_a_perturbation_of_its_own_family():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g)
    truth = torch.zeros(2, N_PARAMS)
    truth[:, :9] = 0.05 * torch.randn(2, 9, generator=g)
    target = apply_family(truth, x)
    alpha = torch.ones(2, 1, 24, 24)
    fitted = fit_family(x, target, alpha, steps=300)
    assert ((apply_family(fitted, x) - target) ** 2).mean() < 1e-4 * ((x - target) ** 2).mean() + 1e-6


def test_parametric_perturbation_changes_the_segment_and_leaves_the_background(pasted):
    """The perturbation moves the segment's pixels (an identity would fail here), by different
    amounts for different draws, and leaves every background pixel as it was."""
    x = torch.rand(2, 3, 16, 16)
    alpha = torch.zeros(2, 1, 16, 16)
    alpha[:, :, 4:10, 4:10] = 1
    inside, outside = alpha[0, 0] == 1, alpha[0, 0] == 0
    y = parametric(x, alpha, torch.Generator().manual_seed(0))
    assert torch.equal(y[:, :, outside], x[:, :, outside])
    moved = (y - x)[:, :, inside].abs().mean((1, 2))  # per sample
    assert (moved > 0.01).all(), moved
    z = parametric(x, alpha, torch.Generator().manual_seed(1))
    assert not torch.allclose(y[:, :, inside], z[:, :, inside])
