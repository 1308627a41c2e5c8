"""The classical relighters (relight/classical.py): LabBlend and ReinhardTransfer, their CPU and
accelerator paths against each other, channels-last images, the area-rank weights, and LabBlend's
place in a chain."""

from __future__ import annotations

import pytest
import torch

from sos_aug.relight import LabBlend, ReinhardTransfer, RelightBatch


@pytest.mark.parametrize("ab", ["plain", "relit"])
@pytest.mark.parametrize("as_uint8", [False, True])
def test_lab_blend_pixel_path_equals_its_window_path(pasted, as_uint8, ab):
    """LabBlend's accelerator path (all pasted pixels of a batch at once, torch's Lab) against its
    CPU path (compiled loops, powers written out): float within 1e-4, uint8 within one level, with
    a/b from either side."""
    batch = pasted[0]
    blend = LabBlend(ab=ab)
    g = torch.Generator().manual_seed(0)
    for image, masks in zip(batch.images, batch.masks):
        relit = (image * 0.8 + 0.1 * torch.rand(image.shape, generator=g)).clamp(0, 1)  # something to blend toward
        if as_uint8:
            image, relit = ((x * 255).round().to(torch.uint8) for x in (image, relit))
        windows = blend.blend_windows(relit, image, masks)
        pixels = blend.blend_batched(relit[None], image[None], [masks])[0]
        assert (windows.float() - pixels.float()).abs().max() <= (1 if as_uint8 else 1e-4)
        covered = masks.any(0)
        assert torch.equal(pixels[:, ~covered], relit[:, ~covered])


@pytest.mark.parametrize("relit_ab", [False, True])
def test_lab_blend_arithmetic_is_kornias_lab_round_trip(relit_ab):
    """LabBlend's blend, computed in Lab's f-space, equals converting both sides to Lab with kornia,
    mixing L, taking a/b from one side and converting back; uint8 pixels as their float values."""
    import kornia

    from sos_aug.relight.classical import blend_lightness

    g = torch.Generator().manual_seed(0)
    relit, plain = torch.randint(0, 256, (2, 3, 4000), generator=g, dtype=torch.uint8)
    weight = torch.rand(4000, generator=g)
    lab_r, lab_p = (kornia.color.rgb_to_lab(x.float()[:, :, None] / 255)[:, :, 0] for x in (relit, plain))
    lab = (lab_r if relit_ab else lab_p).clone()
    lab[0] = weight * lab_r[0] + (1 - weight) * lab_p[0]
    reference = kornia.color.lab_to_rgb(lab[:, :, None], clip=True)[:, :, 0]
    assert (blend_lightness(relit, plain, weight, relit_ab) - reference).abs().max() < 1e-4
    floats = blend_lightness(relit.float() / 255, plain.float() / 255, weight, relit_ab)
    assert (floats - reference).abs().max() < 1e-4
    assert (reference - plain.float() / 255).abs().mean() > 0.01  # the blend moved the pixels


@pytest.mark.parametrize("as_uint8", [False, True])
def test_reinhard_pixel_path_equals_its_window_path(pasted, as_uint8):
    """ReinhardTransfer's accelerator path (every segment's ring and statistics at once, elementwise
    Lab) against its CPU path (segment by segment, Lab by matrix products), run here on the CPU, on a batch of
    two images cut to one size; an empty mask and a segment whose ring is too small stay untouched."""
    batch = pasted[0]
    h, w = (min(im.shape[i] for im in batch.images) for i in (1, 2))
    images = [im[:, :h, :w] for im in batch.images]
    if as_uint8:
        images = [(im * 255).round().to(torch.uint8) for im in images]
    plain = [im.clone() for im in images]
    images[0] = (images[0].float() * 0.7).to(images[0].dtype)  # the composite differs from the plain image
    walled = torch.zeros(h, w, dtype=torch.bool)  # a segment inside a closed wall: no ring pixels
    walled[2:4, 2:4] = True
    wall = torch.zeros(h, w, dtype=torch.bool)
    wall[:12, :12] = True
    wall[2:4, 2:4] = False
    masks = [torch.cat([m[:, :h, :w], torch.zeros(1, h, w, dtype=torch.bool)]) for m in batch.masks]
    masks[1] = torch.cat([masks[1] & ~(wall | walled), walled[None], wall[None]])
    transfer = ReinhardTransfer(strength=0.8)
    pixels = transfer.transfer_batched(torch.stack(images), torch.stack(plain), masks)
    for image, plain_image, m, got in zip(images, plain, masks, pixels):
        want = transfer.transfer_windows(image, plain_image, m)
        assert (want.float() - got.float()).abs().max() <= (1 if as_uint8 else 1e-4)
        covered = m.any(0)
        assert torch.equal(got[:, ~covered], image[:, ~covered])
        assert (got[:, covered].float() - image[:, covered].float()).abs().mean() > 1e-3
    assert torch.equal(pixels[1][:, walled], images[1][:, walled])  # its ring is empty: left as it was


