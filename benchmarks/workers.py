"""CopyPaste where it runs in training: a real DataLoader worker decoding COCO images, resizing them to
1024x1024 (LSJ's size, torchvision v2) and pasting 10 segments per image through CopyPasteCollate,
with the worker's allocator kept as glibc sets it or keeping freed memory (``keep_freed_memory``,
CopyPasteCollate's default). The two take turns, one epoch over coco-mini val2017 each, one worker
(the machine has 2 cores: the other is the training process's); ms per image, medians of rounds.
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

from sos_aug import CocoInstances, CopyPaste, CopyPasteCollate, RandomLayout  # noqa: E402


class Resized(Dataset):
    """A dataset's samples resized to ``size`` x ``size`` (image, boxes and masks together)."""

    def __init__(self, dataset: Dataset, size: int):
        self.dataset, self.resize = dataset, v2.Resize((size, size))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.resize(*self.dataset[i])


def epoch_ms_per_image(dataset: Dataset, cp: CopyPaste, keep: bool, batch: int) -> float:
    """One epoch through a fresh one-worker DataLoader, timed from its first batch on (worker start-up
    left out)."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=1,
                        collate_fn=CopyPasteCollate(cp, keep_freed_memory=keep),
                        generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    images = sum(len(images) for images, _ in batches)
    return (time.perf_counter() - start) * 1000 / images


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
    cp = CopyPaste(bank, layout=RandomLayout(scale=(0.5, 2.0)), num_pastes=(10, 10), open_vocabulary=True)
    times: dict[str, list[float]] = {"glibc default": [], "keep_freed_memory": []}
    for _ in range(args.rounds):
        for name in times:
            times[name].append(epoch_ms_per_image(dataset, cp, name == "keep_freed_memory", batch=8))
    rows = {name: statistics.median(t) for name, t in times.items()}
    print(f"machine: {machine()}; {len(dataset)} real COCO images decoded, resized to {args.size}², 10 segments "
          f"each, one DataLoader worker; medians of {args.rounds} epochs")
    for name, ms in rows.items():
        print(f"{name:20s} {ms:8.2f} ms/img   rounds: {', '.join(f'{t:.1f}' for t in times[name])}")
    print(f"keep_freed_memory: {rows['keep_freed_memory'] / rows['glibc default']:.2f}x the time")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "ms_per_image": rows, "all_rounds": times},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
