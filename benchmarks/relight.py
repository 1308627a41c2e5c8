"""Relighting cost inside CopyPaste: CPU ms per image at 1024x1024 with 10 pasted segments,
relighting off vs each relighter, in one process on the same real COCO images and seeds, the
configurations taking turns (medians of ``--repeats`` rounds). The cost ratio is also taken round
by round against the compositing run just before it, which a noisy machine disturbs less."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_allocator_flag, coco_mini, machine, set_allocator, train_bank  # noqa: E402
from copypaste import load_images, measure  # noqa: E402

from sos_aug import CopyPaste, RandomLayout  # noqa: E402
from sos_aug.relight import LabBlend, ReinhardTransfer, RelightNet  # noqa: E402


def runner(cp: CopyPaste, data, batch: int):
    """One pass over the images with the same seeds every time, for :func:`copypaste.measure`."""
    def run() -> int:
        g = torch.Generator().manual_seed(0)
        for i in range(0, len(data), batch):
            images, targets = zip(*data[i : i + batch])
            cp(list(images), list(targets), generator=g)
        return 0

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="rounds; each configuration's median is reported")
    p.add_argument("--work", default="bench_out")
    p.add_argument("--json")
    p.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time (a shared machine)")
    p.add_argument("--only", action="append", help="a configuration to run (repeatable; compositing alone always runs)")
    add_allocator_flag(p)
    args = p.parse_args(argv)
    allocator = set_allocator(args)
    torch.set_num_threads(1)
    root = coco_mini()
    bank = train_bank(root, Path(args.work))
    data = load_images(root, args.images, args.size)
    chains = {"off": None, "reinhard": ReinhardTransfer(), "lab_blend": LabBlend(), "net": RelightNet.pretrained(),
              "net, compile_cpu": RelightNet.pretrained(compile_cpu=True),
              "net+lab_blend": [RelightNet.pretrained(), LabBlend()],
              "net+lab_blend, compile_cpu": [RelightNet.pretrained(compile_cpu=True), LabBlend()]}
    if args.only:
        wanted = {"off", *args.only}
        unknown = wanted - set(chains)
        if unknown:
            p.error(f"--only: unknown configuration(s) {sorted(unknown)}; known: {sorted(chains)}")
        chains = {name: chain for name, chain in chains.items() if name in wanted}
    cps = {name: CopyPaste(bank, layout=RandomLayout(scale=(0.5, 2.0)), num_pastes=(10, 10), relight=chain)
           for name, chain in chains.items()}
    runners = {name: runner(cp, data, 8) for name, cp in cps.items()}
    start = time.perf_counter()
    for name in ("net, compile_cpu", "net+lab_blend, compile_cpu"):
        if name in runners:
            runners[name]()  # compiles on first use, once per process (per DataLoader worker)
    first_call_s = time.perf_counter() - start
    timing = measure(runners, args.repeats, len(data), clock=time.process_time if args.cpu_time else time.perf_counter)
    rows = {name: t["ms_per_image"] for name, t in timing.items()}
    paired = {name: paired_ratio(timing[name]["ms_per_image_all_rounds"], timing["off"]["ms_per_image_all_rounds"])
              for name in rows}
    print(f"machine: {machine()}; {len(data)} real COCO images at {args.size}², 10 segments each, one thread; "
          f"allocator: {allocator}")
    print(f"compile_cpu: first passes, compiling included, {first_call_s:.1f} s (not in the figures below)")
    print(f"{'relight':28s} {'ms/img':>8s} {'relight cost':>13s} {'vs compositing':>15s} {'per round (min-max)':>22s}")
    for name, ms in rows.items():
        mid, lo, hi = paired[name]
        print(f"{name:28s} {ms:8.2f} {ms - rows['off']:13.2f} {mid:14.2f}x {lo:10.2f}x - {hi:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "allocator": allocator, "ms_per_image": rows,
                                               "cost_vs_compositing_per_round": paired,
                                               "compile_cpu_first_pass_s": first_call_s,
                                               "clock": "cpu" if args.cpu_time else "wall"}, indent=1))
    return 0


def paired_ratio(with_relight: list[float], off: list[float]) -> tuple[float, float, float]:
    """Relighting cost over compositing cost, round by round (the two ran back to back, so a slow
    spell of the machine hits both): the median, min and max over rounds."""
    ratios = [(a - b) / b for a, b in zip(with_relight, off)]
    return statistics.median(ratios), min(ratios), max(ratios)


if __name__ == "__main__":
    sys.exit(main())
