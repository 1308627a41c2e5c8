"""Does pasting make a detector better? One model and schedule, several arms and seeds, mask and box
AP by pycocotools on a held-out split, paired differences with bootstrap intervals.

    python benchmarks/train_effect.py                        # the pre-registered grid (docs/train_effect.md)
    python benchmarks/train_effect.py --summary-only --markdown  # its table, from docs/train_effect/lite0

Arms (``--arms``), each pasting into an image with probability ``--paste-p``:

- ``none``: no pasting.
- ``mmdet``: mmdetection 3.3's CopyPaste rule: a random subset (0 to all) of another labelled
  image's objects at their own place and scale, covered instances updated exactly.
- ``random`` / ``sos`` / ``stats``: sos_aug with RandomLayout / SOSLayout / DatasetStatsLayout
  (sizes of the labelled file's own instances), ``--pastes`` segments from a bank of the labelled
  images.
- ``sos_relight``: the ``--relight-layout`` layout, then the shipped net and LabBlend.
- ``external``: as ``sos_relight``, but the bank holds the segments of training images *outside*
  the labelled split (never trained on themselves: SOS's extra segments).
- ``mmdet_external``: the mmdet rule with those same images as partners, taking as many of a
  partner's objects as ``external`` pastes (``--pastes``), so only the method differs.

Data: the facades set (``../shared/data/facades`` or ``$SOS_AUG_TEST_DATA/facades``): a low-data
split drawn by :func:`sos_aug.split.split_coco` from ``train`` (with ``--distinct-photos``, train
photos that are another scale of a ``valid`` photo are removed first, and the external pool holds no
copy of a labelled photo), three classes, evaluation on ``valid``. ``--test ANN --test-images DIR``
also scores every final model on that split (finished runs too, from their saved weights).

Every run lives in ``OUT/KEY/runs/ARM-sSEED``: a checkpoint saved atomically every ``--ckpt-every``
steps (a killed run resumes), the final weights, and ``result.json``. Finished results (settings,
augmentation and commit recorded, data paths relative to the data root) and their COCOeval match
records are copied to ``--results``; a rerun skips them, so a grid spans several sittings.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import nn
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ap_bootstrap  # noqa: E402
from _common import machine, portable, shared_data  # noqa: E402
from detectors import BACKBONES, build_model  # noqa: E402

from sos_aug import CocoInstances, CopyPaste, RandomLayout, SegmentBank, SOSLayout, build_bank, coco_source  # noqa: E402
from sos_aug.coco import load_coco  # noqa: E402
from sos_aug.integrations.torchvision import coco_detections, coco_evaluate  # noqa: E402
from sos_aug.layout import DatasetStatsLayout  # noqa: E402
from sos_aug.ops.files import atomic_write_json  # noqa: E402
from sos_aug.ops.masks import tight_boxes  # noqa: E402
from sos_aug.split import split_coco  # noqa: E402

ARMS = ("none", "mmdet", "random", "sos", "stats", "sos_relight", "external", "mmdet_external")
# the pre-registered grid (docs/train_effect.md), the recommended default (sos_relight) right after none
GRID_ARMS = ("none", "sos_relight", "mmdet", "stats", "sos", "external", "mmdet_external")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    """The data, model and schedule: a run is reused only under the same settings (:meth:`key`)."""

    train: str
    train_images: str
    val: str
    val_images: str
    classes: list[str]
    percent: float = 10.0
    fold: int = 1
    steps: int = 600
    batch: int = 2
    size: int = 512
    lr: float = 3e-4
    warmup: int = 100
    eval_every: int = 300
    val_limit: int = 0  # 0: every validation image
    fpn_channels: int = 128
    mask_channels: int = 128
    rois_per_image: int = 128  # sampled for the box and mask heads (torchvision: 512)
    proposals: int = 1000  # kept by the RPN in training (torchvision: 2000)
    backbone: str = "lite0"
    distinct_photos: bool = True  # drop train photos that are another scale of a validation photo

    def key(self) -> str:
        """A digest of the settings; data paths count by their last two parts, so the same data at
        another place (another checkout, CI's clone) gives the same key."""
        fields = asdict(self)
        for name in ("train", "train_images", "val", "val_images"):
            fields[name] = "/".join(Path(fields[name]).parts[-2:])
        return _digest(fields)

    def portable(self) -> dict:
        """The settings as result files record them (data paths relative to the data root)."""
        fields = asdict(self)
        for name in ("train", "train_images", "val", "val_images"):
            fields[name] = portable(fields[name])
        return fields


@dataclass
class Augment:
    """How the arms paste; each arm's share of it (:meth:`of`) is hashed into its results, so runs
    of an arm are paired only under the same augmentation."""

    paste_p: float = 0.5
    pastes: tuple[int, int] = (6, 18)  # as many surviving pastes per pasted image as mmdet's rule (~11-12)
    sampling: str = "uniform"
    relight_layout: str = "stats"  # the layout of sos_relight and external: the recommended default

    def of(self, arm: str) -> dict:
        """What decides ``arm``'s augmentation (nothing for ``none``)."""
        if arm == "none":
            return {}
        if arm == "mmdet":
            return {"rule": "mmdet", "paste_p": self.paste_p, "partners": "labelled", "count": "0..all"}
        if arm == "mmdet_external":
            return {"rule": "mmdet", "paste_p": self.paste_p, "partners": "external", "count": list(self.pastes)}
        layout = {"random": "random", "sos": "sos", "stats": "stats"}.get(arm, self.relight_layout)
        relit = arm in ("sos_relight", "external")
        return {"layout": layout, "paste_p": self.paste_p, "pastes": list(self.pastes), "sampling": self.sampling,
                "relight": ["net", "lab"] if relit else None, "bank": "external" if arm == "external" else "labelled"}

    def key(self, arm: str) -> str:
        return _digest(self.of(arm))


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# -- data ------------------------------------------------------------------------------------------


def photo_key(file_name: str) -> str:
    """The photo an image file shows, whatever its export: Roboflow's ``.rf.HASH`` suffix and the
    facades set's ``_scaled_N`` variants removed (other names are their own photo)."""
    stem = file_name.split(".rf.")[0]
    return re.sub(r"_scaled_\d+", "", stem)


def without_photos(data: dict, photos: set[str]) -> dict:
    """``data`` without the images (and their annotations) that show one of ``photos``."""
    images = [im for im in data["images"] if photo_key(im["file_name"]) not in photos]
    ids = {im["id"] for im in images}
    return {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}


def prepare_data(s: Settings, work: Path) -> dict[str, Path]:
    """The labelled training file, the external pool (the other training images, no copy of a
    labelled photo) and the validation file, restricted to ``s.classes`` with ids renumbered 1..K
    (the model's labels): written once under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    files = {name: work / f"{name}.json" for name in ("train", "external", "val")}
    if not all(f.exists() for f in files.values()):
        val = load_coco(s.val)
        train = load_coco(s.train)
        if s.distinct_photos:
            train = without_photos(train, {photo_key(im["file_name"]) for im in val["images"]})
        part, rest = split_coco(train, s.percent, s.fold)
        rest = without_photos(rest, {photo_key(im["file_name"]) for im in part["images"]})
        if s.val_limit:
            val = {**val, "images": sorted(val["images"], key=lambda im: im["id"])[: s.val_limit]}
        for name, data in (("train", part), ("external", rest), ("val", val)):
            atomic_write_json(files[name], restrict_classes(data, s.classes))
    return files


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


def resize_sample(image: torch.Tensor, target: dict, size: int) -> tuple[torch.Tensor, dict]:
    """A sample with its longer side resized to ``size``; boxes are the tight boxes of the resized
    masks and crowd regions and instances that vanish at this size are left out."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    hw = [round(h * scale), round(w * scale)]
    image = F.resize(image.as_subclass(torch.Tensor), hw, antialias=True)
    masks = F.resize(target["masks"].as_subclass(torch.Tensor).to(torch.uint8), hw,
                     interpolation=F.InterpolationMode.NEAREST).bool()
    keep = masks.flatten(1).any(1) & ~target["iscrowd"].bool()
    masks = masks[keep]
    return image, {"boxes": tight_boxes(masks), "labels": target["labels"][keep], "masks": masks}


def resized_samples(ann_file: Path, images: str, size: int) -> list[tuple[torch.Tensor, dict]]:
    """Every sample of the file resized (:func:`resize_sample`), held in memory."""
    return [resize_sample(image, target, size) for image, target in CocoInstances(ann_file, images)]


class ResizedOnRead(Sequence):
    """The samples of a file resized as they are read: a pool too large to hold in memory."""

    def __init__(self, ann_file: Path, images: str, size: int):
        self.dataset, self.size = CocoInstances(ann_file, images), size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return resize_sample(*self.dataset[i], self.size)


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
                     max_num_pasted: int = 100, bbox_occluded_thr: int = 10, mask_occluded_thr: int = 300,
                     count: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict, int]:
    """mmdetection 3.3's ``CopyPaste`` on one pair: a random subset of ``src``'s objects (0 to all,
    at most ``max_num_pasted``; with ``count``, a number drawn uniformly in that inclusive range,
    at most all) pasted at their own place and scale; every destination mask loses the pasted
    pixels, its box becomes its new mask's tight box, and it is dropped unless its box moved at most
    ``bbox_occluded_thr`` px on every side or it keeps more than ``mask_occluded_thr`` px.
    Returns the image, the target and how many objects were pasted (drawn from ``g``)."""
    image, target = dst
    src_image, src_target = fit_to(*src, tuple(image.shape[-2:]))
    n_src = len(src_target["labels"])
    if count is None:
        num = int(torch.randint(0, min(n_src + 1, max_num_pasted), (1,), generator=g))
    else:
        num = min(n_src, int(torch.randint(count[0], count[1] + 1, (1,), generator=g)))
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
        "is_pasted": torch.cat([torch.zeros(int(still.sum()), dtype=torch.bool), torch.ones(num, dtype=torch.bool)]),
    }
    return torch.where(covered, src_image, image), out, num


