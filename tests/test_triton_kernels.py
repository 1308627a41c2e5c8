"""The Triton kernels (the CUDA defaults): the paste against torch's own antialiased resize, piece
by piece, on real bank segments over a real COCO image (topmost-piece map, pixels, counts and
boxes); the relight pixel pass and LabBlend against their torch paths on real instance masks.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before Triton
is first imported (``TRITON_INTERPRET=1``): those checks run in a subprocess, this file as its script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TRITON = pytest.importorskip("triton", reason="the paste kernels need Triton (it comes with CUDA builds of torch)")
CUT_BAND = 1e-3  # alpha this close to the cut is decided by float rounding order, not by the algorithm


def reference(segments, placement, image, k0: int = 0):
    """One image pasted piece by piece with torch's float resize (the CPU kernel): topmost slot map,
    undecidable pixels, the composite's pixels and each slot's (full mask, full rgb)."""
    from sos_aug.ops.masks import ALPHA_CUT
    from sos_aug.ops.resize import warp_segment
    from sos_aug.paste.geometry import clip_window

    _, height, width = image.shape
    top = torch.zeros(height, width, dtype=torch.int32)
    band = torch.zeros(height, width, dtype=torch.bool)
    pieces = {}
    for k in range(len(placement)):
        x0, y0, x1, y1 = (int(v) for v in placement.boxes[k])
        warped = warp_segment(segments[int(placement.segment[k])].float(), y1 - y0, x1 - x0,
                              bool(placement.flip[k]), 0.0)
        where = clip_window(placement.boxes[k].tolist(), y1 - y0, x1 - x0, height, width)
        if where is None:
            continue
        crop, window = where
        warped = warped[(slice(None), *crop)]
        full = torch.zeros(height, width, dtype=torch.bool)
        full[window] = warped[3] >= ALPHA_CUT
        rgb = torch.zeros(3, height, width)
        rgb[(slice(None), *window)] = warped[:3]
        band[window] |= (warped[3] - ALPHA_CUT).abs() < CUT_BAND
        top[full] = k + 1
        pieces[k] = (full, rgb)
    return top, band, pieces


def tight(mask: torch.Tensor) -> list[float]:
    from sos_aug.ops.masks import tight_boxes

    return tight_boxes(mask[None])[0].tolist()


def check_kernels(bank, image: torch.Tensor, seed: int, count: int, device: str, as_float: bool) -> int:
    """Two images, each with ``count`` pieces (one-pixel strips, pieces hanging off the canvas,
    flips): the kernels' results against :func:`reference`. Returns how many pixels were checked."""
    from test_paste_groups import draw_pieces

    from sos_aug.ops.buffers import flat_base
    from sos_aug.paste.kernel import paste_kernels

    height, width = image.shape[-2:]
    drawn = [draw_pieces(bank, seed + i, count, height, width) for i in range(2)]
    segments = drawn[0][0] + drawn[1][0]
    placements = [drawn[0][1], drawn[1][1]]
    placements[1].segment = placements[1].segment + count  # the second image's pieces follow the first's
    batch = torch.stack([image, image.flip(-1)])
    on_device = [s.to(device) for s in segments]
    given = batch.float() / 255 if as_float else batch
    layout = torch.channels_last if as_float else torch.contiguous_format  # the output is contiguous either way
    out, top, stats = paste_kernels(given.to(device).contiguous(memory_format=layout), on_device,
                                    flat_base(on_device), placements, count)
    out, top = out.cpu(), top.cpu()
    checked = 0
    for i in range(2):
        ref_top, band, pieces = reference(segments, placements[i], batch[i])
        decided = ~band
        assert torch.equal(top[i][decided], ref_top[decided]), f"seed {seed}, image {i}: topmost map differs"
        got = out[i].double() * (255 if as_float else 1)
        for k, (full, rgb) in pieces.items():
            slot = i * count + k
            visible = (ref_top == k + 1) & decided
            want = rgb[:, visible].double().round() if not as_float else rgb[:, visible].double()
            if visible.any():
                assert (got[:, visible] - want).abs().max() <= (1e-3 if as_float else 1), f"piece {k} pixels"
            checked += int(visible.sum())
            if not band[full | (ref_top == k + 1)].any():  # counts and boxes are decidable
                vis_all = ref_top == k + 1
                assert int(stats.full_count[slot]) == int(full.sum()), f"piece {k}: full count"
                assert stats.full_boxes[slot].tolist() == tight(full), f"piece {k}: full box"
                assert int(stats.visible_count[slot]) == int(vis_all.sum()), f"piece {k}: visible count"
                assert stats.visible_boxes[slot].tolist() == tight(vis_all), f"piece {k}: visible box"
        outside = ref_top == 0
        assert torch.equal(out[i][:, outside & decided], given[i][:, outside & decided].cpu()), "outside pieces"
    for k in range(len(placements[0]), count):  # no piece in these slots: zeros
        assert int(stats.full_count[k]) == 0
    return checked


