"""CopyPaste throughput: sos_aug vs mmdet 3.x and Ultralytics, in one process on the same images.

Real COCO images (coco-mini) resized to 1024x1024 as in LSJ, dense masks. Each method gets one
thread (as a DataLoader worker would); the methods take turns over ``--repeats`` rounds and each
one's median is reported. Prints images/s, ms/image, mean pasted objects per image and peak
resident memory above the start of its first pass; ``--json`` writes the same.

What each peer does and skips:
* mmdet ``CopyPaste``: pastes the objects of another image of the batch at the same place, no
  rescaling; full-canvas NumPy mask updates for every instance (exact), boxes from masks.
* Ultralytics ``CopyPaste``: fills polygons with OpenCV, never rescales, and never updates the
  instances the pasted ones cover ('flip' pastes mirrored copies of the image's own objects that
  overlap nothing; 'mixup' pastes another image's objects).
* sos_aug: decodes segments from a bank, rescales each (antialiased) to a layout-drawn size, and
  updates every covered instance exactly (dense masks, boxes, areas, drop rule).
* output floor: no pasting, only a fresh copy of the image and of the existing masks into an
  (N + 10)-row mask tensor: what any exact dense-mask method must at least write (a lower bound).

mmdet's mask structures import the compiled ``mmcv._ext``, which ``mmcv-lite`` lacks; this script
installs an import shim for that one module (none of its ops run in CopyPaste).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_allocator_flag, coco_mini, machine, set_allocator, train_bank  # noqa: E402

from sos_aug import CocoInstances, CopyPaste, RandomLayout  # noqa: E402
from sos_aug.ops.masks import tight_boxes  # noqa: E402


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_images(root: Path, n: int, size: int):
    ds = CocoInstances(root / "annotations" / "instances_val2017.json", root / "val2017")
    resize = v2.Resize((size, size), antialias=True)
    out = []
    for i in range(min(n, len(ds))):
        image, target = resize(*ds[i])
        masks = target["masks"].as_subclass(torch.Tensor).bool()
        keep = masks.flatten(1).any(1)
        target = {"boxes": tight_boxes(masks[keep]), "labels": target["labels"][keep], "masks": masks[keep],
                  "iscrowd": target["iscrowd"][keep], "area": target["area"][keep]}
        out.append((image.as_subclass(torch.Tensor), target))
    return out


def measure(runners: dict, rounds: int, n_images: int, passes: dict[str, int] | None = None,
            clock=time.perf_counter) -> dict:
    """Per method: median ms/image over ``rounds``, the methods taking turns round after round (a slow
    spell of a noisy machine hits all of them alike), pasted objects per image, and the peak resident
    memory of its first pass. ``passes`` runs fast methods several times a round for timer resolution;
    ``clock=time.process_time`` counts this process's CPU time only (for a machine shared with other jobs)."""
    passes = passes or {}
    peaks, pasted, times = {}, {}, {name: [] for name in runners}
    for name, fn in runners.items():
        fn()  # warm-up
        with PeakRSS() as mem:
            pasted[name] = fn()
        peaks[name] = mem.mib
    for _ in range(rounds):
        for name, fn in runners.items():
            k = passes.get(name, 1)
            start = clock()
            for _ in range(k):
                fn()
            times[name].append(1000 * (clock() - start) / (k * n_images))
    out = {}
    for name in runners:
        ms = statistics.median(times[name])
        out[name] = {"images_per_s": 1000 / ms, "ms_per_image": ms, "pasted_per_image": pasted[name] / n_images,
                     "peak_mib": peaks[name], "ms_per_image_all_rounds": times[name]}
    return out


