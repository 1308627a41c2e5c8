"""Relighting: identity start, untouched background, determinism, shipped weights, metrics on a
hand-computed case, the distillation plumbing with a tiny random teacher, and CopyPaste integration."""

from __future__ import annotations

import math
import socket
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sos_aug import CopyPaste
from sos_aug.ops import backends
from sos_aug.relight import LabBlend, ReinhardTransfer, RelightBatch, RelightNet, relight
from sos_aug.relight.evaluate import metrics
from sos_aug.relight.family import N_PARAMS, apply_family, fit_family, identity
from sos_aug.relight.perturb import parametric


@pytest.fixture(scope="module")
def pasted(train_bank, val_set):
    """Two real val images with real bank segments pasted (hard alpha), as float batches."""
    cp = CopyPaste(train_bank, num_pastes=(5, 5))
    images, targets = zip(*[val_set[i] for i in range(2)])
    out, out_targets = cp(list(images), list(targets), generator=torch.Generator().manual_seed(0))
    plain = [im.as_subclass(torch.Tensor).float() / 255 for im in out]
    masks = [t["masks"].as_subclass(torch.Tensor)[t["is_pasted"]] for t in out_targets]
    return RelightBatch(plain, plain, masks), images, targets


def test_family_identity_and_net_starts_as_identity(pasted):
    x = torch.rand(3, 3, 20, 30)
    assert torch.allclose(apply_family(identity(3), x), x, atol=1e-6)
    batch = pasted[0]
    out = relight(RelightNet(), batch)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, batch.images))
    assert sum(p.numel() for p in RelightNet().parameters()) < 1_000_000


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


def test_inference_and_pixel_forms_of_the_family_agree_with_it():
    """The table form (CPU windows) and the per-pixel form (accelerators) compute apply_family."""
    from sos_aug.relight.family import GRID, apply_family_pixels, apply_tables, family_tables, shading_weights

    g = torch.Generator().manual_seed(3)
    params, rgb = torch.randn(2, N_PARAMS, generator=g) * 0.3, torch.rand(2, 3, 20, 30, generator=g)
    within = (41, 57, 6, 9)
    reference = apply_family(params, rgb, within)
    tables = family_tables(params)
    for row in range(2):
        assert torch.allclose(apply_tables(tables, row, rgb[row].clone(), within), reference[row], atol=1e-5)
    scaled = apply_tables(family_tables(params, 1 / 255, 255), 1, rgb[1] * 255, within) / 255
    assert torch.allclose(scaled, reference[1], atol=1e-5)
    # shading weights made for many boxes at once (degenerate sizes too) are each box's own
    boxes = [(1, 1, 0, 0, 1, 1), (41, 57, 6, 9, 20, 30), (7, 300, 6, 0, 1, 300), (20, 30, 0, 0, 20, 30)]
    for box, weights in zip(boxes, shading_weights(boxes, params)):
        part = torch.rand(3, *box[4:], generator=g)
        expected = apply_family(params[:1], part[None], box[:4])[0]
        assert torch.allclose(apply_tables(tables, 0, part, box[:4], weights), expected, atol=1e-5)
    ys, xs = torch.meshgrid(torch.arange(20), torch.arange(30), indexing="ij")
    uv = torch.stack([(xs + 9) * (GRID - 1) / 56, (ys + 6) * (GRID - 1) / 40], -1).reshape(-1, 2).repeat(2, 1)
    sample = torch.arange(2).repeat_interleave(600)
    pixels = apply_family_pixels(params, rgb.permute(0, 2, 3, 1).reshape(-1, 3), sample, uv.float())
    assert torch.allclose(pixels, reference.permute(0, 2, 3, 1).reshape(-1, 3), atol=1e-5)


def constant_net(seed: int = 0) -> RelightNet:
    """A net whose prediction ignores its input (random last-layer bias only): both application paths
    must then produce the same pixels."""
    net = RelightNet().eval()
    with torch.no_grad():
        net.head[-1].bias.copy_(torch.randn(N_PARAMS, generator=torch.Generator().manual_seed(seed)) * 0.2)
    return net


