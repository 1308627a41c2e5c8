"""GPU timings: CopyPaste on a B=16 batch at 1024x1024 with 10 segments per image, and relighting it.

The batch lives on the GPU as it would after ``.to(device)`` in a training step; the segments were
fetched and decoded by DataLoader workers (not timed here, see ``copypaste.py``) and move with the
batch in one copy. Timed with the device synchronised before and after, median of ``--repeats``:

* ``layout``: drawing the placements (CPU, the generator's side);
* ``paste``: compositing and every target update on the GPU, batched (the default there: the
  Triton kernels, ``backend="kernel"``) and, for comparison, batched with pieces warped in size groups
  by matmuls (``backend="groups"``), batched piece by piece (``backend="loop"``) and image by image;
* ``relight net``: ``RelightNet`` on the pasted segments of the same batch (its windows and forward
  one compiled graph and its pixel pass the Triton kernel, the default on CUDA; the torch pixel
  pass; the windows eager with the forward compiled, the default before; all eager), LabBlend
  (its Triton kernel, the default on CUDA, and its torch path) and net + LabBlend.

Also checks that the GPU and CPU paths agree on the same draws (labels, masks, pixels).
Needs a CUDA device; prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, piece_by_piece, train_bank  # noqa: E402
from copypaste import load_images  # noqa: E402

from sos_aug import CopyPaste, RandomLayout, SOSLayout  # noqa: E402
from sos_aug.ops import backends as kernels  # noqa: E402
from sos_aug.relight import LabBlend, ReinhardTransfer, RelightBatch, RelightNet, relight  # noqa: E402
from sos_aug.relight import net as net_module  # noqa: E402


class Rows(dict):
    """The figures, each printed as it is measured (a later failure keeps what came before)."""

    def __setitem__(self, key: str, value: dict) -> None:
        super().__setitem__(key, value)
        print(f"{key:60s} " + " ".join(f"{a}={b:.2f}" for a, b in value.items()), flush=True)


def cuda_ms(fn, repeats: int) -> dict:
    """Median and mean milliseconds of ``fn()``, the device synchronised around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times), "min_ms": min(times)}


def pasted_batch(images, targets) -> RelightBatch:
    """What CopyPaste hands its relighters: the composites, their pasted masks and tight boxes."""
    first = [len(t["is_pasted"]) - int(t["is_pasted"].sum()) for t in targets]
    return RelightBatch(list(images), list(images), [t["masks"][f:] for t, f in zip(targets, first)],
                        [t["boxes"][f:] for t, f in zip(targets, first)])