def bench_sos(bank, data, batch: int, num: tuple[int, int], feather: float = 0.0, prefetched: int = 0):
    """sos_aug's CopyPaste; ``prefetched`` > 0 leaves segment fetching and decoding out of the timing,
    as mmdet's benchmark leaves out loading its source image (both are DataLoader-worker I/O): that
    many draws are fetched beforehand and each call pastes the next one, since the cost of a paste
    depends on the segments drawn (their source sizes vary by ~30% from draw to draw here)."""
    cp = CopyPaste(bank, layout=RandomLayout(scale=(0.5, 2.0)), num_pastes=num, feather_sigma=feather)
    g = torch.Generator().manual_seed(0)
    batches = [list(zip(*data[i : i + batch])) for i in range(0, len(data), batch)]
    draws = [[cp.fetch(len(images), g) for images, _ in batches] for _ in range(prefetched)]
    calls = itertools.count()

    def run():
        pasted = 0
        fetched = draws[next(calls) % len(draws)] if draws else None
        for b, (images, targets) in enumerate(batches):
            segments = fetched[b] if fetched else None
            _, out = cp(list(images), list(targets), segments=segments, generator=g)
            pasted += sum(int(t["is_pasted"].sum()) for t in out)
        return pasted

    return run


def bench_output_floor(data, k: int):
    """A lower bound for any exact dense-mask CopyPaste, with no pasting at all: a fresh copy of the
    image and of the existing masks into an (N + k)-row mask tensor (the pasted rows left unwritten).
    This is memory every such method must write, whatever it computes."""
    def run():
        for image, target in data:
            image.clone()
            masks = target["masks"]
            out = torch.from_numpy(np.zeros((len(masks) + k, *masks.shape[1:]), dtype=bool))
            out[: len(masks)].copy_(masks)
        return 0

    return run


def bench_mmdet(data):
    from sos_aug.integrations.mmcv_lite import allow_mmcv_lite

    allow_mmcv_lite()  # mmcv-lite: mmdet's mask module imports the compiled ops; none is called here
    from mmdet.datasets.transforms import CopyPaste as MMCopyPaste
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks

    def results(image, target):
        masks = target["masks"].numpy().astype(np.uint8)
        return {"img": image.permute(1, 2, 0).numpy().copy(),
                "gt_bboxes": HorizontalBoxes(target["boxes"].numpy().astype(np.float32)),
                "gt_bboxes_labels": target["labels"].numpy(),
                "gt_masks": BitmapMasks(masks, *masks.shape[1:]),
                "gt_ignore_flags": target["iscrowd"].numpy().astype(bool)}

    transform = MMCopyPaste()
    np.random.seed(0)
    prepared = [results(*d) for d in data]

    def run():
        pasted = 0
        for i, dst in enumerate(prepared):
            src = prepared[(i + 1) % len(prepared)]
            dst = {**dst, "gt_masks": BitmapMasks(dst["gt_masks"].masks.copy(), *dst["gt_masks"].masks.shape[1:])}
            selected = transform._select_object(dict(src))
            pasted += len(selected["gt_bboxes_labels"])
            transform._copy_paste(dst, selected)
        return pasted

    return run


def bench_ultralytics(data, mode: str):
    import cv2
    from ultralytics.data.augment import CopyPaste as ULCopyPaste
    from ultralytics.utils.instance import Instances
    from ultralytics.utils.ops import resample_segments

    cv2.setNumThreads(1)

    def labels(image, target):
        segs, boxes, cls = [], [], []
        for m, b, c in zip(target["masks"].numpy().astype(np.uint8), target["boxes"].numpy(), target["labels"]):
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            if not contours:
                continue
            segs.append(max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float32))
            boxes.append(b)
            cls.append([int(c)])
        segs = np.stack(resample_segments(segs, 1000)) if segs else np.zeros((0, 1000, 2), np.float32)
        return {"img": image.permute(1, 2, 0).numpy().copy(),
                "instances": Instances(np.array(boxes, np.float32).reshape(-1, 4), segs, bbox_format="xyxy",
                                       normalized=False),
                "cls": np.array(cls, np.float32).reshape(-1, 1)}

    prepared = [labels(*d) for d in data]

    class Pool:  # what 'mixup' mode asks of a dataset
        def __len__(self):
            return len(prepared)

        def get_image_and_label(self, i):
            p = prepared[i]
            return {**p, "instances": _copy_instances(p["instances"])}

    import random

    random.seed(0)
    transform = ULCopyPaste(dataset=Pool(), p=1.0, mode=mode)

    def run():
        pasted = 0
        for p in prepared:
            sample = {**p, "instances": _copy_instances(p["instances"])}
            before = len(sample["cls"])
            out = transform(sample)
            pasted += len(out["cls"]) - before
        return pasted

    return run


