"""Train torchvision's Mask R-CNN on a COCO-format set with sos_aug: large-scale jitter, CopyPaste in
the DataLoader workers or on the device, COCOeval (bbox and segm), checkpoints and resume, DDP.

    python examples/train_torchvision.py --coco ANN --images DIR --bank BANK --out runs/x \\
        [--val ANN --val-images DIR] [--iters 90000] [--eval-every 5000] [--resume] \\
        [--paste-on workers|device] [--relight none|net|net+lab] [--device cuda] [--weights LOCAL.pth]
    torchrun --nproc-per-node 8 examples/train_torchvision.py ...   # one process per GPU (gloo on CPU)

``--paste-on workers`` (default) composites in the DataLoader workers; ``--paste-on device`` lets the
workers only decode segments and draw layouts, and composites the batch on ``--device`` after the
transfer (batched on a GPU). The bank is built from ``--coco`` if BANK does not exist. Each rank and
each worker draws differently, and a run with the same ``--seed`` draws the same. Nothing is
downloaded: the model starts from scratch unless ``--weights`` names a local state dict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from tqdm import tqdm

from sos_aug import CocoInstances, CopyPaste, CopyPasteCollate, build_bank, coco_source
from sos_aug.integrations.torchvision import coco_detections, coco_evaluate, large_scale_jitter, summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco", required=True, help="training instances JSON")
    p.add_argument("--images", required=True, help="training image folder")
    p.add_argument("--bank", required=True, help="segment bank (built from --coco if missing)")
    p.add_argument("--val", help="validation instances JSON for COCOeval")
    p.add_argument("--val-images", help="validation image folder")
    p.add_argument("--val-limit", type=int, default=0, help="evaluate on the first N validation images (0: all)")
    p.add_argument("--out", default="runs/torchvision", help="checkpoints and eval.json (default %(default)s)")
    p.add_argument("--iters", type=int, default=20, help="training iterations (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=0, help="COCOeval every N iterations and at the end (0: end only)")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N iterations (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--batch", type=int, default=2, help="images per rank and iteration (default %(default)s)")
    p.add_argument("--size", type=int, default=640, help="LSJ canvas side in pixels (default %(default)s)")
    p.add_argument("--backbone", choices=["resnet50", "resnet18"], default="resnet50")
    p.add_argument("--weights", help="a local Mask R-CNN state dict to start from")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate for 16 images (scaled linearly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (default %(default)s)")
    p.add_argument("--paste-on", choices=["workers", "device"], default="workers")
    p.add_argument("--relight", choices=["none", "net", "net+lab"], default="net+lab")
    p.add_argument("--num-pastes", type=int, nargs=2, default=(1, 8), metavar=("LOW", "HIGH"))
    p.add_argument("--no-paste", action="store_true", help="the baseline: the same loop without CopyPaste")
    p.add_argument("--log-draws", action="store_true", help="write the pasted bank rows per iteration (tests)")
    return p.parse_args(argv)


class Resized(torch.utils.data.Dataset):
    """A dataset's samples through a torchvision v2 transform (image, boxes and masks together)."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.transform(*self.dataset[i])


def make_copy_paste(args: argparse.Namespace) -> CopyPaste | None:
    """The CopyPaste over the bank (built first where missing), labels = the COCO file's category ids."""
    if args.no_paste:
        return None
    if not (Path(args.bank) / "meta.json").exists() and rank() == 0:
        build_bank(args.bank, coco_source(args.coco, args.images), workers=max(args.workers, 1))
    barrier()
    return CopyPaste.from_names(bank=args.bank, sampling="category_balanced", layout="sos",
                                num_pastes=args.num_pastes, label_map=args.coco, relight=args.relight)


def make_loader(args: argparse.Namespace, cp: CopyPaste | None = None) -> tuple[CopyPaste | None, DataLoader]:
    """Jittered COCO samples, CopyPaste in the collate; each rank sees its own shard and draws."""
    cp = cp if cp is not None or args.no_paste else make_copy_paste(args)
    dataset = Resized(CocoInstances(args.coco, args.images), large_scale_jitter(args.size))
    sampler = DistributedSampler(dataset, seed=args.seed) if dist.is_initialized() else None
    collate = CopyPasteCollate(cp, defer=args.paste_on == "device") if cp is not None else _tuples
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, collate_fn=collate, persistent_workers=args.workers > 0,
                        drop_last=True, generator=torch.Generator().manual_seed(args.seed * 1000 + rank()))
    return cp, loader


def _tuples(batch):
    return tuple(zip(*batch))