def alpha_only_net(seed: int = 0) -> RelightNet:
    """A net that sees only the segments' alpha windows (weights on the RGB planes and on the colour
    statistics zeroed): each segment gets its own parameters, the same on both application paths,
    which sample the alpha windows identically (they see the RGB through different resamplers)."""
    g = torch.Generator().manual_seed(seed)
    net = RelightNet().eval()
    with torch.no_grad():
        net.encoder[0][0].weight[:, :4] = 0  # RGB and lightness planes; alpha is plane 4
        net.head[0].weight[:, -12:] = 0  # the Lab statistics
        net.head[-1].weight.copy_(torch.randn(net.head[-1].weight.shape, generator=g) * 0.05)
        net.head[-1].bias.copy_(torch.randn(N_PARAMS, generator=g) * 0.2)
    return net


@pytest.mark.parametrize("as_uint8", [False, True])
def test_pixel_path_applies_the_same_transform_as_the_window_path(pasted, as_uint8):
    """The accelerator path (one pass over a batch of several images) against the CPU path (window
    by window), run here on the CPU: same pixels up to float rounding, background identical."""
    from sos_aug.relight.net import _relight_group, _relight_windows

    batch = pasted[0]
    h, w = (min(im.shape[i] for im in batch.images) for i in (1, 2))  # one size: a (2, 3, h, w) batch
    imgs = [im[:, :h, :w] for im in batch.images]
    if as_uint8:
        imgs = [(im * 255).round().to(torch.uint8) for im in imgs]
    batch = RelightBatch(imgs, imgs, [m[:, :h, :w] for m in batch.masks])
    net = alpha_only_net()
    windows = _relight_windows(net, batch)
    pixels = _relight_group(net, torch.stack(imgs), batch.masks)
    for a, b, plain, masks in zip(windows, pixels, batch.images, batch.masks):
        covered = masks.any(0)
        assert torch.equal(b[:, ~covered], plain[:, ~covered])
        tol = 1 if as_uint8 else 1e-5
        assert (a.float() - b.float()).abs().max() <= tol
        assert (b[:, covered].float() - plain[:, covered].float()).abs().mean() > 1e-3


@pytest.mark.parametrize("as_uint8", [False, True])
def test_lab_blend_pixel_path_equals_its_window_path(pasted, as_uint8):
    """LabBlend's accelerator path (all pasted pixels of a batch at once, elementwise Lab) against
    its CPU path (Lab by matrix products): float within 1e-4, uint8 within one level."""
    batch = pasted[0]
    blend = LabBlend()
    g = torch.Generator().manual_seed(0)
    for image, masks in zip(batch.images, batch.masks):
        relit = (image * 0.8 + 0.1 * torch.rand(image.shape, generator=g)).clamp(0, 1)  # something to blend toward
        if as_uint8:
            image, relit = ((x * 255).round().to(torch.uint8) for x in (image, relit))
        windows = blend._blend_windows(relit, image, masks)
        pixels = blend._blend_pixels(relit[None], image[None], [masks])[0]
        assert (windows.float() - pixels.float()).abs().max() <= (1 if as_uint8 else 1e-4)
        covered = masks.any(0)
        assert torch.equal(pixels[:, ~covered], relit[:, ~covered])


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
    pixels = transfer._transfer_pixels(torch.stack(images), torch.stack(plain), masks)
    for image, plain_image, m, got in zip(images, plain, masks, pixels):
        want = transfer._transfer_windows(image, plain_image, m)
        assert (want.float() - got.float()).abs().max() <= (1 if as_uint8 else 1e-4)
        covered = m.any(0)
        assert torch.equal(got[:, ~covered], image[:, ~covered])
        assert (got[:, covered].float() - image[:, covered].float()).abs().mean() > 1e-3
    assert torch.equal(pixels[1][:, walled], images[1][:, walled])  # its ring is empty: left as it was


