"""examples/train_torchvision.py's data side, as a user copies it: a real DataLoader worker with
CopyPaste and relighting in its collate (or pasting after the transfer) gives Mask R-CNN targets
that match their masks. The model's steps are left out: a Mask R-CNN step takes ~40 s on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import math
import socket
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


def trainer_args(tmp_path, coco_mini, val_ann, bank, *extra) -> list[str]:
    return ["--coco", str(val_ann), "--images", str(coco_mini / "val2017"), "--bank", str(bank),
            "--val", str(val_ann), "--val-images", str(coco_mini / "val2017"), "--val-limit", "2",
            "--backbone", "resnet18", "--size", "256", "--workers", "0", "--relight", "none", "--device", "cpu",
            "--out", str(tmp_path / "run"), *extra]


@pytest.mark.slow
def test_the_trainer_trains_evaluates_checkpoints_and_resumes(example, tmp_path, coco_mini, val_ann, train_bank):
    args = trainer_args(tmp_path, coco_mini, val_ann, train_bank.root)
    first = example.main(args + ["--iters", "1"])
    assert len(first["losses"]) == 1 and all(math.isfinite(x) for x in first["losses"])
    assert (tmp_path / "run" / "last.pt").is_file()
    evals = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evals[-1]["iter"] == 1 and {"bbox_AP", "segm_AP"} <= set(evals[-1])
    resumed = example.main(args + ["--iters", "2", "--resume"])
    assert resumed["iter"] == 2 and len(resumed["losses"]) == 2
    assert resumed["losses"][0] == first["losses"][0]  # the history came back from the checkpoint
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["iter"] == 2


def _rank(r: int, world: int, port: int, argv: list[str]) -> None:
    import os

    os.environ.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    path = Path(__file__).resolve().parents[1] / "examples" / "train_torchvision.py"
    spec = importlib.util.spec_from_file_location("train_torchvision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_ranks_draw_differently_and_reproducibly(tmp_path, coco_mini, val_ann, train_bank):
    draws = []
    for attempt in range(2):
        out = tmp_path / f"ddp{attempt}"
        argv = trainer_args(tmp_path, coco_mini, val_ann, train_bank.root, "--iters", "1", "--log-draws")
        argv[argv.index("--out") + 1] = str(out)
        del argv[6:12]  # no evaluation: --val, --val-images, --val-limit
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_rank, args=(2, port, argv), nprocs=2, join=True)
        draws.append([json.loads((out / f"draws-rank{r}.json").read_text()) for r in range(2)])
    assert draws[0] == draws[1]  # the same seed draws the same on every rank
    assert draws[0][0] != draws[0][1]  # and each rank draws its own
    assert all(len(d[0]) == 2 for d in draws[0])  # one iteration, two images per rank
