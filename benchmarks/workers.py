"""CopyPaste where it runs in training: a real DataLoader worker decoding COCO images, resizing them to
1024x1024 (LSJ's size, torchvision v2) and pasting 10 segments per image through CopyPasteCollate.
Configurations take turns, one epoch over coco-mini val2017 each, one worker (the machine has 2
cores: the other is the training process's); ms per image, medians of rounds:

- decoding and resizing only (no CopyPaste, freed memory kept): what the rest cost;
- pasting, with the worker's allocator as glibc sets it or keeping freed memory
  (``keep_freed_memory``, CopyPasteCollate's default);
- pasting and relighting with the shipped net, eager (the default) or ``compile_cpu=True`` (compiled
  once in this process by CopyPasteCollate, before the workers fork).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, train_bank  # noqa: E402

from sos_aug import CocoInstances, CopyPaste, CopyPasteCollate, RandomLayout, allocator  # noqa: E402
from sos_aug.relight import RelightNet  # noqa: E402
from sos_aug.relight.batch import relight_one  # noqa: E402


class Resized(Dataset):
    """A dataset's samples resized to ``size`` x ``size`` (image, boxes and masks together)."""

    def __init__(self, dataset: Dataset, size: int):
        self.dataset, self.resize = dataset, v2.Resize((size, size))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.resize(*self.dataset[i])


class TimedRelighter:
    """A relighter that records how long each call took, per image (in the worker that runs it)."""

    def __init__(self, relighter):
        self.relighter, self.ms_per_image = relighter, []
        # what CopyPasteCollate's warm-up looks at
        self.compiles_cpu_code = getattr(relighter, "compiles_cpu_code", False)

    def __call__(self, batch):
        start = time.perf_counter()
        out = relight_one(self.relighter, batch)
        self.ms_per_image.append((time.perf_counter() - start) * 1000 / len(batch.images))
        return out


class TimedCollate:
    """A collate that also returns, per batch, the ms per image it spent (all of it, and relighting)."""

    def __init__(self, collate, relighter: TimedRelighter | None = None):
        self.collate, self.relighter = collate, relighter

    def __call__(self, batch):
        start = time.perf_counter()
        images, targets = self.collate(batch)
        spent = (time.perf_counter() - start) * 1000 / len(images)
        return images, spent, self.relighter.ms_per_image[-1] if self.relighter else 0.0


def epoch(dataset: Dataset, collate: TimedCollate, batch: int) -> dict[str, float]:
    """One epoch through a fresh one-worker DataLoader: ms per image from its first batch on (worker
    start-up left out), and the medians over batches of the ms per image spent in the collate and,
    of that, in relighting, measured in the worker."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=1, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    rows = [(len(images), spent, relit) for images, spent, relit in batches]
    return {"epoch": (time.perf_counter() - start) * 1000 / sum(r[0] for r in rows),
            "collate": statistics.median(r[1] for r in rows), "relight": statistics.median(r[2] for r in rows)}


def as_lists(batch):
    """The plain collate (images and targets as tuples, as CopyPasteCollate returns them), in a
    worker that keeps freed memory as CopyPasteCollate's do."""
    allocator.keep_freed_memory()
    return tuple(b[0] for b in batch), tuple(b[1] for b in batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--work", default="bench_out")
    p.add_argument("--json")
    args = p.parse_args(argv)
    root = coco_mini()
    bank = train_bank(root, Path(args.work))
    dataset = Resized(CocoInstances(root / "annotations" / "instances_val2017.json", root / "val2017"), args.size)

    def copy_paste(relight=None) -> CopyPaste:
        return CopyPaste(bank, layout=RandomLayout(scale=(0.5, 2.0)), num_pastes=(10, 10), open_vocabulary=True,
                         relight=relight)

    def relighting(compile_cpu: bool) -> TimedCollate:
        timed = TimedRelighter(RelightNet.pretrained(compile_cpu=compile_cpu))
        return TimedCollate(CopyPasteCollate(copy_paste(timed)), timed)  # compile_cpu: compiled here, once

    start = time.perf_counter()
    compiled = relighting(compile_cpu=True)
    warm_up_s = time.perf_counter() - start
    collates = {"decode+resize only": TimedCollate(as_lists),
                "paste, glibc default": TimedCollate(CopyPasteCollate(copy_paste(), keep_freed_memory=False)),
                "paste": TimedCollate(CopyPasteCollate(copy_paste())),
                "paste+relight": relighting(compile_cpu=False),
                "paste+relight, compile_cpu": compiled}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in collates}
    for _ in range(args.rounds):
        for name, collate in collates.items():
            rounds[name].append(epoch(dataset, collate, batch=8))
    rows = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    print(f"machine: {machine()}; {len(dataset)} real COCO images decoded, resized to {args.size}², 10 segments "
          f"each, one DataLoader worker; medians of {args.rounds} epochs; compile_cpu's warm-up before the "
          f"workers fork: {warm_up_s:.1f} s")
    print(f"{'':28s} {'epoch ms/img':>12s} {'in the worker: collate':>23s} {'of it relighting':>17s}")
    for name, row in rows.items():
        print(f"{name:28s} {row['epoch']:12.2f} {row['collate']:23.2f} {row['relight']:17.2f}")
    ratios = {"keep_freed_memory: epoch time, paste vs paste with glibc's default":
              rows["paste"]["epoch"] / rows["paste, glibc default"]["epoch"]}
    for name in ("paste+relight", "paste+relight, compile_cpu"):  # relighting vs the rest of CopyPaste
        ratios[f"{name}: relighting vs pasting, in the worker"] = (
            rows[name]["relight"] / (rows[name]["collate"] - rows[name]["relight"]))
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "medians_ms_per_image": rows, "rounds": rounds,
                                               "ratios": ratios, "compile_cpu_warm_up_s": warm_up_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
