"""CopyPasteCollate in real DataLoader workers: reproducible per seed, different per worker."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from sos_aug import CopyPaste, CopyPasteCollate, SOSLayout


def run(dataset, cp, seed, defer=False):
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=CopyPasteCollate(cp, defer=defer),
                        generator=torch.Generator().manual_seed(seed))
    return list(loader)


def test_two_workers_reproducible_and_distinct(train_bank, val_set):
    cp = CopyPaste(train_bank, layout=SOSLayout(), num_pastes=(2, 6))
    same_image = Subset(val_set, [3] * 8)  # identical inputs everywhere: only the draws differ
    a, b = run(same_image, cp, seed=11), run(same_image, cp, seed=11)
    assert len(a) == 4
    for (ia, ta), (ib, tb) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))
        assert all(torch.equal(x["pasted_rows"], y["pasted_rows"]) and torch.equal(x["boxes"], y["boxes"])
                   for x, y in zip(ta, tb))
    # batches 0 and 1 come from workers 0 and 1
    rows0 = [t["pasted_rows"].tolist() for t in a[0][1]]
    rows1 = [t["pasted_rows"].tolist() for t in a[1][1]]
    assert rows0 != rows1
    c = run(same_image, cp, seed=12)
    assert [t["pasted_rows"].tolist() for t in c[0][1]] != rows0


def test_deferred_mode_ships_segments_and_pastes_later(train_bank, val_set):
    cp = CopyPaste(train_bank, num_pastes=(3, 3))
    batches = run(Subset(val_set, [0, 1, 2, 3]), cp, seed=0, defer=True)
    images, targets, segments = batches[0]
    assert len(segments.rgba) == 6 and segments.image.tolist() == [0, 0, 0, 1, 1, 1]
    out_images, out_targets = cp(list(images), list(targets), segments=segments,
                                 generator=torch.Generator().manual_seed(0))
    assert all(int(t["is_pasted"].sum()) <= 3 for t in out_targets)
    assert any(int(t["is_pasted"].sum()) > 0 for t in out_targets)
    # the worker drew the layout too; pasting later (batched, as on a GPU) follows it exactly
    assert segments.placements is not None and len(segments.placements) == 2
    again_images, again_targets = CopyPaste(train_bank, num_pastes=(3, 3), batched=True)(
        list(images), list(targets), segments=segments)
    for a, b, ta, tb in zip(out_images, again_images, out_targets, again_targets):
        assert torch.equal(a, b) and torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["boxes"], tb["boxes"])
    # images resized after the worker drew the layout: a clear error, not a layout for another size
    small = [im[:, :100, :100] for im in images]
    small_targets = [{**t, "masks": t["masks"][:, :100, :100]} for t in targets]
    with pytest.raises(ValueError, match="drawn for images of sizes"):
        cp(small, small_targets, segments=segments)


def test_segments_travel_as_one_buffer(train_bank):
    import pickle

    cp = CopyPaste(train_bank, num_pastes=(4, 4))
    segments = cp.fetch(3, torch.Generator().manual_seed(5))
    payload = sum(r.numel() for r in segments.rgba)
    blob = pickle.dumps(segments)
    assert len(blob) < 1.1 * payload + 20_000  # not one copy of the buffer per segment
    back = pickle.loads(blob)
    assert all(torch.equal(a, b) for a, b in zip(segments.rgba, back.rgba))
    moved = segments.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(segments.rgba, moved.rgba))
