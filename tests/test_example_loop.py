"""examples/train_torchvision.py's data side, as a user copies it: a real DataLoader worker with
CopyPaste and relighting in its collate (or pasting after the transfer) gives Mask R-CNN targets
that match their masks. The model's steps are left out: a Mask R-CNN step takes ~40 s on 2 cores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torchvision.ops import masks_to_boxes


@pytest.fixture(scope="module")
def example():
    path = Path(__file__).resolve().parents[1] / "examples" / "train_torchvision.py"
    spec = importlib.util.spec_from_file_location("train_torchvision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_model_input(images, targets, example):
    inputs, model_targets = example.model_input(images, targets, "cpu")
    for image, target, pasted in zip(inputs, model_targets, (t["is_pasted"] for t in targets)):
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        masks = target["masks"].bool()
        assert len(masks) == len(target["labels"]) == len(target["boxes"]) and masks.flatten(1).any(1).all()
        tight = masks_to_boxes(masks) + torch.tensor([0, 0, 1, 1])  # pixel-edge boxes
        # pasted (and covered) instances get their mask's tight box; untouched ones keep the box that
        # torchvision's resize scaled, within a pixel of their nearest-resized mask's
        assert torch.equal(target["boxes"][pasted], tight[pasted])
        assert (target["boxes"] - tight).abs().max() <= 1
        assert target["masks"].shape[-2:] == image.shape[-2:]


@pytest.mark.parametrize("paste_on, workers, relight", [("workers", 1, "net+lab"), ("device", 0, "net")])
def test_example_loader_gives_exact_targets_with_relighting(example, train_bank, val_ann, coco_mini,
                                                             paste_on, workers, relight):
    args = example.parse_args(["--coco", str(val_ann), "--images", str(coco_mini / "val2017"), "--bank",
                               str(train_bank.root), "--workers", str(workers), "--paste-on", paste_on,
                               "--relight", relight, "--device", "cpu"])
    cp, loader = example.make_loader(args)
    assert cp.relight is not None
    batch = next(iter(loader))
    images, targets = batch[0], batch[1]
    if paste_on == "device":
        assert len(batch) == 3
        images, targets = cp(list(images), list(targets), segments=batch[2])
    assert sum(int(t["is_pasted"].sum()) for t in targets) > 0
    check_model_input(images, targets, example)