# -- one run ---------------------------------------------------------------------------------------


def lr_factor(step: int, s: Settings) -> float:
    """Linear warm-up, then cosine decay to zero at ``s.steps``."""
    if step < s.warmup:
        return (step + 1) / s.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, s.steps - s.warmup)))


@dataclass
class Batcher:
    """Training batches of one arm: an epoch-wise shuffled order, a flip, then the arm's pasting;
    every draw from one generator, saved with the checkpoint. ``pasted`` counts pasted objects
    that survived, ``pasted_into`` the images that got any."""

    samples: Sequence
    s: Settings
    g: torch.Generator
    copy_paste: CopyPaste | None = None
    partners: Sequence | None = None  # the mmdet rule's partner images
    count: tuple[int, int] | None = None  # the mmdet rule's count (None: its own 0..all)
    paste_p: float = 0.5
    order: list[int] = field(default_factory=list)
    pasted: int = 0
    pasted_into: int = 0

    def next(self) -> tuple[list[torch.Tensor], list[dict]]:
        images, targets = [], []
        for _ in range(self.s.batch):
            image, target = self._draw()
            if self.partners is not None and float(torch.rand(1, generator=self.g)) < self.paste_p:
                partner = self.partners[int(torch.randint(len(self.partners), (1,), generator=self.g))]
                image, target, _ = mmdet_copy_paste((image, target), self._flipped(partner), self.g,
                                                    count=self.count)
            images.append(image)
            targets.append(target)
        if self.copy_paste is not None:
            images, targets = self.copy_paste(images, targets, generator=self.g)
        for t in targets:
            n = int(t["is_pasted"].sum()) if "is_pasted" in t else 0
            self.pasted += n
            self.pasted_into += n > 0
        return images, targets

    def _draw(self) -> tuple[torch.Tensor, dict]:
        if not self.order:
            self.order = torch.randperm(len(self.samples), generator=self.g).tolist()
        return self._flipped(self.samples[self.order.pop()])

    def _flipped(self, sample: tuple[torch.Tensor, dict]) -> tuple[torch.Tensor, dict]:
        if float(torch.rand(1, generator=self.g)) < 0.5:
            return hflip(*sample)
        return sample