@pytest.mark.parametrize("relighter", [LabBlend(), ReinhardTransfer(strength=0.8)], ids=["lab_blend", "reinhard"])
def test_classical_cpu_paths_read_and_write_channels_last_images(pasted, relighter):
    """The classical CPU paths gather and write pixels straight in the images' memory: channels-last
    uint8 images (what torchvision's uint8 resize returns) come out exactly as planar ones do, and
    stay channels-last; given the masks' tight boxes (as CopyPaste passes them), the same again."""
    batch = pasted[0]
    plain = [(im * 255).round().to(torch.uint8) for im in batch.images]
    relit = [(im.float() * 0.8).to(torch.uint8) for im in plain]  # the composite differs from the plain image

    def interleaved(images):
        return [im.permute(1, 2, 0).contiguous().permute(2, 0, 1) for im in images]

    from sos_aug.ops.masks import tight_boxes

    planar_out = relighter(RelightBatch(relit, plain, batch.masks, relit=True))
    interleaved_out = relighter(RelightBatch(interleaved(relit), interleaved(plain), batch.masks, relit=True))
    with_boxes = relighter(RelightBatch(relit, plain, batch.masks, [tight_boxes(m) for m in batch.masks],
                                        relit=True))
    for a, b, c, before, masks in zip(planar_out, interleaved_out, with_boxes, relit, batch.masks):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert b.stride() == (1, 3 * b.shape[2], 3)
        covered = masks.any(0)
        assert torch.equal(b[:, ~covered], before[:, ~covered])
        assert (b[:, covered] != before[:, covered]).float().mean() > 0.1