@pytest.mark.parametrize("relighter", [LabBlend(), ReinhardTransfer(strength=0.8)], ids=["lab_blend", "reinhard"])
def test_classical_cpu_paths_read_and_write_channels_last_images(pasted, relighter):
    """The classical CPU paths gather and write pixels straight in the images' memory: channels-last
    uint8 images (what torchvision's uint8 resize returns) come out exactly as planar ones do, and
    stay channels-last; composites and plain images in different layouts, and given the masks'
    tight boxes (as CopyPaste passes them), the same again."""
    batch = pasted[0]
    plain = [(im * 255).round().to(torch.uint8) for im in batch.images]
    relit = [(im.float() * 0.8).to(torch.uint8) for im in plain]  # the composite differs from the plain image

    def interleaved(images):
        return [im.permute(1, 2, 0).contiguous().permute(2, 0, 1) for im in images]

    from sos_aug.ops.masks import tight_boxes

    planar_out = relighter(RelightBatch(relit, plain, batch.masks, relit=True))
    interleaved_out = relighter(RelightBatch(interleaved(relit), interleaved(plain), batch.masks, relit=True))
    mixed = relighter(RelightBatch(interleaved(relit), plain, batch.masks, relit=True))  # layouts differ
    assert all(torch.equal(a, b) for a, b in zip(planar_out, mixed))
    with_boxes = relighter(RelightBatch(relit, plain, batch.masks, [tight_boxes(m) for m in batch.masks],
                                        relit=True))
    for a, b, c, before, masks in zip(planar_out, interleaved_out, with_boxes, relit, batch.masks):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert b.stride() == (1, 3 * b.shape[2], 3)
        covered = masks.any(0)
        assert torch.equal(b[:, ~covered], before[:, ~covered])
        assert (b[:, covered] != before[:, covered]).float().mean() > 0.1


def test_lab_blend_weights_follow_the_area_rank():
    w = LabBlend.weights(torch.tensor([500, 10, 2000, 90]))
    order = torch.argsort(torch.tensor([500, 10, 2000, 90]))
    r = torch.linspace(0, 1, 4)
    expected = 0.3 + 0.6 * torch.sigmoid(-10 * (r - 0.5))
    assert torch.allclose(w[order], expected)
    assert w[1] > w[0] > w[2]  # the smallest segment takes the most relit lighting


def test_batch_weights_rank_each_images_segments_like_lab_blend_weights():
    """The accelerator path's weights (all images at once, no wait on the device) are the per-image
    ones, ties included (a stable sort's order)."""
    from sos_aug.relight.classical import area_rank_weights

    g = torch.Generator().manual_seed(0)
    counts = [3, 1, 0, 7, 5]
    areas = torch.randint(0, 6, (sum(counts),), generator=g)  # few values: many ties
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))

    def by_stable_sort(a: torch.Tensor) -> torch.Tensor:  # one image's weights, ranks from a stable sort
        rank = torch.empty(len(a))
        rank[torch.argsort(a, stable=True)] = torch.arange(len(a), dtype=torch.float)
        return 0.3 + 0.6 * torch.sigmoid(-10 * (rank / max(len(a) - 1, 1) - 0.5))

    expected = torch.cat([by_stable_sort(a) for a in areas.split(counts)])
    assert torch.allclose(area_rank_weights(areas, owner), expected)
    assert torch.equal(torch.cat([LabBlend.weights(a) for a in areas.split(counts)]), area_rank_weights(areas, owner))


def test_lab_blend_knows_from_the_chain_whether_the_images_were_relit(pasted):
    """LabBlend first in a chain blends toward its fallback; after another relighter it blends toward
    that one's output, even where that output is the plain composite itself (no identity test)."""
    batch = pasted[0]
    plain = [(im * 255).round().to(torch.uint8) for im in batch.images]
    alone = LabBlend()(RelightBatch(plain, plain, batch.masks))
    after_a_no_op = LabBlend()(RelightBatch(plain, plain, batch.masks, relit=True))
    assert any(not torch.equal(a, p) for a, p in zip(alone, plain))  # the fallback relit something
    for out, p in zip(after_a_no_op, plain):  # blending an image with itself leaves it (within a level)
        assert (out.int() - p.int()).abs().max() <= 1