def arm_batcher(arm: str, s: Settings, aug: Augment, data: dict, g: torch.Generator) -> Batcher:
    """The batcher that draws ``arm``'s training batches."""
    spec = aug.of(arm)
    if arm == "none":
        return Batcher(data["samples"], s, g)
    if spec.get("rule") == "mmdet":
        partners = data["samples"] if spec["partners"] == "labelled" else data["external_samples"]
        count = None if arm == "mmdet" else tuple(aug.pastes)
        return Batcher(data["samples"], s, g, partners=partners, count=count, paste_p=aug.paste_p)
    layouts = {"random": RandomLayout, "sos": SOSLayout, "stats": lambda: DatasetStatsLayout(data["files"]["train"])}
    relight = None
    if spec["relight"]:
        from sos_aug.relight import LabBlend, RelightNet

        relight = [RelightNet.pretrained(), LabBlend()]
    bank = data["external_bank" if spec["bank"] == "external" else "bank"].with_sampling(aug.sampling)
    cp = CopyPaste(bank, layout=layouts[spec["layout"]](), num_pastes=tuple(aug.pastes), p=aug.paste_p,
                   relight=relight)
    return Batcher(data["samples"], s, g, copy_paste=cp)


def model_targets(targets: list[dict]) -> list[dict]:
    return [{"boxes": t["boxes"].as_subclass(torch.Tensor).float(), "labels": t["labels"],
             "masks": t["masks"].as_subclass(torch.Tensor).to(torch.uint8)} for t in targets]


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def commit() -> str:
    """The checkout's commit, with ``+changes`` where src/ or benchmarks/ differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--", "src", "benchmarks") else "")


def train_run(arm: str, seed: int, s: Settings, aug: Augment, data: dict, run_dir: Path, ckpt_every: int = 50,
              progress: bool = True) -> dict:
    """Train one (arm, seed), resuming from its checkpoint; returns and writes its result, keeps
    the final weights (``final.pt``) and the validation match records (``matches.npz``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    keys = {"key": s.key(), "aug_key": aug.key(arm)}
    torch.manual_seed(seed)
    model = build_model(len(data["categories"]), s.backbone, s.size, s.fpn_channels, s.mask_channels,
                        s.rois_per_image, s.proposals)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(1000 + seed)
    batcher = arm_batcher(arm, s, aug, data, g)
    state = {"step": 0, "losses": [], "curve": [], "seconds": 0.0, "commit": commit()}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        if {k: saved.get(k) for k in keys} != keys:
            raise SystemExit(f"{ckpt}: saved under other settings; remove it to start this run afresh")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        g.set_state(saved["generator"])
        batcher.order, batcher.pasted, batcher.pasted_into = saved["order"], saved["pasted"], saved["pasted_into"]
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
            metrics, _ = evaluate(model, data["files"]["val"], s.val_images, bootstrap=0)
            state["curve"].append({"step": done, **{k: metrics[k] for k in ("bbox_AP", "segm_AP")}})
            model.train()
        if done % ckpt_every == 0 or done == s.steps:
            state["seconds"] += time.monotonic() - t0
            t0 = time.monotonic()
            save_atomic({**keys, "model": model.state_dict(), "opt": opt.state_dict(), "generator": g.get_state(),
                         "order": batcher.order, "pasted": batcher.pasted, "pasted_into": batcher.pasted_into,
                         "torch_rng": torch.get_rng_state(), "state": state}, ckpt)
    bar.close()
    t_eval = time.monotonic()
    metrics, records = evaluate(model, data["files"]["val"], s.val_images)
    ap_bootstrap.save(records, run_dir / "matches.npz")
    state["curve"].append({"step": s.steps, **{k: metrics[k] for k in ("bbox_AP", "segm_AP")}})
    save_atomic(model.state_dict(), run_dir / "final.pt")
    result = {"arm": arm, "seed": seed, **keys, "augment": aug.of(arm), "commit": state.get("commit"),
              "settings": s.portable(), "metrics": metrics, "curve": state["curve"], "losses": state["losses"],
              "pasted": batcher.pasted, "pasted_into": batcher.pasted_into, "train_seconds": round(state["seconds"], 1),
              "eval_seconds": round(time.monotonic() - t_eval, 1), "machine": machine()}
    if data.get("test"):
        result["test"] = score_test(model, data["test"])
    atomic_write_json(run_dir / "result.json", result)
    ckpt.unlink(missing_ok=True)
    return result


# -- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, val_file: Path, images: str, bootstrap: int = 200,
             seed: int = 0) -> tuple[dict, dict]:
    """Box and mask AP, AP50 and per-category AP by COCOeval on ``val_file``; with ``bootstrap``,
    the standard deviation of AP over validation images resampled with replacement. Also returns
    the match records (:mod:`ap_bootstrap`) that paired bootstraps are drawn from."""
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val_file))
    dets = [coco_detections(model([image.as_subclass(torch.Tensor).float().div(255)])[0], target["image_id"])
            for image, target in CocoInstances(val_file, images, only_annotated=False)]
    evals = coco_evaluate(gt, dets)
    metrics: dict = {}
    records: dict = {}
    rng = np.random.default_rng(seed)
    n = len(gt.getImgIds())
    for kind, ev in evals.items():
        metrics[f"{kind}_AP"] = round(100 * ev.stats[0], 2) if ev else 0.0
        metrics[f"{kind}_AP50"] = round(100 * ev.stats[1], 2) if ev else 0.0
        if not ev:
            metrics[f"{kind}_per_category"] = {}
            continue
        records[kind] = ap_bootstrap.match_records(ev)
        per_cat = ap_bootstrap.average_precision(records[kind], per_category=True)
        metrics[f"{kind}_per_category"] = {gt.cats[c]["name"]: (round(float(v), 2) if np.isfinite(v) else -1.0)
                                           for c, v in zip(ev.params.catIds, per_cat)}
        if bootstrap:
            draws = [np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(bootstrap)]
            spread = [ap_bootstrap.average_precision(records[kind], d) for d in draws]
            metrics[f"{kind}_AP_bootstrap_std"] = round(float(np.std(spread)), 2)
    return metrics, records