@pytest.fixture
def no_compiler(monkeypatch):
    """``torch.compile`` whose compiled functions fail when called, as a missing C++ compiler does."""
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(backends, "COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)


def test_a_failing_compile_falls_back_to_eager(pasted, no_compiler):
    """On accelerators the pixel pass is compiled; if the compiler fails, the result is the eager one
    with a warning, and the compiler is not tried again."""
    from sos_aug.relight import net as net_module

    batch = pasted[0]
    args = _pixel_args(net_module, batch.images[0][None], [batch.masks[0]])
    pass_for_gpu = net_module._pixel_pass(torch.device("cuda"))  # a key only: nothing runs on a GPU here
    with pytest.warns(UserWarning, match="torch.compile failed"):
        first = pass_for_gpu(*args)
    assert backends.COMPILED["cuda"] is net_module._relight_pixels
    assert torch.equal(first, net_module._relight_pixels(*args))


@pytest.mark.parametrize("layout", ["uint8", "uint8 channels-last", "float"])
def test_compiled_cpu_path_relights_like_the_eager_one(pasted, layout, monkeypatch):
    """``RelightNet(compile_cpu=True)`` (each box in one compiled loop, the net's input features
    compiled) gives the eager CPU path's pixels (its convolutions kept in float32 here): uint8 within
    one level, float within 1e-5, and every pixel outside the pasted masks bit-identical."""
    monkeypatch.setenv("SOS_AUG_CPU_BF16", "0")
    batch = pasted[0]
    images = batch.images
    if layout != "float":
        images = [(im * 255).round().to(torch.uint8) for im in images]
    if layout == "uint8 channels-last":  # what torchvision's uint8 resize returns
        images = [im.permute(1, 2, 0).contiguous().permute(2, 0, 1) for im in images]
    from sos_aug.relight import net as net_module

    batch = RelightBatch(images, images, batch.masks)
    net = RelightNet.pretrained(compile_cpu=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = relight(net, batch)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert backends.COMPILED["cpu:box"] is not net_module._relight_box  # the compiled paths ran
    assert net_module._FORWARDS[net] != net._forward
    for a, b, plain, masks in zip(relight(RelightNet.pretrained(), batch), compiled, images, batch.masks):
        covered = masks.any(0)
        assert torch.equal(b[:, ~covered], plain[:, ~covered])
        assert torch.equal(a[:, ~covered], plain[:, ~covered])
        assert (a.float() - b.float()).abs().max() <= (1 if a.dtype == torch.uint8 else 1e-5)
        assert (b[:, covered].float() - plain[:, covered].float()).abs().mean() > 1e-3


def test_colour_conversions_match_kornia():
    """The Lab conversions written for the compiler (elementwise) and for eager runs (matrix
    products, the cube root's knee as a minimum, uint8 linearised by lookup) against kornia's, knees
    and extremes included."""
    from sos_aug.relight.color import (
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


@pytest.mark.parametrize("as_uint8", [True, False])
def test_compiled_lab_blend_blends_like_the_eager_one(pasted, as_uint8):
    """``LabBlend(compile_cpu=True)`` (each box in one compiled loop, Lab written out with exp/log
    powers) against the eager LabBlend: uint8 within one level, float within 1e-4, background
    bit-identical."""
    batch = pasted[0]
    plain = [(im * 255).round().to(torch.uint8) for im in batch.images] if as_uint8 else batch.images
    relit = [(im.float() * 0.8 + 20).round().to(torch.uint8) if as_uint8 else (im * 0.8 + 0.08) for im in plain]
    relit = [torch.where(m.any(0), r, p) for r, p, m in zip(relit, plain, batch.masks)]  # relit under masks only
    step = RelightBatch(relit, plain, batch.masks, relit=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = LabBlend(compile_cpu=True)(step)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    for a, b, p, masks in zip(LabBlend()(step), fused, plain, batch.masks):
        covered = masks.any(0)
        assert torch.equal(b[:, ~covered], p[:, ~covered])
        assert (a.float() - b.float()).abs().max() <= (1 if as_uint8 else 1e-4)


@pytest.mark.parametrize("as_uint8", [True, False])
def test_bfloat16_convolutions_relight_like_float32_ones(pasted, as_uint8, monkeypatch):
    """Eager CPU inference convolves in bfloat16 where the CPU has it natively (float32 elsewhere,
    or with ``SOS_AUG_CPU_BF16=0``): the relit pixels stay within a few uint8 levels of float32's,
    the background untouched."""
    from sos_aug.relight.net import cpu_has_bf16

    batch = pasted[0]
    if as_uint8:
        images = [(im * 255).round().to(torch.uint8) for im in batch.images]
        batch = RelightBatch(images, images, batch.masks)
    net = RelightNet.pretrained()
    native = cpu_has_bf16(torch.device("cpu"))
    fast = relight(net, batch)
    monkeypatch.setenv("SOS_AUG_CPU_BF16", "0")
    assert not cpu_has_bf16(torch.device("cpu")) and not cpu_has_bf16(torch.device("cuda"))
    exact = relight(net, batch)
    scale = 255 if as_uint8 else 1
    for a, b, plain, masks in zip(fast, exact, batch.images, batch.masks):
        covered = masks.any(0)
        assert torch.equal(a[:, ~covered], plain[:, ~covered])
        diff = (a.float() - b.float()).abs() / scale
        assert diff.max() <= 3 / 255 and diff[:, covered].mean() <= 0.2 / 255
        assert native or torch.equal(a, b)  # without native bfloat16, float32 all along


def test_alpha_windows_sample_each_mask_at_its_cells_centres(pasted):
    """The alpha windows (one gather over contiguous masks, indexing otherwise) are each mask sampled
    at the centres of INPUT x INPUT cells over its context window."""
    from sos_aug.relight.net import INPUT, _alpha_windows, context_boxes

    masks = pasted[0].masks[0]
    ctx = context_boxes(masks)
    windows = _alpha_windows(masks, ctx)
    strided = masks.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not strided.is_contiguous() and torch.equal(_alpha_windows(strided, ctx), windows)
    centres = (torch.arange(INPUT, dtype=ctx.dtype) + 0.5) / INPUT  # in the windows' float32, as sampled
    for k, (x0, y0, x1, y1) in enumerate(ctx):
        ys = (y0 + centres * (y1 - y0)).long().clamp(max=masks.shape[1] - 1)
        xs = (x0 + centres * (x1 - x0)).long().clamp(max=masks.shape[2] - 1)
        assert torch.equal(windows[k, 0], masks[k][ys][:, xs].float())


def test_compiled_windows_and_forward_match_the_eager_ones(pasted, monkeypatch):
    """The accelerator path's windows and forward as one compiled graph (compiled here for the CPU
    through ``compile_cpu``): the eager path's pixels (uint8 within one level, float within 1e-5),
    the background bit-identical, and no new graph for another image size or segment count (a batch
    of one image would compile one more: the compiler specialises sizes of 1)."""
    from torch._dynamo.utils import counters

    from sos_aug.relight import net as net_module

    monkeypatch.setenv("SOS_AUG_CPU_BF16", "0")
    batch = pasted[0]
    h, w = (min(im.shape[i] for im in batch.images) for i in (1, 2))
    floats = torch.stack([im[:, :h, :w] for im in batch.images])
    masks = [m[:, :h, :w] for m in batch.masks]
    as_uint8 = (floats * 255).round().to(torch.uint8)
    cropped = [m[:, 5 : h - 32, 9 : w - 12] for m in masks]
    cropped = [m[m.flatten(1).any(1)][:k] for m, k in zip(cropped, (2, 3))]  # segments with pixels in the crop
    smaller = (as_uint8[:, :, 5 : h - 32, 9 : w - 12], cropped)
    compiled_net, eager_net = RelightNet.pretrained(compile_cpu=True), RelightNet.pretrained()
    graphs = []
    for images, image_masks in ((as_uint8, masks), smaller, (floats, masks)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():  # as relighting runs
                relit = net_module._relight_group(compiled_net, images, image_masks)
        assert not [w for w in caught if "torch.compile failed" in str(w.message)]
        graphs.append(counters["stats"]["unique_graphs"])
        eager = net_module._relight_group(eager_net, images, image_masks)
        covered = torch.stack([m.any(0) for m in image_masks])[:, None].expand_as(images)
        assert torch.equal(relit[~covered], images[~covered])
        assert (relit.double() - eager.double()).abs().max() <= (1 if images.dtype == torch.uint8 else 1e-5)
        assert (relit[covered].double() - images[covered].double()).abs().mean() > 1e-3
    assert net_module._GROUPS[compiled_net] is not net_module._GROUPS.get(eager_net)
    assert graphs[1] == graphs[0], "another size, image count or segment count compiled a new graph"


def test_a_failing_cpu_compile_falls_back_to_the_eager_path(pasted, no_compiler, monkeypatch):
    """With ``compile_cpu`` and no working compiler, relighting warns and gives the eager pixels.
    Float32 convolutions: oneDNN's bfloat16 ones (CPUs with AVX512-BF16/AMX) pick kernels by memory
    layout, so two eager bfloat16 runs need not agree to the bit."""
    monkeypatch.setenv("SOS_AUG_CPU_BF16", "0")
    batch = pasted[0]
    compiled = [RelightNet.pretrained(compile_cpu=True), LabBlend(compile_cpu=True)]
    with pytest.warns(UserWarning, match="torch.compile failed"):
        out = relight(compiled, batch)
    for a, b in zip(out, relight([RelightNet.pretrained(), LabBlend()], batch)):
        assert torch.equal(a, b)


def _pixel_args(net_module, image, masks):
    from sos_aug.ops.masks import tight_boxes

    segs = torch.cat(masks)
    ctx = net_module.context_boxes(segs, tight_boxes(segs))
    params = torch.randn(len(segs), N_PARAMS, generator=torch.Generator().manual_seed(0)) * 0.1
    seg, y, x = segs.nonzero(as_tuple=True)
    return image.float(), params, ctx, torch.zeros(len(segs), dtype=torch.long), seg, y, x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_net_relights_on_gpu_like_on_cpu(pasted):
    batch = pasted[0]
    net = RelightNet.pretrained()
    cpu = relight(net, batch)
    gpu_batch = RelightBatch([im.cuda() for im in batch.images], [im.cuda() for im in batch.plain],
                             [m.cuda() for m in batch.masks])
    with warnings.catch_warnings(record=True) as caught:  # the forward and the pixel pass compile there
        warnings.simplefilter("always")
        gpu = relight(net, gpu_batch)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    for a, b, plain, masks in zip(cpu, gpu, batch.plain, batch.masks):
        covered = masks.any(0)
        b = b.cpu()
        assert torch.equal(b[:, ~covered], plain[:, ~covered])
        # the net sees roi_align windows on the GPU and antialiased crops on the CPU: close, not equal
        assert (a[:, covered] - b[:, covered]).abs().mean() < 0.02
    const = constant_net(1)
    exact_cpu, exact_gpu = relight(const, batch), relight(const, gpu_batch)
    assert all((a - b.cpu()).abs().max() < 1e-4 for a, b in zip(exact_cpu, exact_gpu))
    chain_cpu, chain_gpu = relight([const, LabBlend()], batch), relight([const, LabBlend()], gpu_batch)
    assert all((a - b.cpu()).abs().max() < 1e-3 for a, b in zip(chain_cpu, chain_gpu))
    transfer_cpu, transfer_gpu = relight(ReinhardTransfer(), batch), relight(ReinhardTransfer(), gpu_batch)
    assert all((a - b.cpu()).abs().max() < 1e-3 for a, b in zip(transfer_cpu, transfer_gpu))


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


def test_shipped_weights_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    net = RelightNet.pretrained()
    assert not all(float(p.detach().abs().sum()) == 0 for p in net.head[-1].parameters())  # trained


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


def test_parametric_perturbation_leaves_background(pasted):
    x = torch.rand(2, 3, 16, 16)
    alpha = torch.zeros(2, 1, 16, 16)
    alpha[:, :, 4:10, 4:10] = 1
    y = parametric(x, alpha, torch.Generator().manual_seed(0))
    assert torch.equal(y[:, :, alpha[0, 0] == 0], x[:, :, alpha[0, 0] == 0])


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


def _tiny_iclight(path, in_channels: int = 8):
    """A tiny random IC-Light directory (or, with ``in_channels=4``, a tiny "SD 1.5" one)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install '.[diffusers]')")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    diffusers.DDIMScheduler(num_train_timesteps=100).save_pretrained(path / "scheduler")
    torch.save(torch.zeros(1, 77, 32), path / "prompt_embeds.pt")
    return path


@pytest.mark.slow
def test_distillation_plumbing_with_a_tiny_random_teacher(tmp_path, train_ann, coco_mini):
    from sos_aug.relight.teacher import ICLightTeacher
    from sos_aug.relight.train import _make_targets, train_relight_net

    teacher = ICLightTeacher.from_local(_tiny_iclight(tmp_path / "iclight"), steps=3)
    images = torch.rand(2, 3, 32, 32)
    alpha = torch.zeros(2, 1, 32, 32)
    alpha[:, :, 8:24, 8:24] = 1
    refs = torch.tensor([[50.0, 10, 10, 20, 10, 10]] * 2)
    composite, a, target = _make_targets(images, alpha, refs, torch.Generator().manual_seed(0), teacher)
    assert torch.equal(target[:, :, alpha[0, 0] == 0], composite[:, :, alpha[0, 0] == 0])
    assert not torch.allclose(target, composite)  # the teacher's fitted relighting, not the identity
    out = tmp_path / "student.pt"
    report = train_relight_net(train_ann, coco_mini / "train2017", out, minutes=5, teacher=teacher, batch=2,
                               size=32, max_steps=2, progress=False)
    assert report.steps == 2 and out.is_file() and out.with_suffix(".png").is_file()
    assert isinstance(RelightNet.load(out), RelightNet)


def test_an_incomplete_teacher_directory_is_named_before_diffusers_looks_online(tmp_path):
    from sos_aug.relight.teacher import ICLightTeacher

    path = _tiny_iclight(tmp_path / "iclight")
    assert ICLightTeacher.from_local(path, steps=1).steps == 1
    (path / "prompt_embeds.pt").unlink()
    for config in path.glob("vae/*.json"):
        config.unlink()
    with pytest.raises(FileNotFoundError, match=r"missing vae/config\.json, prompt_embeds\.pt"):
        ICLightTeacher.from_local(path)
    with pytest.raises(FileNotFoundError, match="missing the directory itself"):
        ICLightTeacher.from_local(tmp_path / "nowhere")


def test_iclight_directory_assembled_from_sd15_and_offsets(tmp_path):
    """What `sos-aug relight iclight` makes: SD 1.5's UNet with conv_in widened (new channels zero)
    plus IC-Light's offsets, every weight; the rest of SD 1.5 as it is; loadable as a teacher."""
    from safetensors.torch import save_file

    from sos_aug.cli import main
    from sos_aug.relight.teacher import ICLightTeacher

    sd15 = _tiny_iclight(tmp_path / "sd15", in_channels=4)
    import diffusers

    base = diffusers.UNet2DConditionModel.from_pretrained(sd15 / "unet").state_dict()
    shapes = {k: v.shape for k, v in base.items()}
    shapes["conv_in.weight"] = (shapes["conv_in.weight"][0], 8, *shapes["conv_in.weight"][2:])
    g = torch.Generator().manual_seed(1)
    offsets = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in shapes.items()}
    save_file(offsets, tmp_path / "iclight_sd15_fc.safetensors")
    out = tmp_path / "iclight"
    assert main(["relight", "iclight", "--sd15", str(sd15), "--offsets", str(tmp_path / "iclight_sd15_fc.safetensors"),
                 "--out", str(out)]) == 0
    merged = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    widened = torch.cat([base["conv_in.weight"], torch.zeros_like(base["conv_in.weight"])], 1)
    assert torch.allclose(merged["conv_in.weight"], widened + offsets["conv_in.weight"])
    assert all(torch.allclose(merged[k], base[k] + offsets[k]) for k in base if k != "conv_in.weight")
    assert (out / "prompt_embeds.pt").read_bytes() == (sd15 / "prompt_embeds.pt").read_bytes()
    teacher = ICLightTeacher.from_local(out, steps=1)
    relit = teacher(torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32))
    assert relit.shape == (1, 3, 32, 32) and torch.isfinite(relit).all()


def test_iclight_assembly_refuses_mismatched_offsets_and_leaves_nothing(tmp_path, capsys):
    from safetensors.torch import save_file

    from sos_aug.cli import main

    sd15 = _tiny_iclight(tmp_path / "sd15", in_channels=4)
    save_file({"conv_in.weight": torch.zeros(32, 8, 3, 3)}, tmp_path / "partial.safetensors")
    out = tmp_path / "iclight"
    args = ["relight", "iclight", "--sd15", str(sd15), "--offsets", str(tmp_path / "partial.safetensors"),
            "--out", str(out)]
    assert main(args) == 2
    assert "partial.safetensors: offsets do not match" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


def test_teacher_runs_in_the_dtype_and_device_it_is_moved_to(tmp_path):
    from sos_aug.relight.teacher import ICLightTeacher

    teacher = ICLightTeacher.from_local(_tiny_iclight(tmp_path / "iclight"), steps=2)
    composite, alpha = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    single = teacher(composite, alpha)
    double = teacher.to("cpu", torch.float64)(composite, alpha)
    assert teacher.unet.dtype == torch.float64 and double.dtype == torch.float32
    assert (single - double).abs().max() < 1e-4  # the same relighting, computed in another precision


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
    plain_cp = CopyPaste(train_bank, layout=layout, num_pastes=(1, 8), batched=batched)
    relit_cp = CopyPaste(train_bank, layout=layout, num_pastes=(1, 8), batched=batched,
                         relight=RELIGHTERS[relighter]())
    images, targets = zip(*[val_set[i % len(val_set)] for i in picks])
    if as_float:
        images = [im.as_subclass(torch.Tensor).float() / 255 for im in images]
    g = torch.Generator().manual_seed(seed)
    segments = plain_cp.fetch(len(images), g)
    params = plain_cp.make_params([tuple(im.shape[-2:]) for im in images], targets, segments, g)
    plain, plain_targets = plain_cp.apply(images, targets, segments, params)
    relit, relit_targets = relit_cp.apply(images, targets, segments, params)
    for a, b, t, u in zip(plain, relit, plain_targets, relit_targets):
        assert t.keys() == u.keys()
        assert all(torch.equal(t[k], u[k]) if torch.is_tensor(t[k]) else t[k] == u[k] for k in t)
        pasted = t["masks"][t["is_pasted"]].any(0)
        assert a.dtype == b.dtype and torch.equal(a[:, ~pasted], b[:, ~pasted])


def test_the_net_is_never_moved_behind_the_callers_back():
    """Relighting a batch on another device uses a copy of the net there, made once and remade only
    after the weights change; the caller's module stays where it was."""
    from sos_aug.relight.net import replica_on

    net = RelightNet.pretrained()
    meta = torch.device("meta")
    first = replica_on(net, meta)
    assert first is not net and next(first.parameters()).device == meta
    assert next(net.parameters()).device.type == "cpu"
    assert replica_on(net, meta) is first  # made once
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # new weights: a new copy
    assert replica_on(net, meta) is not first
    assert replica_on(net, torch.device("cpu")) is net


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
