"""Does pasting make a detector better? One model and schedule, several arms and seeds, mask and box
AP by pycocotools on a held-out split.

    python benchmarks/train_effect.py --out bench_out/train_effect --seeds 0 1 2 --json summary.json

Arms (``--arms``): ``none`` (no pasting), ``mmdet`` (mmdetection's CopyPaste rule: objects of
another training image pasted at their own place and scale, covered instances updated exactly),
``random`` (sos_aug, RandomLayout), ``sos`` (sos_aug, SOSLayout), ``sos_relight`` (SOSLayout, then
the shipped net and LabBlend). The bank is built from the same training images only.

Default data: the facades set (``../shared/data/facades``, or ``$SOS_AUG_TEST_DATA/facades``),
a low-data training split drawn by :func:`sos_aug.split.split_coco` from ``train`` and evaluation
on ``valid``, three classes. Other COCO-format files by path (``--train``/``--val``).

Every run lives in ``OUT/runs/ARM-sSEED``: a checkpoint saved atomically every ``--ckpt-every``
steps (so a killed run resumes) and ``result.json`` when it finishes; the grid skips finished runs
with the same settings, so a grid longer than one sitting is completed over several.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, shared_data  # noqa: E402

from sos_aug import CocoInstances, CopyPaste, RandomLayout, SegmentBank, SOSLayout, build_bank, coco_source  # noqa: E402
from sos_aug.bank.sources import load_coco  # noqa: E402
from sos_aug.integrations.torchvision import coco_detections, coco_evaluate  # noqa: E402
from sos_aug.ops.masks import tight_boxes  # noqa: E402
from sos_aug.split import split_coco, write_json_atomic  # noqa: E402

ARMS = ("none", "mmdet", "random", "sos", "sos_relight")


@dataclass
class Settings:
    """Everything that decides a run's result; a run is reused only under the same settings."""

    train: str
    train_images: str
    val: str
    val_images: str
    classes: list[str]
    percent: float = 10.0
    fold: int = 1
    steps: int = 800
    batch: int = 2
    size: int = 384
    lr: float = 1e-3
    warmup: int = 100
    paste_p: float = 0.5
    pastes: tuple[int, int] = (1, 6)
    sampling: str = "uniform"
    eval_every: int = 400
    val_limit: int = 0  # 0: every validation image
    fpn_channels: int = 128
    mask_channels: int = 128
    rois_per_image: int = 128  # sampled for the box and mask heads (torchvision: 512)
    proposals: int = 1000  # kept by the RPN in training (torchvision: 2000)

    def key(self) -> str:
        """A digest of the settings; data paths count by their last two parts, so the same data at
        another place (another checkout, CI's clone) gives the same key."""
        fields = asdict(self)
        for name in ("train", "train_images", "val", "val_images"):
            fields[name] = "/".join(Path(fields[name]).parts[-2:])
        fields["pastes"] = list(fields["pastes"])
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# -- data ------------------------------------------------------------------------------------------