def score_test(model: nn.Module, test: dict) -> dict:
    """The final model's metrics on the test split, recorded with the split's portable path."""
    metrics, _ = evaluate(model, test["file"], test["images"], bootstrap=0)
    return {"file": portable(test["source"]), **metrics}


# -- the grid --------------------------------------------------------------------------------------


def load_data(s: Settings, work: Path, arms: Sequence[str], aug: Augment, test: dict | None = None) -> dict:
    """What the runs of ``arms`` read: the labelled samples in memory, banks, partners, the files."""
    files = prepare_data(s, work / "data")
    data = {"files": files, "categories": json.loads(files["train"].read_text())["categories"],
            "samples": resized_samples(files["train"], s.train_images, s.size)}
    specs = [aug.of(a) for a in arms]
    if any(sp.get("bank") == "labelled" for sp in specs):
        data["bank"] = _bank(work / "data" / "bank", files["train"], s.train_images)
    if any(sp.get("bank") == "external" for sp in specs):
        data["external_bank"] = _bank(work / "data" / "external_bank", files["external"], s.train_images)
    if any(sp.get("partners") == "external" for sp in specs):
        data["external_samples"] = ResizedOnRead(files["external"], s.train_images, s.size)
    if test:
        data["test"] = prepare_test(s, work / "data", test)
    return data