def _copy_instances(inst):
    from copy import deepcopy

    return deepcopy(inst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="rounds; each method's median is reported")
    p.add_argument("--work", default="bench_out", help="where the bank is built")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time (a shared machine)")
    add_allocator_flag(p)
    args = p.parse_args(argv)
    allocator = set_allocator(args)
    torch.set_num_threads(1)
    root = coco_mini()
    bank = train_bank(root, Path(args.work))
    data = load_images(root, args.images, args.size)
    calls = args.repeats + 2  # each pre-fetched call pastes its own draw
    runners = {
        "sos_aug hard alpha, 10/img, B=8": bench_sos(bank, data, 8, (10, 10)),
        "sos_aug hard alpha, 10/img, segments pre-fetched": bench_sos(bank, data, 8, (10, 10), prefetched=calls),
        "sos_aug feathered alpha, 10/img, B=8": bench_sos(bank, data, 8, (10, 10), feather=1.5),
        "output floor: copy image and masks, no pasting": bench_output_floor(data, 10),
    }
    passes = {}
    if not args.skip_peers:
        mmdet = bench_mmdet(data)
        k = max(1, round(mmdet() / len(data)))  # sos_aug at mmdet's pasted count: equal work
        runners["mmdet 3.3 CopyPaste"] = mmdet
        runners[f"sos_aug hard alpha, {k}/img (mmdet's count), B=8"] = bench_sos(bank, data, 8, (k, k))
        runners[f"sos_aug hard alpha, {k}/img, segments pre-fetched"] = bench_sos(bank, data, 8, (k, k),
                                                                                prefetched=calls)
        runners["ultralytics CopyPaste flip"] = bench_ultralytics(data, "flip")
        runners["ultralytics CopyPaste mixup"] = bench_ultralytics(data, "mixup")
        passes = {"ultralytics CopyPaste flip": 4, "ultralytics CopyPaste mixup": 4}
    rows = measure(runners, args.repeats, len(data), passes,
                   clock=time.process_time if args.cpu_time else time.perf_counter)
    ref = rows["sos_aug hard alpha, 10/img, B=8"]["images_per_s"]
    print(f"machine: {machine()}; {len(data)} real COCO images at {args.size}x{args.size}, one thread per method; "
          f"allocator: {allocator}")
    print(f"{'method':50s} {'img/s':>8s} {'ms/img':>8s} {'pasted/img':>10s} {'peak MiB':>9s} {'vs sos':>7s}")
    for name, r in rows.items():
        print(f"{name:50s} {r['images_per_s']:8.1f} {r['ms_per_image']:8.2f} {r['pasted_per_image']:10.2f} "
              f"{r['peak_mib']:9.1f} {r['images_per_s'] / ref:7.2f}")
    ratios = {}
    if not args.skip_peers:
        mm = rows["mmdet 3.3 CopyPaste"]["images_per_s"]
        ratios = {"equal work vs mmdet": rows[f"sos_aug hard alpha, {k}/img (mmdet's count), B=8"]["images_per_s"] / mm,
                  "equal work vs mmdet, pre-fetched":
                      rows[f"sos_aug hard alpha, {k}/img, segments pre-fetched"]["images_per_s"] / mm,
                  "ultralytics flip vs sos 10/img": rows["ultralytics CopyPaste flip"]["images_per_s"] / ref,
                  "ultralytics flip vs the output floor":
                      rows["ultralytics CopyPaste flip"]["images_per_s"]
                      / rows["output floor: copy image and masks, no pasting"]["images_per_s"]}
        print("; ".join(f"{name}: {v:.2f}x" for name, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "allocator": allocator, "size": args.size,
                                               "rows": rows, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