def prepare_data(s: Settings, work: Path) -> tuple[Path, Path, list[dict]]:
    """The low-data training file and the validation file, restricted to ``s.classes`` and with
    category ids renumbered 1..K (the model's labels): written once under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    train_file, val_file = work / "train.json", work / "val.json"
    if not train_file.exists():
        part, _ = split_coco(load_coco(s.train), s.percent, s.fold)
        write_json_atomic(train_file, restrict_classes(part, s.classes))
    if not val_file.exists():
        val = load_coco(s.val)
        if s.val_limit:
            val = {**val, "images": sorted(val["images"], key=lambda im: im["id"])[: s.val_limit]}
        write_json_atomic(val_file, restrict_classes(val, s.classes))
    return train_file, val_file, json.loads(train_file.read_text())["categories"]


def restrict_classes(data: dict, classes: list[str]) -> dict:
    """The COCO dict with only the named categories, renumbered 1..K in that order; images keep
    only annotations of those categories (images left without any are dropped)."""
    by_name = {c["name"]: c for c in data["categories"]}
    classes = classes or [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    missing = [n for n in classes if n not in by_name]
    if missing:
        raise SystemExit(f"categories {missing} are not in the file (it has {sorted(by_name)})")
    new_id = {by_name[n]["id"]: k + 1 for k, n in enumerate(classes)}
    anns = [{**a, "category_id": new_id[a["category_id"]]} for a in data["annotations"] if a["category_id"] in new_id]
    kept = {a["image_id"] for a in anns}
    return {**data, "categories": [{**by_name[n], "id": k + 1} for k, n in enumerate(classes)],
            "images": [im for im in data["images"] if im["id"] in kept], "annotations": anns}


def resized_samples(ann_file: Path, images: str, size: int) -> list[tuple[torch.Tensor, dict]]:
    """Every training sample with its longer side resized to ``size``, cached in memory; boxes are the
    tight boxes of the resized masks and instances that vanish at this size are left out."""
    out = []
    for image, target in CocoInstances(ann_file, images):
        h, w = image.shape[-2:]
        scale = size / max(h, w)
        hw = [round(h * scale), round(w * scale)]
        image = F.resize(image.as_subclass(torch.Tensor), hw, antialias=True)
        masks = F.resize(target["masks"].as_subclass(torch.Tensor).to(torch.uint8), hw,
                         interpolation=F.InterpolationMode.NEAREST).bool()
        keep = masks.flatten(1).any(1) & ~target["iscrowd"].bool()
        masks = masks[keep]
        out.append((image, {"boxes": tight_boxes(masks), "labels": target["labels"][keep], "masks": masks}))
    return out


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    w = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def fit_to(image: torch.Tensor, target: dict, hw: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """Crop or zero-pad (bottom/right, as mmdet's Pad) a sample to ``hw``; instances cut away are dropped."""
    h, w = hw
    canvas = torch.zeros(3, h, w, dtype=image.dtype)
    masks = torch.zeros(len(target["masks"]), h, w, dtype=torch.bool)
    sh, sw = min(h, image.shape[-2]), min(w, image.shape[-1])
    canvas[:, :sh, :sw] = image[:, :sh, :sw]
    masks[:, :sh, :sw] = target["masks"][:, :sh, :sw]
    keep = masks.flatten(1).any(1)
    return canvas, {"boxes": tight_boxes(masks[keep]), "labels": target["labels"][keep], "masks": masks[keep]}


# -- the mmdet rule --------------------------------------------------------------------------------


def mmdet_copy_paste(dst: tuple[torch.Tensor, dict], src: tuple[torch.Tensor, dict], g: torch.Generator,
                     max_num_pasted: int = 100, bbox_occluded_thr: int = 10,
                     mask_occluded_thr: int = 300) -> tuple[torch.Tensor, dict, int]:
    """mmdetection 3.3's ``CopyPaste`` on one pair: a random subset of ``src``'s objects (0 to all,
    at most ``max_num_pasted``) pasted at their own place and scale; every destination mask loses the
    pasted pixels, its box becomes its new mask's tight box, and it is dropped unless its box moved
    at most ``bbox_occluded_thr`` px on every side or it keeps more than ``mask_occluded_thr`` px.
    Returns the image, the target and how many objects were pasted (drawn from ``g``)."""
    image, target = dst
    src_image, src_target = fit_to(*src, tuple(image.shape[-2:]))
    n_src = len(src_target["labels"])
    num = int(torch.randint(0, min(n_src + 1, max_num_pasted), (1,), generator=g))
    if n_src == 0 or num == 0:
        return image, target, 0
    chosen = torch.randperm(n_src, generator=g)[:num].sort().values
    src_masks = src_target["masks"][chosen]
    covered = src_masks.any(0)
    masks = target["masks"] & ~covered
    boxes = tight_boxes(masks)
    unmoved = ((boxes - target["boxes"]).abs() <= bbox_occluded_thr).all(1)
    still = unmoved | (masks.flatten(1).sum(1) > mask_occluded_thr)
    out = {
        "boxes": torch.cat([boxes[still], src_target["boxes"][chosen]]),
        "labels": torch.cat([target["labels"][still], src_target["labels"][chosen]]),
        "masks": torch.cat([masks[still], src_masks]),
    }
    return torch.where(covered, src_image, image), out, num


# -- the model -------------------------------------------------------------------------------------


def build_model(num_classes: int, s: Settings) -> MaskRCNN:
    """Mask R-CNN from scratch on a GroupNorm ResNet-18 FPN (strides 4-32 plus a max-pooled level),
    anchors 16-256 px, a lighter mask head and fewer sampled RoIs than torchvision's defaults (the
    convolutions' backward pass is most of a CPU step); nothing is downloaded."""
    body = resnet18(weights=None, norm_layer=partial(nn.GroupNorm, 32))
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [64, 128, 256, 512], s.fpn_channels, extra_blocks=LastLevelMaxPool())
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return MaskRCNN(backbone, min_size=s.size, max_size=s.size,
                    rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=s.proposals,
                    rpn_post_nms_top_n_train=s.proposals, box_batch_size_per_image=s.rois_per_image,
                    mask_head=MaskRCNNHeads(s.fpn_channels, [s.mask_channels] * 4, 1),
                    box_predictor=FastRCNNPredictor(1024, num_classes + 1),
                    mask_predictor=MaskRCNNPredictor(s.mask_channels, s.mask_channels, num_classes + 1))