def check_nothing_lands(image: torch.Tensor, segments: list[torch.Tensor], device: str) -> None:
    """No pieces at all, and pieces that all land off the canvas: the batch comes back as it was,
    with an empty topmost map and zero statistics."""
    from sos_aug.layout import Placement
    from sos_aug.ops.buffers import flat_base
    from sos_aug.paste.kernel import paste_kernels

    height, width = image.shape[-2:]
    off = torch.tensor([[-50.0, -50.0, -10.0, -10.0], [width + 5.0, 0.0, width + 40.0, 30.0]])
    for placement in (Placement(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                                torch.zeros(0)),
                      Placement(off, torch.arange(2), torch.zeros(2, dtype=torch.bool), torch.zeros(2))):
        on_device = [s.to(device) for s in segments[:2]]
        kmax = len(placement)
        out, top, stats = paste_kernels(image[None].to(device), on_device, flat_base(on_device), [placement], kmax)
        assert torch.equal(out.cpu()[0], image) and not top.any(), "nothing lands: the batch must not change"
        assert stats.full_count.tolist() == [0] * kmax and stats.visible_boxes.abs().sum() == 0


def check_relight(images: torch.Tensor, masks: list[torch.Tensor], device: str) -> int:
    """The net's relight of a batch through the kernel against the torch pixel pass (same
    parameters: a net that sees only the alpha windows, different for every segment). Returns how
    many pixels changed."""
    from test_relight_net import alpha_only_net

    from sos_aug.ops import backends
    from sos_aug.relight.net import relight_group

    net = alpha_only_net()
    on_device = images.to(device), [m.to(device) for m in masks]
    by_kernel = relight_group(net, *on_device).cpu()
    assert "relight" not in backends.FAILED, "the relight kernel failed and fell back to torch"
    backends.FAILED.add("relight")  # now the torch path
    try:
        by_torch = relight_group(net, *on_device).cpu()
    finally:
        backends.FAILED.discard("relight")
    covered = torch.stack([m.any(0) for m in masks])
    outside = ~covered.unsqueeze(1).expand_as(images)
    assert torch.equal(by_kernel[outside], images[outside]), "relight: pixels outside the masks changed"
    tolerance = 1 if images.dtype == torch.uint8 else 1e-5
    assert (by_kernel.double() - by_torch.double()).abs().max() <= tolerance, "relight: kernel and torch differ"
    return int((by_kernel != images).any(1).sum())