def _bank(folder: Path, ann_file: Path, images: str) -> SegmentBank:
    if not (folder / "meta.json").exists():
        build_bank(folder, coco_source(ann_file, images), progress=False)
    return SegmentBank(folder)


def prepare_test(s: Settings, work: Path, test: dict) -> dict:
    """The test file restricted to the grid's classes (written once, named by its digest)."""
    path = work / f"test-{_digest(portable(test['ann']))}.json"
    if not path.exists():
        atomic_write_json(path, restrict_classes(load_coco(test["ann"]), s.classes))
    return {"file": path, "images": test["images"], "source": test["ann"]}


def run_grid(s: Settings, aug: Augment, arms: list[str], seeds: list[int], out: Path, ckpt_every: int = 50,
             progress: bool = True, results_dir: Path | None = None, test: dict | None = None) -> list[dict]:
    """Every (seed, arm) run not finished yet under these settings and augmentation, seed by seed;
    returns all results. A run counts as finished when ``results_dir`` (the record kept in the
    repository) or its own folder holds its result under the same keys; finished results and their
    match records are copied there."""
    work = out / s.key()
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "settings.json", s.portable())
    data = None
    results = []
    for seed in seeds:
        for arm in arms:
            run_dir = work / "runs" / f"{arm}-s{seed}-{aug.key(arm)}"
            places = [run_dir / "result.json"] + ([results_dir / f"{arm}-s{seed}.json"] if results_dir else [])
            done = finished(s, aug, arm, seed, places)
            if done is None:
                data = data or load_data(s, work, arms, aug, test)
                done = train_run(arm, seed, s, aug, data, run_dir, ckpt_every, progress)
            elif progress:
                print(f"{arm} seed {seed}: finished before, skipped", file=sys.stderr)
            if test and "test" not in done and (run_dir / "final.pt").exists():
                data = data or load_data(s, work, arms, aug, test)
                done["test"] = score_test(_final_model(s, data, run_dir), data["test"])
                atomic_write_json(run_dir / "result.json", done)
            if results_dir is not None:
                results_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(results_dir / f"{arm}-s{seed}.json", done)
                if (run_dir / "matches.npz").exists():
                    (results_dir / f"{arm}-s{seed}.matches.npz").write_bytes((run_dir / "matches.npz").read_bytes())
            results.append(done)
    return results