def lr_factor(step: int, s: Settings) -> float:
    """Linear warm-up, then cosine decay to zero at ``s.steps``."""
    if step < s.warmup:
        return (step + 1) / s.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, s.steps - s.warmup)))


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Batcher:
    """Training batches of one arm: an epoch-wise shuffled order, a flip, then the arm's pasting;
    every draw from one generator, saved with the checkpoint."""

    samples: list
    arm: str
    s: Settings
    copy_paste: CopyPaste | None
    g: torch.Generator
    order: list[int] = field(default_factory=list)
    pasted: int = 0

    def next(self) -> tuple[list[torch.Tensor], list[dict]]:
        images, targets = [], []
        for _ in range(self.s.batch):
            image, target = self._draw()
            if self.arm == "mmdet" and float(torch.rand(1, generator=self.g)) < self.s.paste_p:
                image, target, n = mmdet_copy_paste((image, target), self._draw(), self.g)
                self.pasted += n
            images.append(image)
            targets.append(target)
        if self.copy_paste is not None:
            images, targets = self.copy_paste(images, targets, generator=self.g)
            self.pasted += sum(int(t["is_pasted"].sum()) for t in targets)
        return images, targets

    def _draw(self) -> tuple[torch.Tensor, dict]:
        if not self.order:
            self.order = torch.randperm(len(self.samples), generator=self.g).tolist()
        image, target = self.samples[self.order.pop()]
        if float(torch.rand(1, generator=self.g)) < 0.5:
            image, target = hflip(image, target)
        return image, target


def arm_copy_paste(arm: str, bank: SegmentBank, s: Settings) -> CopyPaste | None:
    if arm in ("none", "mmdet"):
        return None
    layout = RandomLayout() if arm == "random" else SOSLayout()
    relight = None
    if arm == "sos_relight":
        from sos_aug.relight import LabBlend, RelightNet

        relight = [RelightNet.pretrained(), LabBlend()]
    return CopyPaste(bank.with_sampling(s.sampling), layout=layout, num_pastes=tuple(s.pastes), p=s.paste_p,
                     relight=relight)