def build_model(args: argparse.Namespace, num_classes: int) -> MaskRCNN:
    """Mask R-CNN with a GroupNorm ResNet FPN from scratch (no download); ``--weights`` loads local ones."""
    body = (resnet50 if args.backbone == "resnet50" else resnet18)(weights=None, norm_layer=partial(nn.GroupNorm, 32))
    widths = [256, 512, 1024, 2048] if args.backbone == "resnet50" else [64, 128, 256, 512]
    backbone = BackboneWithFPN(body, {f"layer{k + 1}": str(k) for k in range(4)}, widths, 256,
                               extra_blocks=LastLevelMaxPool())
    model = MaskRCNN(backbone, num_classes=num_classes, min_size=args.size, max_size=args.size)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    return model


def model_input(images, targets, device) -> tuple[list[torch.Tensor], list[dict]]:
    """What torchvision's Mask R-CNN takes: float images in [0, 1], plain-tensor targets."""
    images = [im.as_subclass(torch.Tensor).float().div(255).to(device) for im in images]
    targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).float().to(device),
                "labels": t["labels"].to(device),
                "masks": t["masks"].as_subclass(torch.Tensor).to(torch.uint8).to(device)}
               for t in targets]
    return images, targets


@torch.no_grad()
def evaluate(model: nn.Module, args: argparse.Namespace) -> dict:
    """COCOeval bbox and segm on ``--val`` (this rank's share of the images, merged on rank 0)."""
    was_training = model.training
    model.eval()
    val = CocoInstances(args.val, args.val_images, only_annotated=False)
    n = min(len(val), args.val_limit) if args.val_limit else len(val)
    mine, ids = [], []
    for i in range(rank(), n, world()):
        image, target = val[i]
        out = model([image.as_subclass(torch.Tensor).float().div(255).to(args.device)])[0]
        mine.append(coco_detections({k: v.cpu() for k, v in out.items()}, target["image_id"]))
        ids.append(int(target["image_id"]))
    if dist.is_initialized():
        gathered = [None] * world()
        dist.all_gather_object(gathered, (mine, ids))
        mine, ids = [d for g in gathered for d in g[0]], [i for g in gathered for i in g[1]]
    model.train(was_training)
    return summary(coco_evaluate(args.val, mine, image_ids=ids)) if rank() == 0 else {}


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> dict:
    """Train; returns ``{"losses": [...], "eval": [...], "iter": last}`` (rank 0's view)."""
    args = parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():  # torchrun
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    torch.manual_seed(args.seed * 1000 + rank())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cp, loader = make_loader(args)
    num_classes = max(c["id"] for c in CocoInstances(args.coco, args.images).categories) + 1
    model = build_model(args, num_classes).to(args.device)
    lr = args.lr * args.batch * world() / 16
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    warmup = max(1, min(1000, args.iters // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, args.iters) / args.iters)))
    start, history = 0, {"losses": [], "eval": [], "draws": []}
    ckpt = out / "last.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, history = state["iter"], state["history"]
    ddp = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    model.train()
    bar = tqdm(total=args.iters, initial=start, desc="train", disable=rank() != 0, unit="it")
    it, epoch, t0 = start, start // max(len(loader), 1), time.perf_counter()
    while it < args.iters:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            images, targets = batch[0], batch[1]
            if cp is not None and args.paste_on == "device":  # the workers drew; composite after the transfer
                images = [im.to(args.device, non_blocking=True) for im in images]
                targets = [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
                images, targets = cp(images, targets, segments=batch[2].to(args.device))
            if args.log_draws:
                history["draws"].append([t["pasted_rows"].tolist() for t in targets if "pasted_rows" in t])
            losses = ddp(*model_input(images, targets, args.device))
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            history["losses"].append(loss.item())
            speed = args.batch * world() * (it - start) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{history['losses'][-1]:.3f}", img_s=f"{speed:.1f}")
            bar.update()
            last = it >= args.iters
            if args.val and ((args.eval_every and it % args.eval_every == 0) or last):
                metrics = evaluate(model, args)
                if rank() == 0:
                    history["eval"].append({"iter": it, **metrics})
                    (out / "eval.json").write_text(json.dumps(history["eval"], indent=1))
                    bar.write(f"iter {it}: {metrics}")
            if rank() == 0 and (it % args.ckpt_every == 0 or last):
                save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                             "iter": it, "history": history, "args": vars(args)}, ckpt)
            if last:
                break
        epoch += 1
    bar.close()
    if args.log_draws:
        (out / f"draws-rank{rank()}.json").write_text(json.dumps(history["draws"]))
    barrier()
    return {**history, "iter": it}


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
