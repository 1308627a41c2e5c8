"""Offline synthesis speed: images/s of ``sos-aug synthesize`` at 1024² with 5-19 segments from the
coco-mini bank on plain canvases, one process, without and with relighting (net + LabBlend) and with
referring expressions, and what that implies for a 100K-image set on 2 and 64 cores (scaled by
cores: shards are independent) and on a Ray cluster (scaled by its cores).

    OMP_NUM_THREADS=1 python benchmarks/synthesis.py [--images 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, print_and_save, train_bank  # noqa: E402

from sos_aug.synthesis import SynthesisConfig, synthesize  # noqa: E402

ARMS = {"plain": {}, "relight net+lab": {"relight": "net+lab"}, "referring": {"referring": True}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=12, help="images per arm (default %(default)s)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--work", default="bench_out/synthesis")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    bank = train_bank(coco_mini(), work)
    rates = {}
    for name, extra in ARMS.items():
        out = work / name.replace(" ", "_").replace("+", "_")
        shutil.rmtree(out, ignore_errors=True)
        config = SynthesisConfig(num_images=args.images, size=args.size, shard_size=args.images, seed=0, **extra)
        start = time.perf_counter()
        synthesize(bank, out, config, progress=False)
        rates[name] = args.images / (time.perf_counter() - start)
    hours = {name: {f"{cores} cores": round(100_000 / (rate * cores) / 3600, 2) for cores in (2, 64)}
             for name, rate in rates.items()}
    report = {"machine": machine(), "size": args.size, "pastes": [5, 19], "images": args.images,
              "images_per_s_one_process": {k: round(v, 2) for k, v in rates.items()},
              "hours_for_100k": hours}
    return print_and_save(report, args.json)


if __name__ == "__main__":
    main()