def model_targets(targets: list[dict]) -> list[dict]:
    return [{"boxes": t["boxes"].as_subclass(torch.Tensor).float(), "labels": t["labels"],
             "masks": t["masks"].as_subclass(torch.Tensor).to(torch.uint8)} for t in targets]


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_run(arm: str, seed: int, s: Settings, data: dict, run_dir: Path, ckpt_every: int = 50,
              progress: bool = True) -> dict:
    """Train one (arm, seed), resuming from its checkpoint; returns and writes its result."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    torch.manual_seed(seed)
    model = build_model(len(data["categories"]), s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(1000 + seed)
    batcher = Batcher(data["samples"], arm, s, arm_copy_paste(arm, data["bank"], s), g)
    state = {"step": 0, "losses": [], "curve": [], "seconds": 0.0}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        if saved["key"] != s.key():
            raise SystemExit(f"{ckpt}: saved under other settings; remove it to start this run afresh")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        g.set_state(saved["generator"])
        batcher.order, batcher.pasted = saved["order"], saved["pasted"]
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
    bar = tqdm(total=s.steps, initial=state["step"], desc=f"{arm} s{seed}", disable=not progress, unit="step")
    model.train()
    t0 = time.monotonic()
    while state["step"] < s.steps:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = s.lr * lr_factor(step, s)
        images, targets = batcher.next()
        losses = model([im.float().div(255) for im in images], model_targets(targets))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{arm} seed {seed}: loss {loss.item()} at step {step}")
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        state["losses"].append(round(loss.item(), 5))
        state["step"] = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = state["step"]
        if done % s.eval_every == 0 and done < s.steps:
            metrics = evaluate(model, data["val_file"], s.val_images, bootstrap=0)
            state["curve"].append({"step": done, **{k: metrics[k] for k in ("bbox_AP", "segm_AP")}})
            model.train()
        if done % ckpt_every == 0 or done == s.steps:
            state["seconds"] += time.monotonic() - t0
            t0 = time.monotonic()
            save_atomic({"key": s.key(), "model": model.state_dict(), "opt": opt.state_dict(),
                         "generator": g.get_state(), "order": batcher.order, "pasted": batcher.pasted,
                         "torch_rng": torch.get_rng_state(), "state": state}, ckpt)
    bar.close()
    metrics = evaluate(model, data["val_file"], s.val_images)
    state["curve"].append({"step": s.steps, **{k: metrics[k] for k in ("bbox_AP", "segm_AP")}})
    result = {"arm": arm, "seed": seed, "key": s.key(), "settings": asdict(s), "metrics": metrics,
              "curve": state["curve"], "losses": state["losses"], "pasted": batcher.pasted,
              "train_seconds": round(state["seconds"], 1), "machine": machine()}
    write_json_atomic(run_dir / "result.json", result)
    ckpt.unlink(missing_ok=True)
    return result


# -- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: MaskRCNN, val_file: Path, images: str, bootstrap: int = 200, seed: int = 0) -> dict:
    """Box and mask AP, AP50 and per-category AP by COCOeval on ``val_file``; with ``bootstrap``,
    the standard deviation of AP over validation images resampled with replacement."""
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val_file))
    dets = [coco_detections(model([image.as_subclass(torch.Tensor).float().div(255)])[0], target["image_id"])
            for image, target in CocoInstances(val_file, images, only_annotated=False)]
    evals = coco_evaluate(gt, dets)
    metrics: dict = {}
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(gt.getImgIds()), len(gt.getImgIds())) for _ in range(bootstrap)]
    for kind, ev in evals.items():
        metrics[f"{kind}_AP"] = round(100 * ev.stats[0], 2) if ev else 0.0
        metrics[f"{kind}_AP50"] = round(100 * ev.stats[1], 2) if ev else 0.0
        metrics[f"{kind}_per_category"] = per_category_ap(ev, gt) if ev else {}
        if draws and ev:
            metrics[f"{kind}_AP_bootstrap_std"] = round(float(np.std([bootstrap_ap(ev, d) for d in draws])), 2)
    return metrics


def per_category_ap(ev: COCOeval, gt: COCO) -> dict[str, float]:
    """AP (IoU 0.5:0.95, all areas, 100 detections) of each category; -1 where it has no instance."""
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        out[gt.cats[cat_id]["name"]] = round(100 * float(p.mean()), 2) if p.size else -1.0
    return out


def bootstrap_ap(ev: COCOeval, draw: np.ndarray) -> float:
    """AP over a resampled list of validation images: COCOeval's per-image matches reused, only
    accumulated again (images drawn twice count twice)."""
    n = len(ev.params.imgIds)
    k_n, a_n = len(ev.params.catIds), len(ev.params.areaRng)
    again = copy.copy(ev)
    again.params = copy.deepcopy(ev.params)
    again.params.imgIds = list(range(len(draw)))
    again._paramsEval = copy.deepcopy(again.params)
    again.evalImgs = [ev.evalImgs[k * a_n * n + a * n + int(i)] for k in range(k_n) for a in range(a_n) for i in draw]
    with contextlib.redirect_stdout(io.StringIO()):
        again.accumulate()
    p = again.eval["precision"][:, :, :, 0, -1]
    p = p[p > -1]
    return 100 * float(p.mean()) if p.size else 0.0


# -- the grid --------------------------------------------------------------------------------------


def load_data(s: Settings, work: Path) -> dict:
    train_file, val_file, categories = prepare_data(s, work / "data")
    bank_dir = work / "data" / "bank"
    if not (bank_dir / "meta.json").exists():
        build_bank(bank_dir, coco_source(train_file, s.train_images), progress=False)
    return {"samples": resized_samples(train_file, s.train_images, s.size), "bank": SegmentBank(bank_dir),
            "val_file": val_file, "categories": categories}


def run_grid(s: Settings, arms: list[str], seeds: list[int], out: Path, ckpt_every: int = 50,
             progress: bool = True, results_dir: Path | None = None) -> list[dict]:
    """Every (seed, arm) run not finished yet under these settings, seed by seed; returns all results.
    A run counts as finished when ``results_dir`` (the record kept in the repository) or its own
    folder holds its result under the same settings key; finished results are copied there."""
    work = out / s.key()
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "settings.json", asdict(s))
    data = None
    results = []
    for seed in seeds:
        for arm in arms:
            run_dir = work / "runs" / f"{arm}-s{seed}"
            done = finished(s, arm, seed, [run_dir / "result.json"]
                            + ([results_dir / f"{arm}-s{seed}.json"] if results_dir else []))
            if done is None:
                data = data or load_data(s, work)
                done = train_run(arm, seed, s, data, run_dir, ckpt_every, progress)
            elif progress:
                print(f"{arm} seed {seed}: finished before, skipped", file=sys.stderr)
            if results_dir is not None:
                results_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(results_dir / f"{arm}-s{seed}.json", done)
            results.append(done)
    return results


def finished(s: Settings, arm: str, seed: int, places: list[Path]) -> dict | None:
    """The first result of (arm, seed) under these settings found in ``places``, or None."""
    for path in places:
        if path.exists():
            result = json.loads(path.read_text())
            if result.get("key") == s.key():
                return result
    return None


def finished_results(s: Settings, places: list[Path]) -> list[dict]:
    """Every finished result under these settings in ``places`` (one per arm and seed)."""
    found: dict[tuple, dict] = {}
    for place in places:
        for path in sorted(place.glob("*.json")) + sorted(place.glob("runs/*/result.json")):
            result = json.loads(path.read_text())
            if isinstance(result, dict) and result.get("key") == s.key():
                found.setdefault((result["arm"], result["seed"]), result)
    return list(found.values())


def summarize(results: list[dict], baseline: str = "none") -> dict:
    """Per arm: mean and std over seeds of each headline metric, and the paired difference against
    ``baseline`` over the seeds both finished."""
    keys = ["bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"]
    by_arm: dict[str, dict[int, dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r["metrics"]
    summary = {}
    for arm, runs in by_arm.items():
        row: dict = {"seeds": sorted(runs)}
        for k in keys:
            values = np.array([m[k] for m in runs.values()])
            row[k] = {"mean": round(float(values.mean()), 2), "std": round(float(values.std(ddof=1)), 2)
                      if len(values) > 1 else None}
            base = by_arm.get(baseline, {})
            paired = [runs[sd][k] - base[sd][k] for sd in runs if sd in base]
            if arm != baseline and paired:
                d = np.array(paired)
                row[f"{k}_vs_{baseline}"] = {"mean": round(float(d.mean()), 2),
                                             "std": round(float(d.std(ddof=1)), 2) if len(d) > 1 else None,
                                             "seeds": len(d)}
        cats = sorted({c for m in runs.values() for c in m.get("segm_per_category", {})})
        row["segm_per_category"] = {c: round(float(np.mean([m["segm_per_category"].get(c, 0) for m in runs.values()])),
                                             2) for c in cats}
        row["bootstrap_std_segm_AP"] = round(float(np.mean([m.get("segm_AP_bootstrap_std", 0)
                                                            for m in runs.values()])), 2)
        summary[arm] = row
    return summary


def markdown_table(summary: dict, baseline: str = "none") -> str:
    """The summary as the README's table: mean ± std over seeds, paired differences against the
    baseline, window mask AP, and the validation-bootstrap spread."""
    def pm(v: dict | None) -> str:
        if not v:
            return "-"
        sign = "+" if v.get("seeds") else ""
        spread = f" ± {v['std']:.2f}" if v.get("std") is not None else ""
        return f"{v['mean']:{sign}.2f}{spread}"

    lines = ["| arm | seeds | box AP | mask AP | box AP50 | mask AP50 | box AP vs none | mask AP vs none | "
             "window mask AP | bootstrap std (mask AP) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = [a for a in ARMS if a in summary]
    for arm in order:
        r = summary[arm]
        lines.append(f"| {arm} | {len(r['seeds'])} | {pm(r['bbox_AP'])} | {pm(r['segm_AP'])} | {pm(r['bbox_AP50'])} | "
                     f"{pm(r['segm_AP50'])} | {pm(r.get(f'bbox_AP_vs_{baseline}'))} | "
                     f"{pm(r.get(f'segm_AP_vs_{baseline}'))} | {r['segm_per_category'].get('window', '-')} | "
                     f"{r['bootstrap_std_segm_AP']} |")
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path) -> None:
    """AP at each checkpoint, one line per run, coloured by arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours = dict(zip(ARMS, ["black", "tab:orange", "tab:blue", "tab:green", "tab:purple"]))
    seen = set()
    for r in results:
        steps = [c["step"] for c in r["curve"]]
        for ax, key in zip(axes, ("bbox_AP", "segm_AP")):
            ax.plot(steps, [c[key] for c in r["curve"]], marker="o", color=colours.get(r["arm"], "grey"),
                    label=r["arm"] if (r["arm"], key) not in seen else None, alpha=0.8)
            seen.add((r["arm"], key))
    for ax, key in zip(axes, ("box AP", "mask AP")):
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/train_effect", help="where runs and results go (default %(default)s)")
    p.add_argument("--train", help="training COCO file (default: facades train)")
    p.add_argument("--train-images", help="its images (default: facades train)")
    p.add_argument("--val", help="evaluation COCO file (default: facades valid)")
    p.add_argument("--val-images", help="its images (default: facades valid)")
    p.add_argument("--classes", default="window,balcony-fence,vegetation",
                   help="comma-separated category names to train and evaluate; empty: all (default %(default)s)")
    p.add_argument("--percent", type=float, default=10.0, help="training split: percent of the training file's "
                   "images, drawn as mmdet's split_coco does (default %(default)s)")
    p.add_argument("--fold", type=int, default=1, help="split fold (its seed; default %(default)s)")
    p.add_argument("--arms", nargs="+", default=["none", "mmdet", "sos"], choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=384, help="longer image side in training (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--paste-p", type=float, default=0.5, help="probability an image is pasted into")
    p.add_argument("--pastes", type=int, nargs=2, default=[1, 6], metavar=("LOW", "HIGH"),
                   help="segments per pasted image for the sos_aug arms (default 1 6)")
    p.add_argument("--sampling", default="uniform", choices=["uniform", "category_balanced", "repeat_factor"],
                   help="bank sampling for the sos_aug arms; uniform follows the training set's class "
                   "frequencies (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=400, help="steps between curve points (default %(default)s)")
    p.add_argument("--val-limit", type=int, default=0, help="evaluate on the first N validation images (0: all)")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--markdown", action="store_true", help="print the summary as a markdown table")
    p.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "docs" / "train_effect"),
                   help="where finished results are kept and looked up (default: docs/train_effect)")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--summary-only", action="store_true", help="summarise the finished runs, train nothing")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    facades = None
    if not (args.train and args.val):
        facades = shared_data("facades")
    return Settings(
        train=args.train or str(facades / "train" / "annotations.json"),
        train_images=args.train_images or str(facades / "train"),
        val=args.val or str(facades / "valid" / "annotations.json"),
        val_images=args.val_images or str(facades / "valid"),
        classes=[c for c in args.classes.split(",") if c], percent=args.percent, fold=args.fold, steps=args.steps,
        batch=args.batch, size=args.size, lr=args.lr, warmup=args.warmup, paste_p=args.paste_p,
        pastes=tuple(args.pastes), sampling=args.sampling, eval_every=args.eval_every, val_limit=args.val_limit,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings_from(args)
    out, results_dir = Path(args.out), Path(args.results)
    if not args.summary_only:
        run_grid(s, args.arms, args.seeds, out, args.ckpt_every, results_dir=results_dir)
    results = finished_results(s, [results_dir, out / s.key()])
    summary = {"settings": asdict(s), "key": s.key(), "machine": machine(), "arms": summarize(results)}
    if results:
        results_dir.mkdir(parents=True, exist_ok=True)
        plot_curves(results, results_dir / "curves.png")
    text = json.dumps(summary, indent=1)
    print(markdown_table(summary["arms"]) if args.markdown else text)
    if args.json:
        Path(args.json).write_text(text)
    return summary


if __name__ == "__main__":
    main()
