"""A plain torchvision loop with sos_aug: Mask R-CNN on COCO with CopyPaste in the DataLoader workers.

    python examples/train_torchvision.py --coco ANN --images DIR --bank BANK [--steps 20] [--device cuda]
        [--paste-on device] [--relight net+lab]

``--paste-on workers`` (default) composites in the DataLoader workers; ``--paste-on device`` lets the
workers only decode segments and draw layouts, and composites the batch on ``--device`` after the
transfer (batched on a GPU). ``--relight`` relights the pasted segments where they are composited
(default: the shipped net, then SOS's Lab blending; the net's CPU path compiled once, before the
workers fork).

Builds the bank first if BANK does not exist (from the same COCO file). Runs a few steps; it is a
template for a real loop, not a recipe with tuned hyper-parameters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.transforms import v2

from sos_aug import (
    CocoInstances,
    CopyPaste,
    CopyPasteCollate,
    SegmentBank,
    SOSLayout,
    build_bank,
    coco_source,
    label_map_from_coco,
)
from sos_aug.relight import LabBlend, RelightNet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--bank", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--paste-on", choices=["workers", "device"], default="workers")
    p.add_argument("--relight", choices=["none", "net", "net+lab"], default="net+lab")
    return p.parse_args(argv)


def make_loader(args: argparse.Namespace) -> tuple[CopyPaste, DataLoader]:
    """The CopyPaste and the DataLoader: resized, flipped COCO samples, CopyPaste in the collate."""
    if not (Path(args.bank) / "meta.json").exists():
        build_bank(args.bank, coco_source(args.coco, args.images), workers=args.workers)
    bank = SegmentBank(args.bank, sampling="category_balanced")
    relight = {"none": None, "net": [RelightNet.pretrained(compile_cpu=True)],
               "net+lab": [RelightNet.pretrained(compile_cpu=True), LabBlend()]}[args.relight]
    cp = CopyPaste(bank, layout=SOSLayout(), num_pastes=(1, 8), label_map=label_map_from_coco(args.coco),
                   relight=relight)
    resized = Resized(CocoInstances(args.coco, args.images),
                      v2.Compose([v2.RandomResize(480, 640, antialias=True), v2.RandomHorizontalFlip()]))
    loader = DataLoader(resized, batch_size=2, shuffle=True, num_workers=args.workers,
                        collate_fn=CopyPasteCollate(cp, defer=args.paste_on == "device"),
                        persistent_workers=args.workers > 0)
    return cp, loader


class Resized(torch.utils.data.Dataset):
    """A dataset's samples through a torchvision v2 transform (image, boxes and masks together)."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.transform(*self.dataset[i])


def model_input(images, targets, device) -> tuple[list[torch.Tensor], list[dict]]:
    """What torchvision's Mask R-CNN takes: float images in [0, 1], plain-tensor targets."""
    images = [im.float().div(255).to(device) for im in images]
    targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).float().to(device),
                "labels": t["labels"].to(device),
                "masks": t["masks"].as_subclass(torch.Tensor).to(torch.uint8).to(device)}
               for t in targets]
    return images, targets


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cp, loader = make_loader(args)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            images, targets = batch[0], batch[1]
            if args.paste_on == "device":  # the workers decoded the segments and drew the layout; composite here
                images = [im.to(args.device) for im in images]
                targets = [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
                images, targets = cp(images, targets, segments=batch[2].to(args.device))
            losses = model(*model_input(images, targets, args.device))
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"step {step}: loss {loss.item():.3f}")
            step += 1
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