def _final_model(s: Settings, data: dict, run_dir: Path) -> nn.Module:
    model = build_model(len(data["categories"]), s.backbone, s.size, s.fpn_channels, s.mask_channels,
                        s.rois_per_image, s.proposals)
    model.load_state_dict(torch.load(run_dir / "final.pt"))
    return model


def finished(s: Settings, aug: Augment, arm: str, seed: int, places: list[Path]) -> dict | None:
    """The first result of (arm, seed) under these settings and augmentation in ``places``, or None."""
    for path in places:
        if path.exists():
            result = json.loads(path.read_text())
            if result.get("key") == s.key() and result.get("aug_key") == aug.key(arm):
                return result
    return None


def finished_results(s: Settings, places: list[Path]) -> list[dict]:
    """Every finished result under these settings in ``places`` (one per arm, seed and augmentation),
    with ``matches`` set to its match records' path where they were kept."""
    found: dict[tuple, dict] = {}
    for place in places:
        for path in sorted(place.glob("*.json")) + sorted(place.glob("runs/*/result.json")):
            result = json.loads(path.read_text())
            if isinstance(result, dict) and result.get("key") == s.key():
                matches = path.with_name(path.name.replace(".json", ".matches.npz")) \
                    if path.name != "result.json" else path.with_name("matches.npz")
                result["matches"] = str(matches) if matches.exists() else None
                found.setdefault((result["arm"], result["seed"], result.get("aug_key")), result)
    return list(found.values())


