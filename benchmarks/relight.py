"""Relighting cost inside CopyPaste: CPU ms per image at 1024x1024 with 10 pasted segments,
relighting off vs each relighter, in one process on the same real COCO images and seeds, the
configurations taking turns (medians of ``--repeats`` rounds)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, train_bank  # noqa: E402
from copypaste import load_images  # noqa: E402

from sos_aug import CopyPaste, RandomLayout  # noqa: E402
from sos_aug.relight import LabBlend, ReinhardTransfer, RelightNet  # noqa: E402


def once(cp: CopyPaste, data, batch: int) -> float:
    """Milliseconds per image for one pass over the images, the same seeds every time."""
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        images, targets = zip(*data[i : i + batch])
        cp(list(images), list(targets), generator=g)
    return 1000 * (time.perf_counter() - start) / len(data)


def interleaved(cps: dict, data, batch: int, rounds: int) -> dict[str, float]:
    """Median ms/img per configuration, the configurations taking turns round after round, so that
    a slow spell of a noisy machine hits all of them alike."""
    for cp in cps.values():
        once(cp, data, batch)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in cps}
    for _ in range(rounds):
        for name, cp in cps.items():
            times[name].append(once(cp, data, batch))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="rounds; each configuration's median is reported")
    p.add_argument("--work", default="bench_out")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = coco_mini()
    bank = train_bank(root, Path(args.work))
    data = load_images(root, args.images, args.size)
    chains = {"off": None, "reinhard": ReinhardTransfer(), "lab_blend": LabBlend(), "net": RelightNet.pretrained(),
              "net+lab_blend": [RelightNet.pretrained(), LabBlend()]}
    cps = {name: CopyPaste(bank, layout=RandomLayout(scale=(0.5, 2.0)), num_pastes=(10, 10), relight=chain)
           for name, chain in chains.items()}
    rows = interleaved(cps, data, 8, args.repeats)
    print(f"machine: {machine()}; {len(data)} real COCO images at {args.size}², 10 segments each, one thread")
    print(f"{'relight':16s} {'ms/img':>8s} {'relight cost':>13s} {'vs compositing':>15s}")
    for name, ms in rows.items():
        extra = ms - rows["off"]
        print(f"{name:16s} {ms:8.2f} {extra:13.2f} {extra / rows['off']:15.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "ms_per_image": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
