"""Relighting as CopyPaste runs it (relight/batch.py): chains of relighters change only pasted pixels,
deterministically, and never a target."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sos_aug import CopyPaste
from sos_aug.relight import LabBlend, ReinhardTransfer, RelightNet, relight


@pytest.mark.parametrize("make", [lambda: ReinhardTransfer(), lambda: LabBlend(), lambda: RelightNet.pretrained(),
                                  lambda: [RelightNet.pretrained(), LabBlend()]])
def test_background_untouched_foreground_changed_and_deterministic(pasted, make):
    batch = pasted[0]
    a, b = relight(make(), batch), relight(make(), batch)
    for out, again, plain, masks in zip(a, b, batch.plain, batch.masks):
        covered = masks.any(0)
        assert torch.equal(out[:, ~covered], plain[:, ~covered])
        assert torch.equal(out, again)
        assert (out[:, covered] - plain[:, covered]).abs().mean() > 1e-4


def test_copypaste_relight_keeps_targets_and_background(train_bank, pasted):
    _, images, targets = pasted
    plain_cp = CopyPaste(train_bank, num_pastes=(5, 5))
    relit_cp = CopyPaste(train_bank, num_pastes=(5, 5), relight=[RelightNet.pretrained(), LabBlend()])
    a, ta = plain_cp(list(images), list(targets), generator=torch.Generator().manual_seed(0))
    b, tb = relit_cp(list(images), list(targets), generator=torch.Generator().manual_seed(0))
    for x, y, t, u in zip(a, b, ta, tb):
        assert torch.equal(t["masks"], u["masks"]) and torch.equal(t["boxes"], u["boxes"])
        covered = t["masks"][t["is_pasted"]].any(0)
        assert torch.equal(x[:, ~covered], y[:, ~covered])
        assert not torch.equal(x[:, covered], y[:, covered])


RELIGHTERS = {"net": lambda: RelightNet.pretrained(), "lab": lambda: LabBlend(), "reinhard": lambda: ReinhardTransfer(),
              "net+lab": lambda: [RelightNet.pretrained(), LabBlend()]}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), picks=st.lists(st.integers(0, 78), min_size=1, max_size=3),
       sos=st.booleans(), batched=st.booleans(), as_float=st.booleans(), relighter=st.sampled_from(sorted(RELIGHTERS)))
def test_relighting_changes_only_pasted_pixels_and_no_target(train_bank, val_set, seed, picks, sos, batched,
                                                            as_float, relighter):
    """Over random layouts, images, dtypes and relighters, CopyPaste with relighting returns exactly
    the targets it returns without, and the same pixels everywhere but under the visible pasted masks."""
    from sos_aug import RandomLayout, SOSLayout

    layout = SOSLayout() if sos else RandomLayout(scale=(0.3, 2.0))
    backend = "groups" if batched else "window"
    plain_cp = CopyPaste(train_bank, layout=layout, num_pastes=(1, 8), backend=backend)
    relit_cp = CopyPaste(train_bank, layout=layout, num_pastes=(1, 8), backend=backend,
                         relight=RELIGHTERS[relighter]())
    images, targets = zip(*[val_set[i % len(val_set)] for i in picks])
    if as_float:
        images = [im.as_subclass(torch.Tensor).float() / 255 for im in images]
    g = torch.Generator().manual_seed(seed)
    segments = plain_cp.fetch(len(images), g)
    params = plain_cp.draw_placements([tuple(im.shape[-2:]) for im in images], targets, segments, g)
    plain, plain_targets = plain_cp.paste(images, targets, segments, params)
    relit, relit_targets = relit_cp.paste(images, targets, segments, params)
    for a, b, t, u in zip(plain, relit, plain_targets, relit_targets):
        assert t.keys() == u.keys()
        assert all(torch.equal(t[k], u[k]) if torch.is_tensor(t[k]) else t[k] == u[k] for k in t)
        pasted = t["masks"][t["is_pasted"]].any(0)
        assert a.dtype == b.dtype and torch.equal(a[:, ~pasted], b[:, ~pasted])
