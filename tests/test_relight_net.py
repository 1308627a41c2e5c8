"""The relighting net (relight/net.py, relight/family.py): identity start, its CPU window path and its
accelerator pixel path agree, compiled and bfloat16 paths against eager, fallbacks, shipped weights,
and the caller's module never moved."""

from __future__ import annotations

import socket
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sos_aug.ops import backends
from sos_aug.relight import LabBlend, ReinhardTransfer, RelightBatch, RelightNet, relight
from sos_aug.relight.family import N_PARAMS, apply_family, identity


def test_family_identity_and_net_starts_as_identity(pasted):
    x = torch.rand(3, 3, 20, 30)
    assert torch.allclose(apply_family(identity(3), x), x, atol=1e-6)
    batch = pasted[0]
    out = relight(RelightNet(), batch)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, batch.images))
    assert sum(p.numel() for p in RelightNet().parameters()) < 1_000_000


def test_pixel_form_of_the_family_agrees_with_it():
    """The per-pixel form (accelerators' torch path) computes apply_family."""
    from sos_aug.relight.family import GRID, apply_family_pixels

    g = torch.Generator().manual_seed(3)
    params, rgb = torch.randn(2, N_PARAMS, generator=g) * 0.3, torch.rand(2, 3, 20, 30, generator=g)
    reference = apply_family(params, rgb, (41, 57, 6, 9))
    ys, xs = torch.meshgrid(torch.arange(20), torch.arange(30), indexing="ij")
    uv = torch.stack([(xs + 9) * (GRID - 1) / 56, (ys + 6) * (GRID - 1) / 40], -1).reshape(-1, 2).repeat(2, 1)
    sample = torch.arange(2).repeat_interleave(600)
    pixels = apply_family_pixels(params, rgb.permute(0, 2, 3, 1).reshape(-1, 3), sample, uv.float())
    assert torch.allclose(pixels, reference.permute(0, 2, 3, 1).reshape(-1, 3), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels-last"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_cpu_kernel_applies_the_family_to_mask_pixels_only(dtype, channels_last, seed):
    """The CPU's compiled loop (:func:`relight_segments`) gives apply_family's values (clipped) on
    each segment's mask pixels, over random parameters, boxes, masks and context windows (a box at
    the image's edges too): float within 1e-5, uint8 within one level; every other pixel untouched."""
    from sos_aug.relight.cpu_kernel import net_coefficients, relight_segments, writable_copy

    g = torch.Generator().manual_seed(seed)
    h, w = 48, 64
    image = torch.rand(3, h, w, generator=g)
    if dtype == torch.uint8:
        image = (image * 255).round().to(torch.uint8)
    if channels_last:
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    params = torch.randn(3, N_PARAMS, generator=g) * 0.4
    corners = torch.randint(0, 40, (3, 2), generator=g)
    boxes = torch.cat([corners, corners + torch.randint(1, 30, (3, 2), generator=g)], 1)
    boxes[2] = torch.tensor([0, 0, w, h])  # the whole image
    boxes[:, 2:] = torch.minimum(boxes[:, 2:], torch.tensor([w, h]))
    grow = torch.randint(0, 12, (3, 4), generator=g) * torch.tensor([-1, -1, 1, 1])
    ctx = (boxes + grow).clamp(min=0).float()
    masks = torch.rand(3, h, w, generator=g) > 0.4
    for m, (x0, y0, x1, y1) in zip(masks, boxes.tolist()):  # pixels in the box only, disjoint
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        m &= inside
    masks[1] &= ~masks[0]
    masks[2] &= ~(masks[0] | masks[1])
    jobs = torch.cat([torch.arange(3)[:, None], boxes], 1).numpy()
    out = writable_copy(image)
    relight_segments(out, masks, jobs, net_coefficients(params, ctx))
    assert out.stride() == image.stride()
    unit = image.float() / (255 if dtype == torch.uint8 else 1)
    covered = masks.any(0)
    assert torch.equal(out[:, ~covered], image[:, ~covered])
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cx0, cy0, cx1, cy1 = ctx[k].int().tolist()
        within = (cy1 - cy0, cx1 - cx0, y0 - cy0, x0 - cx0)
        expected = apply_family(params[k : k + 1], unit[None, :, y0:y1, x0:x1], within)[0].clamp(0, 1)
        got, on = out[:, y0:y1, x0:x1].float(), masks[k, y0:y1, x0:x1]
        if dtype == torch.uint8:
            assert ((got - (expected * 255).round()).abs()[:, on] <= 1).all()
        else:
            assert ((got - expected).abs()[:, on] <= 1e-5).all()


def constant_net(seed: int = 0) -> RelightNet:
    """A net whose prediction ignores its input (random last-layer bias only): both application paths
    must then produce the same pixels."""
    net = RelightNet().eval()
    with torch.no_grad():
        net.head[-1].bias.copy_(torch.randn(N_PARAMS, generator=torch.Generator().manual_seed(seed)) * 0.2)
    return net


def alpha_only_net(seed: int = 0) -> RelightNet:
    """A net that sees only the segments' alpha windows (weights on the RGB planes and on the colour
    statistics zeroed): each segment gets its own parameters, whatever the convolutions' precision
    (the Triton kernel's test compares paths with it)."""
    g = torch.Generator().manual_seed(seed)
    net = RelightNet().eval()
    with torch.no_grad():
        net.encoder[0][0].weight[:, :4] = 0  # RGB and lightness planes; alpha is plane 4
        net.head[0].weight[:, -12:] = 0  # the Lab statistics
        net.head[-1].weight.copy_(torch.randn(net.head[-1].weight.shape, generator=g) * 0.05)
        net.head[-1].bias.copy_(torch.randn(N_PARAMS, generator=g) * 0.2)
    return net


@pytest.mark.parametrize("as_uint8", [False, True])
def test_pixel_path_applies_the_same_transform_as_the_window_path(pasted, as_uint8, monkeypatch):
    """The accelerator path (one pass over a batch of several images) against the CPU path (window
    by window), run here on the CPU with the shipped net (float32 convolutions in both; both sample
    the same windows): same pixels up to float rounding, background identical, pasted pixels moved."""
    from sos_aug.relight.net import relight_group, relight_windows

    monkeypatch.setenv("SOS_AUG_CPU_BF16", "0")
    batch = pasted[0]
    h, w = (min(im.shape[i] for im in batch.images) for i in (1, 2))  # one size: a (2, 3, h, w) batch
    imgs = [im[:, :h, :w] for im in batch.images]
    if as_uint8:
        imgs = [(im * 255).round().to(torch.uint8) for im in imgs]
    masks = [m[:, :h, :w] for m in batch.masks]
    batch = RelightBatch(imgs, imgs, [m[m.flatten(1).any(1)] for m in masks])
    net = RelightNet.pretrained()
    windows = relight_windows(net, batch)
    with torch.no_grad():
        pixels = relight_group(net, torch.stack(imgs), batch.masks)
    for a, b, plain, masks in zip(windows, pixels, batch.images, batch.masks):
        covered = masks.any(0)
        assert torch.equal(b[:, ~covered], plain[:, ~covered]) and torch.equal(a[:, ~covered], plain[:, ~covered])
        tol = 1 if as_uint8 else 1e-5
        assert (a.float() - b.float()).abs().max() <= tol
        assert (b[:, covered].float() - plain[:, covered].float()).abs().mean() > (0.1 if as_uint8 else 1e-3)


@pytest.mark.parametrize("layout", ["float", "uint8", "uint8 channels-last"])
def test_net_sees_the_windows_training_showed_it(pasted, layout):
    """The net's windows are each crop resized as training resizes it (bilinear, align_corners=False,
    no antialiasing), windows larger and smaller than INPUT alike: on accelerators by four gathers
    per window (any memory layout, float within 1e-5), on the CPU by the resize itself (uint8 crops
    by torch's uint8 kernel, fixed-point: within one level)."""
    import torch.nn.functional as F

    from sos_aug.relight.net import INPUT, context_boxes, resized_windows, window_samples

    batch = pasted[0]
    image = batch.images[0]
    if layout != "float":
        image = (image * 255).round().to(torch.uint8)
    if layout == "uint8 channels-last":  # what torchvision's uint8 resize returns
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    ctx = context_boxes(batch.masks[0])
    assert (ctx[:, 2:] - ctx[:, :2] > INPUT).any() and (ctx[:, 2:] - ctx[:, :2] < INPUT).any()
    windows = window_samples(image[None], torch.zeros(len(ctx), dtype=torch.long), ctx)
    on_cpu = resized_windows(image, ctx)  # uint8 crops by the uint8 kernel: fixed-point, rounded to levels
    unit = image.float() / 255 if image.dtype == torch.uint8 else image
    for k, (x0, y0, x1, y1) in enumerate(ctx.long().tolist()):
        expected = F.interpolate(unit[None, :, y0:y1, x0:x1], size=(INPUT, INPUT), mode="bilinear",
                                 align_corners=False)[0]
        assert torch.allclose(windows[k], expected, atol=1e-5), k
        assert (on_cpu[k] - expected).abs().max() <= (1 / 255 + 1e-5 if image.dtype == torch.uint8 else 1e-5), k


def test_a_failing_compile_falls_back_to_eager(pasted, no_compiler):
    """On accelerators the pixel pass is compiled; if the compiler fails, the result is the eager one
    with a warning, and the compiler is not tried again."""
    from sos_aug.relight import net as net_module

    batch = pasted[0]
    args = _pixel_args(net_module, batch.images[0][None], [batch.masks[0]])
    pass_for_gpu = net_module.pixel_pass(torch.device("cuda"))  # a key only: nothing runs on a GPU here
    with pytest.warns(UserWarning, match="torch.compile failed"):
        first = pass_for_gpu(*args)
    assert backends.COMPILED["cuda"] is net_module.relight_pixels_torch
    assert torch.equal(first, net_module.relight_pixels_torch(*args))


@pytest.mark.parametrize("layout", ["uint8", "uint8 channels-last", "float"])
def test_compiled_cpu_path_relights_like_the_eager_one(pasted, layout, monkeypatch):
    """``RelightNet(compile_cpu=True)`` (the net's forward compiled, input features fused) gives the
    eager CPU path's pixels (its convolutions kept in float32 here): uint8 within one level, float
    within 1e-5, and every pixel outside the pasted masks bit-identical."""
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
    assert net_module._FORWARDS[net] != net._forward  # the compiled forward ran
    for a, b, plain, masks in zip(relight(RelightNet.pretrained(), batch), compiled, images, batch.masks):
        covered = masks.any(0)
        assert torch.equal(b[:, ~covered], plain[:, ~covered])
        assert torch.equal(a[:, ~covered], plain[:, ~covered])
        assert (a.float() - b.float()).abs().max() <= (1 if a.dtype == torch.uint8 else 1e-5)
        assert (b[:, covered].float() - plain[:, covered].float()).abs().mean() > 1e-3


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
    """The alpha windows (one gather over contiguous masks, indexing otherwise; all masks or chosen
    rows) are each mask sampled at the centres of INPUT x INPUT cells over its context window."""
    from sos_aug.relight.net import INPUT, alpha_windows, context_boxes

    masks = pasted[0].masks[0]
    ctx = context_boxes(masks)
    windows = alpha_windows(masks, ctx)
    strided = masks.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not strided.is_contiguous() and torch.equal(alpha_windows(strided, ctx), windows)
    rows = torch.tensor([len(masks) - 1, 0])  # a subset, sampled without copying it out
    assert torch.equal(alpha_windows(masks, ctx[rows], rows), windows[rows])
    assert torch.equal(alpha_windows(strided, ctx[rows], rows), windows[rows])
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
                relit = net_module.relight_group(compiled_net, images, image_masks)
        assert not [w for w in caught if "torch.compile failed" in str(w.message)]
        graphs.append(counters["stats"]["unique_graphs"])
        eager = net_module.relight_group(eager_net, images, image_masks)
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
    compiled = [RelightNet.pretrained(compile_cpu=True), LabBlend()]
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
        # the same windows on both; bfloat16 convolutions on some CPUs, TF32 or compiled ones on the GPU
        assert (a[:, covered] - b[:, covered]).abs().mean() < 0.005
    const = constant_net(1)
    exact_cpu, exact_gpu = relight(const, batch), relight(const, gpu_batch)
    assert all((a - b.cpu()).abs().max() < 1e-4 for a, b in zip(exact_cpu, exact_gpu))
    chain_cpu, chain_gpu = relight([const, LabBlend()], batch), relight([const, LabBlend()], gpu_batch)
    assert all((a - b.cpu()).abs().max() < 1e-3 for a, b in zip(chain_cpu, chain_gpu))
    transfer_cpu, transfer_gpu = relight(ReinhardTransfer(), batch), relight(ReinhardTransfer(), gpu_batch)
    assert all((a - b.cpu()).abs().max() < 1e-3 for a, b in zip(transfer_cpu, transfer_gpu))


def test_shipped_weights_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    net = RelightNet.pretrained()
    assert not all(float(p.detach().abs().sum()) == 0 for p in net.head[-1].parameters())  # trained


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
