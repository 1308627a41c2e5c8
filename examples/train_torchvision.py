"""A plain torchvision loop with sos_aug: Mask R-CNN on COCO with CopyPaste in the DataLoader workers.

    python examples/train_torchvision.py --coco ANN --images DIR --bank BANK [--steps 20] [--device cuda]
        [--paste-on device]

``--paste-on workers`` (default) composites in the DataLoader workers; ``--paste-on device`` lets the
workers only decode segments and draw layouts, and composites the batch on ``--device`` after the
transfer (batched on a GPU).

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--bank", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--paste-on", choices=["workers", "device"], default="workers")
    args = p.parse_args()
    on_device = args.paste_on == "device"

    if not (Path(args.bank) / "meta.json").exists():
        build_bank(args.bank, coco_source(args.coco, args.images), workers=args.workers)
    bank = SegmentBank(args.bank, sampling="category_balanced")
    cp = CopyPaste(bank, layout=SOSLayout(), num_pastes=(1, 8), label_map=label_map_from_coco(args.coco))

    resize = v2.Compose([v2.RandomResize(480, 640, antialias=True), v2.RandomHorizontalFlip()])
    dataset = CocoInstances(args.coco, args.images)

    class Resized(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return resize(*dataset[i])

    loader = DataLoader(Resized(), batch_size=2, shuffle=True, num_workers=args.workers,
                        collate_fn=CopyPasteCollate(cp, defer=on_device), persistent_workers=args.workers > 0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            images, targets = batch[0], batch[1]
            if on_device:  # the workers decoded the segments and drew the layout; composite here
                images = [im.to(args.device) for im in images]
                targets = [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
                images, targets = cp(images, targets, segments=batch[2].to(args.device))
            images = [im.float().div(255).to(args.device) for im in images]
            targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).float().to(args.device),
                        "labels": t["labels"].to(args.device),
                        "masks": t["masks"].as_subclass(torch.Tensor).to(torch.uint8).to(args.device)}
                       for t in targets]
            losses = model(images, targets)
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
