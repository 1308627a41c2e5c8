"""Relighting evaluation on real instances at 256x256 (as iHarmony4), two suites, five methods.

For every non-crowd instance above ``min_area`` pixels (at 256²): perturb its foreground (suite
``parametric``: a seeded draw of the training family; suite ``transfer``: Lab statistics moved part of
the way toward another real instance's, same category where possible), then let each method try to
undo it. Reports MSE, fMSE (foreground) and PSNR on the 0-255 scale and foreground CIEDE2000, for
``as_is`` (do nothing), ``reinhard``, ``lab_blend``, ``net`` and ``oracle`` (the net's transform family
fitted to the truth: the ceiling). Every method must leave background pixels exactly unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from tqdm import tqdm

from ..bank.sources import segmentation_to_mask
from .classical import LabBlend, ReinhardTransfer, RelightBatch, relight
from .color import delta_e2000, rgb_to_lab
from .family import apply_family, fit_family
from .net import RelightNet, context_boxes
from .perturb import masked_stats, parametric, transfer

SIZE = 256
METHODS = ("as_is", "reinhard", "lab_blend", "net", "oracle")


def metrics(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """MSE, fMSE, PSNR (0-255 scale) and mean foreground CIEDE2000 of (3, H, W) images in [0, 1]."""
    err = ((pred - truth) * 255) ** 2
    mse = float(err.mean())
    fmse = float(err[:, mask].mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)
    de = delta_e2000(rgb_to_lab(pred[None])[0], rgb_to_lab(truth[None])[0])
    return {"mse": mse, "fmse": fmse, "psnr": psnr, "de2000": float(de[mask].mean())}


def load_instances(ann_file: str | Path, images: str | Path, min_area: int = 400,
                   image_ids: list[int] | None = None):
    """(image (3, 256, 256) float, mask (256, 256) bool, category, Lab stats (6,)) per usable instance."""
    data = json.loads(Path(ann_file).read_text())
    if image_ids is not None:
        wanted = set(image_ids)
        data["images"] = [im for im in data["images"] if im["id"] in wanted]
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd"):
            by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for info in sorted(data["images"], key=lambda im: im["id"]):
        anns = by_image.get(info["id"])
        if not anns:
            continue
        with Image.open(Path(images) / info["file_name"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        img = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()[None] / 255
        img = nnf.interpolate(img, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        img = img[0].clamp(0, 1)
        for a in sorted(anns, key=lambda a: a["id"]):
            try:
                m = torch.from_numpy(segmentation_to_mask(a["segmentation"], h, w)).float()[None, None]
            except ValueError:
                continue
            m = nnf.interpolate(m, size=(SIZE, SIZE), mode="area")[0, 0] >= 0.5
            if int(m.sum()) < min_area:
                continue
            mean, std = masked_stats(rgb_to_lab(img[None]), m[None, None].float())
            out.append((img, m, a["category_id"], torch.cat([mean, std], 1).flatten()))
    return out


def _reference(instances, i: int, g: torch.Generator) -> torch.Tensor:
    """Lab stats of another instance, of the same category where one exists."""
    cat = instances[i][2]
    same = [j for j, x in enumerate(instances) if x[2] == cat and j != i]
    pool = same or [j for j in range(len(instances)) if j != i]
    return instances[pool[int(torch.randint(len(pool), (1,), generator=g))]][3]


def oracle(composite: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The transform family fitted to the truth over the segment's context window."""
    x0, y0, x1, y1 = (int(v) for v in context_boxes(mask[None])[0].tolist())
    win, tgt = composite[None, :, y0:y1, x0:x1], truth[None, :, y0:y1, x0:x1]
    m = mask[None, None, y0:y1, x0:x1].float()
    params = fit_family(win, tgt, m, steps=200)
    out = composite.clone()
    with torch.no_grad():
        fitted = apply_family(params, win)[0].clamp(0, 1)
    out[:, y0:y1, x0:x1] = torch.where(mask[y0:y1, x0:x1], fitted, out[:, y0:y1, x0:x1])
    return out


def evaluate(ann_file, images, net: RelightNet | None = None, min_area: int = 400, seed: int = 0,
             limit: int | None = None, with_oracle: bool = True, progress: bool = True,
             image_ids: list[int] | None = None, baselines: bool = True) -> dict:
    """Run both suites; returns {"suites": {suite: {method: {metric: mean}}}, "instances": n}."""
    net = net if net is not None else RelightNet.pretrained()
    instances = load_instances(ann_file, images, min_area, image_ids)[:limit]
    methods = {"as_is": None, "reinhard": ReinhardTransfer(), "lab_blend": LabBlend(), "net": net}
    if not baselines:
        methods = {"as_is": None, "net": net}
    results = {}
    for suite in ("parametric", "transfer"):
        g = torch.Generator().manual_seed(seed)
        sums: dict[str, dict[str, float]] = {}
        for i, (img, mask, _, _) in enumerate(tqdm(instances, desc=f"relight eval {suite}", disable=not progress)):
            alpha = mask[None, None].float()
            if suite == "parametric":
                comp = parametric(img[None], alpha, g)[0]
            else:
                amount = 0.4 + 0.4 * torch.rand(1, generator=g)
                comp = transfer(img[None], alpha, _reference(instances, i, g)[None], amount)[0]
            batch = RelightBatch([comp], [comp], [mask[None]])
            for name, method in methods.items():
                pred = comp if method is None else relight(method, batch)[0]
                _check_background(pred, comp, mask, name)
                _accumulate(sums, name, metrics(pred, img, mask))
            if with_oracle:
                _accumulate(sums, "oracle", metrics(oracle(comp, img, mask), img, mask))
        results[suite] = {m: {k: v / len(instances) for k, v in d.items()} for m, d in sums.items()}
    unperturbed = {}
    for name, method in methods.items():  # a harmonious input should come back nearly unchanged
        if method is not None:
            total = 0.0
            for img, mask, _, _ in instances:
                pred = relight(method, RelightBatch([img], [img], [mask[None]]))[0]
                total += metrics(pred, img, mask)["fmse"]
            unperturbed[name] = total / len(instances)
    return {"instances": len(instances), "size": SIZE, "min_area": min_area, "seed": seed, "suites": results,
            "unperturbed_fmse": unperturbed}


def _accumulate(sums, name, values) -> None:
    acc = sums.setdefault(name, {k: 0.0 for k in values})
    for k, v in values.items():
        acc[k] += v


def _check_background(pred: torch.Tensor, comp: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if not torch.equal(pred[:, ~mask], comp[:, ~mask]):
        raise AssertionError(f"relighter {name!r} changed background pixels")


def format_table(result: dict) -> str:
    lines = [f"{result['instances']} instances at {result['size']}², min area {result['min_area']} px, "
             f"seed {result['seed']}"]
    for suite, rows in result["suites"].items():
        lines.append(f"\n{suite}:  {'method':10s} {'MSE':>8s} {'fMSE':>8s} {'PSNR':>7s} {'dE2000':>7s}  fMSE vs as_is")
        base = rows["as_is"]["fmse"]
        for name in METHODS:
            if name in rows:
                r = rows[name]
                lines.append(f"{'':12s}{name:10s} {r['mse']:8.1f} {r['fmse']:8.1f} {r['psnr']:7.2f} "
                             f"{r['de2000']:7.2f}  {100 * (r['fmse'] / base - 1):+.0f}%")
    if result.get("unperturbed_fmse"):
        lines.append("\nunperturbed input, fMSE of the output vs the input (0 = unchanged): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in result["unperturbed_fmse"].items()))
    return "\n".join(lines)