# -- the command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/train_effect", help="where runs and results go (default %(default)s)")
    p.add_argument("--train", help="training COCO file (default: facades train)")
    p.add_argument("--train-images", help="its images (default: facades train)")
    p.add_argument("--val", help="evaluation COCO file (default: facades valid)")
    p.add_argument("--val-images", help="its images (default: facades valid)")
    p.add_argument("--test", help="a further COCO file every final model is scored on (finished runs too)")
    p.add_argument("--test-images", help="its images")
    p.add_argument("--classes", default="window,balcony-fence,vegetation",
                   help="comma-separated category names to train and evaluate; empty: all (default %(default)s)")
    p.add_argument("--percent", type=float, default=Settings.percent, help="training split: percent of the "
                   "training file's images, drawn as mmdet's split_coco does (default %(default)s)")
    p.add_argument("--fold", type=int, default=Settings.fold, help="split fold (its seed; default %(default)s)")
    p.add_argument("--distinct-photos", action=argparse.BooleanOptionalAction, default=Settings.distinct_photos,
                   help="drop training photos that are another scale of a validation photo first (default on)")
    p.add_argument("--backbone", default=Settings.backbone, choices=BACKBONES,
                   help="scratch: GroupNorm ResNet-18 from scratch; lite0: ImageNet EfficientNet-Lite0 "
                   "(default %(default)s)")
    p.add_argument("--arms", nargs="+", default=list(GRID_ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--batch", type=int, default=Settings.batch)
    p.add_argument("--size", type=int, default=Settings.size,
                   help="longer image side in training (default %(default)s)")
    p.add_argument("--lr", type=float, default=Settings.lr, help="AdamW, cosine decay (default %(default)s)")
    p.add_argument("--warmup", type=int, default=Settings.warmup)
    p.add_argument("--paste-p", type=float, default=Augment.paste_p, help="probability an image is pasted into")
    p.add_argument("--pastes", type=int, nargs=2, default=list(Augment.pastes), metavar=("LOW", "HIGH"),
                   help="segments per pasted image for the sos_aug arms and mmdet_external (default %(default)s)")
    p.add_argument("--sampling", default=Augment.sampling, choices=["uniform", "category_balanced", "repeat_factor"],
                   help="bank sampling for the sos_aug arms; uniform follows the training set's class "
                   "frequencies (default %(default)s)")
    p.add_argument("--relight-layout", default=Augment.relight_layout, choices=["random", "sos", "stats"],
                   help="the layout of sos_relight and external (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=Settings.eval_every,
                   help="steps between curve points (default %(default)s)")
    p.add_argument("--val-limit", type=int, default=0, help="evaluate on the first N validation images (0: all)")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--markdown", action="store_true", help="print the summary as a markdown table")
    p.add_argument("--results", default=str(REPO / "docs" / "train_effect" / "lite0"),
                   help="where finished results are kept and looked up (default: docs/train_effect/lite0)")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--summary-only", action="store_true", help="summarise the finished runs, train nothing")
    p.add_argument("--diagnose", type=int, metavar="BATCHES", default=0,
                   help="train nothing: draw this many batches of each arm and plot pasted sizes, positions and "
                   "counts against the real instances (RESULTS/diagnosis.png)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> tuple[Settings, Augment]:
    facades = None
    if not (args.train and args.val):
        facades = shared_data("facades")
    s = Settings(
        train=args.train or str(facades / "train" / "annotations.json"),
        train_images=args.train_images or str(facades / "train"),
        val=args.val or str(facades / "valid" / "annotations.json"),
        val_images=args.val_images or str(facades / "valid"),
        classes=[c for c in args.classes.split(",") if c], percent=args.percent, fold=args.fold, steps=args.steps,
        batch=args.batch, size=args.size, lr=args.lr, warmup=args.warmup, eval_every=args.eval_every,
        val_limit=args.val_limit, backbone=args.backbone, distinct_photos=args.distinct_photos,
    )
    aug = Augment(paste_p=args.paste_p, pastes=tuple(args.pastes), sampling=args.sampling,
                  relight_layout=args.relight_layout)
    return s, aug


def main(argv: list[str] | None = None) -> dict:
    import train_effect_report as report

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s, aug = settings_from(args)
    out, results_dir = Path(args.out), Path(args.results)
    test = {"ann": args.test, "images": args.test_images} if args.test else None
    if args.test and not args.test_images:
        raise SystemExit("--test needs --test-images")
    if args.diagnose:
        work = out / s.key()
        data = load_data(s, work, args.arms, aug)
        batchers = {arm: arm_batcher(arm, s, aug, data, torch.Generator().manual_seed(0))
                    for arm in args.arms if arm != "none"}
        return report.diagnose(batchers, s.batch, data, args.diagnose, results_dir)
    if not args.summary_only:
        run_grid(s, aug, args.arms, args.seeds, out, args.ckpt_every, results_dir=results_dir, test=test)
    results = finished_results(s, [results_dir, out / s.key()])
    summary = report.summarize(results, {arm: aug.key(arm) for arm in ARMS})
    summary = {"settings": s.portable(), "key": s.key(), "augment": {a: aug.of(a) for a in args.arms},
               "machine": machine(), **summary}
    if results:
        results_dir.mkdir(parents=True, exist_ok=True)
        report.plot_curves([r for r in results if r.get("aug_key") == aug.key(r["arm"])], results_dir / "curves.png")
    text = json.dumps(summary, indent=1)
    tables = (report.markdown_table(summary) + "\n\nMask AP per class (mean over seeds):\n\n"
              + report.per_class_table(summary))
    print(tables if args.markdown else text)
    if args.json:
        Path(args.json).write_text(text)
    return summary


if __name__ == "__main__":
    main()
