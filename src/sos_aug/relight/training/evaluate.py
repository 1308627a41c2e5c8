"""Relighting evaluation on real instances at 256x256 (as iHarmony4), two suites, every method and chain.

For every non-crowd instance above ``min_area`` pixels (at 256²): perturb its foreground (suite
``parametric``: a seeded draw of the training family; suite ``transfer``: Lab statistics moved part of
the way toward another real instance's, same category where possible), then let each method try to
undo it. Reports MSE, fMSE (foreground) and PSNR on the 0-255 scale and foreground CIEDE2000, for
``as_is`` (do nothing), ``reinhard``, ``lab_blend``, ``net`` and ``oracle`` (the net's transform family
fitted to the truth: the ceiling), and the chains ``net+lab`` (the net, then :class:`LabBlend` with
a/b from the unrelit composite, as SOS) and ``net+lab_relit_ab`` (a/b from the net's output), with
``lab_blend_relit_ab`` beside ``lab_blend``. Every method must leave background pixels exactly
unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from ...coco import Skips, annotated_photos, describe_skips
from ...ops.color import delta_e2000, rgb_to_lab
from ..batch import RelightBatch, relight
from ..classical import LabBlend, ReinhardTransfer
from ..family import apply_family, fit_family
from ..net import RelightNet, context_boxes
from .data import downsample_mask, lab_stats, resize_photo
from .perturb import parametric, transfer

SIZE = 256
METHODS = ("as_is", "reinhard", "lab_blend", "lab_blend_relit_ab", "net", "net+lab", "net+lab_relit_ab", "oracle")


class NoInstancesError(ValueError):
    """Nothing to evaluate: no readable instance passes the size filter."""


def metrics(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """MSE, fMSE, PSNR (0-255 scale) and mean foreground CIEDE2000 of (3, H, W) images in [0, 1]."""
    err = ((pred - truth) * 255) ** 2
    mse = float(err.mean())
    fmse = float(err[:, mask].mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)
    de = delta_e2000(rgb_to_lab(pred), rgb_to_lab(truth))
    return {"mse": mse, "fmse": fmse, "psnr": psnr, "de2000": float(de[mask].mean())}


def load_instances(ann_file: str | Path, images: str | Path, min_area: int = 400,
                   image_ids: list[int] | None = None, skips: Skips | None = None):
    """(image (3, 256, 256) float, mask (256, 256) bool, category, Lab stats (6,)) per usable
    instance; unreadable images and bad segmentations are counted in ``skips``."""
    out = []
    for _, rgb, pairs in annotated_photos(ann_file, images, image_ids, skips):
        img = resize_photo(rgb, (SIZE, SIZE))
        for a, mask in sorted(pairs, key=lambda pair: pair[0]["id"]):
            m = downsample_mask(mask, (SIZE, SIZE))
            if int(m.sum()) >= min_area:
                out.append((img, m, a["category_id"], lab_stats(img, m)))
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
    """Run both suites; returns {"suites": {suite: {method: {metric: mean}}}, "instances": n,
    "skipped": {reason: count}, ...}."""
    net = net if net is not None else RelightNet.pretrained()
    skips = Skips()
    instances = load_instances(ann_file, images, min_area, image_ids, skips)[:limit]
    if not instances:
        raise NoInstancesError(f"{ann_file}: no readable non-crowd instance of at least {min_area} px at {SIZE}²"
                         + (f"; skipped {skips}" if skips.counts else ""))
    methods = {"as_is": None, "reinhard": ReinhardTransfer(), "lab_blend": LabBlend(ab="plain"),
               "lab_blend_relit_ab": LabBlend(ab="relit"), "net": net, "net+lab": [net, LabBlend(ab="plain")],
               "net+lab_relit_ab": [net, LabBlend(ab="relit")]}
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
            "unperturbed_fmse": unperturbed, "skipped": skips.as_dict(), "skipped_examples": skips.examples}


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
        lines.append(f"\n{suite}:  {'method':18s} {'MSE':>8s} {'fMSE':>8s} {'PSNR':>7s} {'dE2000':>7s}  fMSE vs as_is")
        base = rows["as_is"]["fmse"]
        for name in METHODS:
            if name in rows:
                r = rows[name]
                lines.append(f"{'':12s}{name:18s} {r['mse']:8.1f} {r['fmse']:8.1f} {r['psnr']:7.2f} "
                             f"{r['de2000']:7.2f}  {100 * (r['fmse'] / base - 1):+.0f}%")
    if result.get("skipped"):
        lines.append(f"skipped: {describe_skips(result['skipped'], result['skipped_examples'])}")
    if result.get("unperturbed_fmse"):
        lines.append("\nunperturbed input, fMSE of the output vs the input (0 = unchanged): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in result["unperturbed_fmse"].items()))
    return "\n".join(lines)