def check_lab_blend(images: torch.Tensor, masks: list[torch.Tensor], device: str) -> int:
    """LabBlend of a batch through the kernel against the torch path, on a relit batch (the plain
    one with its colours moved differently per image), a/b from either side. Returns how many
    pixels changed."""
    from sos_aug.ops import backends
    from sos_aug.relight import LabBlend

    scale = torch.tensor([1.25, 0.8, 0.9]).view(1, 3, 1, 1)
    relit = (images.float() * scale).clamp(0, 255 if images.dtype == torch.uint8 else 1).to(images.dtype)
    changed = 0
    for ab in ("relit", "plain"):
        blend = LabBlend(ab=ab)
        args = relit.to(device), images.to(device), [m.to(device) for m in masks]
        by_kernel = blend.blend_batched(*args).cpu()
        assert "lab_blend" not in backends.FAILED, "the LabBlend kernel failed and fell back to torch"
        backends.FAILED.add("lab_blend")  # now the torch path
        try:
            by_torch = blend.blend_batched(*args).cpu()
        finally:
            backends.FAILED.discard("lab_blend")
        outside = ~torch.stack([m.any(0) for m in masks]).unsqueeze(1).expand_as(images)
        assert torch.equal(by_kernel[outside], relit[outside]), "lab_blend: pixels outside the masks changed"
        tolerance = 1 if images.dtype == torch.uint8 else 1e-4
        assert (by_kernel.double() - by_torch.double()).abs().max() <= tolerance, "lab_blend: kernel and torch differ"
        changed += int((by_kernel != relit).any(1).sum())
    return changed


def real_masks(target: dict, size: tuple[int, int]) -> torch.Tensor:
    """An image's real instance masks resized (nearest) to ``size``, each minus the later ones (the
    visible parts, disjoint as pasted segments are: where masks overlap, which segment's transform
    lands is a race on any path), plus one empty mask."""
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    masks = resize(target["masks"].as_subclass(torch.Tensor).to(torch.uint8), list(size),
                   interpolation=InterpolationMode.NEAREST).bool()
    later = torch.zeros(size, dtype=torch.bool)
    for i in range(len(masks) - 1, -1, -1):
        masks[i] &= ~later
        later |= masks[i]
    return torch.cat([masks, torch.zeros(1, *size, dtype=torch.bool)])


def run_checks(bank_dir: str, data_root: str, device: str) -> dict:
    """Every check of this file on ``device``; returns what was covered."""
    from torchvision.transforms.v2.functional import resize

    from sos_aug import CocoInstances
    from sos_aug.bank import SegmentBank

    bank = SegmentBank(bank_dir)
    coco = Path(data_root) / "coco-mini"
    val = CocoInstances(coco / "annotations" / "instances_val2017.json", coco / "val2017")
    image = val[3][0]
    pixels = 0
    for seed, size, as_float in ((0, (96, 128), False), (7, (120, 80), False), (11, (96, 128), True)):
        pixels += check_kernels(bank, resize(image, list(size), antialias=True), seed, 6, device, as_float)
    from sos_aug.segments import PasteSegments

    check_nothing_lands(resize(image, [64, 80], antialias=True),
                        PasteSegments.pack([bank.read_rgba(r)[0] for r in (0, 1)]), device)
    size = (120, 160)
    pairs = [val[i] for i in (0, 1)]
    images = torch.stack([resize(im.as_subclass(torch.Tensor), list(size), antialias=True) for im, _ in pairs])
    masks = [real_masks(t, size) for _, t in pairs]
    relit = check_relight(images, masks, device) + check_relight(images.float() / 255, masks, device)
    blended = check_lab_blend(images, masks, device) + check_lab_blend(images.float() / 255, masks, device)
    return {"pixels_checked": pixels, "pixels_relit": relit, "pixels_blended": blended}


def interpreted(train_bank, data: Path) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    done = subprocess.run([sys.executable, __file__, str(train_bank.root), str(data)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device runs the compiled kernels instead (and "
                    "older Triton interpreters fail under NumPy 2)")
@pytest.mark.slow
def test_kernels_equal_the_torch_paths_under_the_interpreter(train_bank, coco_mini):
    """On the CPU, through Triton's interpreter (slow: small canvases)."""
    covered = interpreted(train_bank, coco_mini.parent)
    assert covered["pixels_checked"] > 1000 and covered["pixels_relit"] > 1000 and covered["pixels_blended"] > 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_equal_the_torch_paths_on_cuda(train_bank, coco_mini):
    covered = run_checks(str(train_bank.root), str(coco_mini.parent), "cuda")
    assert covered["pixels_checked"] > 1000 and covered["pixels_relit"] > 1000 and covered["pixels_blended"] > 1000


if __name__ == "__main__":
    print(json.dumps(run_checks(sys.argv[1], sys.argv[2], "cpu")))