def bench_layout(name, layout, bank, images, targets, images_cpu, targets_cpu, dev, args, rows, checks):
    """Time one layout's draw, transfer and paste; check the GPU result against the CPU path."""
    n = (args.pastes, args.pastes)
    sizes = [(args.size, args.size)] * args.batch
    cp = CopyPaste(bank, layout=layout, num_pastes=n)
    per_image = CopyPaste(bank, layout=layout, num_pastes=n, backend="window")
    g = torch.Generator().manual_seed(0)
    segments = cp.fetch(args.batch, g)
    segments = segments.pin_memory() if dev.type == "cuda" else segments
    params = cp.draw_placements(sizes, targets_cpu, segments, g)
    seg_gpu = segments.to(dev, non_blocking=True)
    rows[f"{name}: segments to GPU (one copy, pinned)"] = cuda_ms(lambda: segments.to(dev, non_blocking=True),
                                                                  args.repeats)
    redraw = torch.Generator().manual_seed(1)
    rows[f"{name}: layout (CPU)"] = cuda_ms(lambda: cp.draw_placements(sizes, targets_cpu, segments, redraw),
                                            max(3, args.repeats // 4))
    if name == "random":  # Triton compiles the paste kernels on their first call in a process
        rows["paste, first call (compiles the kernels)"] = first_call_ms(
            lambda: cp.paste(images, targets, seg_gpu, params), dev)
    rows[f"{name}: paste + targets, batched"] = cuda_ms(lambda: cp.paste(images, targets, seg_gpu, params),
                                                        args.repeats)
    grouped = CopyPaste(bank, layout=layout, num_pastes=n, backend="groups")
    for warp in ("groups", "loop"):
        def timed(warp=warp):
            with piece_by_piece() if warp == "loop" else contextlib.nullcontext():
                return grouped.paste(images, targets, seg_gpu, params)
        rows[f"{name}: paste + targets, batched, backend={warp}"] = cuda_ms(timed, args.repeats)
    rows[f"{name}: paste + targets, image by image"] = cuda_ms(
        lambda: per_image.paste(list(images), targets, seg_gpu, params), max(3, args.repeats // 4))
    out_images, out_targets = cp.paste(images, targets, seg_gpu, params)
    rows[f"{name}: pasted per image"] = {"mean": sum(int(t["is_pasted"].sum()) for t in out_targets) / args.batch}
    cpu_images, cpu_targets = cp.paste(images_cpu, targets_cpu, segments, params)  # the same draws on the CPU
    same_labels = sum(a["labels"].tolist() == b["labels"].cpu().tolist() for a, b in zip(cpu_targets, out_targets))
    mask_diff = sum(int((a["masks"] ^ b["masks"].cpu()).sum()) if a["masks"].shape == b["masks"].shape else -1
                    for a, b in zip(cpu_targets, out_targets))
    pixel_diff = statistics.fmean(float((a.int() - b.cpu().int()).abs().float().mean())
                                  for a, b in zip(cpu_images, out_images))
    checks[name] = {"images_with_equal_labels": same_labels, "of": args.batch, "mask_pixels_differing": mask_diff,
                    "mean_abs_pixel_diff": pixel_diff}
    return out_images, out_targets


def first_call_ms(fn, dev) -> dict:
    """Milliseconds of one call (the first: what compiling costs, once per process)."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize() if dev.type == "cuda" else None
    return {"ms": 1000 * (time.perf_counter() - start)}


def bench_relight(out_images, out_targets, dev, repeats: int, rows) -> None:
    """Relighting the pasted segments of the pasted batch: the net alone (forward and pixel pass
    compiled, the default on accelerators; forward eager; all eager), LabBlend on the net's
    output (kernel and torch path), both, ReinhardTransfer, and LabBlend alone (over Reinhard)."""
    net = RelightNet.pretrained().to(dev)
    batch = pasted_batch(out_images, out_targets)
    plain, masks = batch.plain, batch.masks
    rows["relight net, first call (compiles windows + forward, and pixel pass)"] = first_call_ms(
        lambda: relight(net, batch), dev)
    rows["relight net (B images, their pasted segments)"] = cuda_ms(lambda: relight(net, batch), repeats)
    kernels.FAILED.add("relight")  # the torch pixel pass (nonzero, gather, compiled transform, scatter)
    try:
        rows["relight net, torch pixel pass"] = cuda_ms(lambda: relight(net, batch), repeats)
    finally:
        kernels.FAILED.discard("relight")
    windows_eager = RelightNet.pretrained().to(dev)  # the default before: windows sampled eagerly
    net_module._GROUPS[windows_eager] = functools.partial(net_module._inputs_then_forward, windows_eager)
    rows["relight net, windows eager, forward compiled"] = cuda_ms(lambda: relight(windows_eager, batch), repeats)
    eager_forward = RelightNet.pretrained().to(dev)
    net_module._GROUPS[eager_forward] = functools.partial(net_module._inputs_then_forward, eager_forward)
    net_module._FORWARDS[eager_forward] = eager_forward._forward  # the pixel pass alone compiled
    rows["relight net, windows and forward eager"] = cuda_ms(lambda: relight(eager_forward, batch), repeats)
    os.environ["SOS_AUG_COMPILE"] = "0"
    try:
        rows["relight net, all eager (SOS_AUG_COMPILE=0)"] = cuda_ms(lambda: relight(net, batch), repeats)
    finally:
        del os.environ["SOS_AUG_COMPILE"]
    after_net = RelightBatch(relight(net, batch), plain, masks, batch.boxes)
    rows["LabBlend on the net's output (its Triton kernel, the default on CUDA)"] = cuda_ms(
        lambda: LabBlend()(after_net), repeats)
    kernels.FAILED.add("lab_blend")  # the torch path (nonzero, gather, elementwise Lab, scatter)
    try:
        rows["LabBlend on the net's output, torch path"] = cuda_ms(lambda: LabBlend()(after_net), repeats)
    finally:
        kernels.FAILED.discard("lab_blend")
    rows["relight net + LabBlend"] = cuda_ms(lambda: relight([net, LabBlend()], batch), repeats)
    rows["ReinhardTransfer"] = cuda_ms(lambda: relight(ReinhardTransfer(), batch), repeats)
    rows["LabBlend alone (over its Reinhard fallback)"] = cuda_ms(lambda: relight(LabBlend(), batch), repeats)
    rows["segments relit"] = {"count": sum(len(m) for m in masks)}


def profile(bank, layout, images, targets, targets_cpu, out_images, out_targets, dev, args) -> None:
    """Where one batched paste and one net relight spend their time (CPU dispatch vs device)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cp = CopyPaste(bank, layout=layout, num_pastes=(args.pastes, args.pastes))
    segments = cp.fetch(args.batch, torch.Generator().manual_seed(3))
    params = cp.draw_placements([(args.size, args.size)] * args.batch, targets_cpu, segments)
    seg = segments.to(dev)
    net = RelightNet.pretrained().to(dev)
    batch = pasted_batch(out_images, out_targets)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    runs = (("paste", lambda: cp.paste(images, targets, seg, params)), ("relight", lambda: relight(net, batch)))
    for what, fn in runs:
        fn()
        with torch_profile(activities=activities) as prof:
            fn()
            torch.cuda.synchronize() if dev.type == "cuda" else None
        print(f"--- {what}: top ops")
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=40))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--pastes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--work", default="bench_out", help="where the bank is built")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", default="cuda", help="'cpu' only to try the script out")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one paste and relight")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    dev = torch.device(args.device)
    root = coco_mini()
    bank = train_bank(root, Path(args.work))
    data = load_images(root, args.batch, args.size)
    images_cpu = [im for im, _ in data]
    targets_cpu = [t for _, t in data]
    images = torch.stack(images_cpu).to(dev)
    targets = [{k: v.to(dev) for k, v in t.items()} for t in targets_cpu]
    rows, checks = Rows(), {}
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; B={args.batch} at "
          f"{args.size}x{args.size}, {args.pastes} segments per image", flush=True)
    for name, layout in (("random", RandomLayout(scale=(0.5, 2.0))), ("sos", SOSLayout())):
        out_images, out_targets = bench_layout(name, layout, bank, images, targets, images_cpu, targets_cpu, dev,
                                               args, rows, checks)
        if name == "random":
            bench_relight(out_images, out_targets, dev, args.repeats, rows)
            if args.profile:
                profile(bank, layout, images, targets, targets_cpu, out_images, out_targets, dev, args)
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (trial run)"
    info = {"machine": machine(), "gpu": gpu, "batch": args.batch, "size": args.size,
            "pastes": args.pastes, "rows": rows, "cpu_vs_gpu": checks}
    print(json.dumps(checks, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
