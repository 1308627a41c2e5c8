"""Segments from a local text-to-image model, as SOS made its FC/GC sets: prompts per category on a
plain background, the object cut out, filtered, and the survivors laid out as an RGBA tree
(``category/pNN/ID.png`` with prompt metadata) that :func:`~sos_aug.bank.build_bank` turns into a
bank. Loads only from a local directory (a diffusers pipeline); never downloads.

Resumable: every image has its own seed (category, prompt, index), and an image already cut (or
already rejected, recorded in ``rejected.json``) is not generated again.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage  # the generate extra: pip install sos-aug[diffusers]
from tqdm import tqdm

from .ops.files import atomic_write_bytes, atomic_write_json

TEMPLATES = (
    "a photo of a {category}, isolated on a plain white background, studio lighting",
    "a single {category}, centered, on a white background, product photo",
    "a {category} on a clean white background, full view, high detail",
)


@dataclass
class CutoutRules:
    """Which cut-outs are kept: the object's share of the image, how much of the image border it may
    touch, and how much of it the largest connected piece must be."""

    min_area: float = 0.02
    max_area: float = 0.9
    max_border: float = 0.1  # share of border pixels the object may cover
    min_main_component: float = 0.9
    threshold: float = 40.0  # RGB distance from the background colour that counts as object


def prompts_for(categories: Sequence[str], user: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Prompts per category: the user's where given, else :data:`TEMPLATES`."""
    return {c: list((user or {}).get(c) or [t.format(category=c) for t in TEMPLATES]) for c in categories}


def cut_out(image: np.ndarray, rules: CutoutRules) -> tuple[np.ndarray | None, str | None]:
    """An (H, W, 3) uint8 image on a plain background -> an RGBA crop of its object, or (None,
    reason). The background colour is the border's median; the object is what differs from it,
    reduced to its largest connected piece."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    background = np.median(border, axis=0)
    fg = np.linalg.norm(image.astype(np.float32) - background, axis=2) > rules.threshold
    if not fg.any():
        return None, "empty"
    labels, n = ndimage.label(fg)
    sizes = np.bincount(labels.ravel())[1:]
    main = int(sizes.argmax()) + 1
    if sizes[main - 1] < rules.min_main_component * fg.sum():
        return None, "fragmented"
    mask = labels == main
    share = mask.mean()
    if not rules.min_area <= share <= rules.max_area:
        return None, "area"
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    if edge.mean() > rules.max_border:
        return None, "border"
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rgba = np.dstack([image, (mask * 255).astype(np.uint8)])[y0:y1, x0:x1]
    return np.ascontiguousarray(rgba), None


def load_pipeline(model: str | Path, device: str = "cpu"):
    """A diffusers text-to-image pipeline from a local directory only (float16 on CUDA)."""
    from diffusers import AutoPipelineForText2Image

    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers pipeline directory (no model_index.json); sos-aug "
                                "generate loads only local models")
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    return pipe.to(device)


def generate_segments(pipe, categories: Sequence[str], per_category: int, out: str | Path,
                      prompts: dict[str, list[str]] | None = None, per_prompt: int = 3, size: int = 512,
                      steps: int = 30, seed: int = 0, rules: CutoutRules | None = None,
                      cutout: Callable[[np.ndarray, CutoutRules], tuple[np.ndarray | None, str | None]] = cut_out,
                      max_attempts: int = 4, progress: bool = True) -> dict:
    """Generate until each category has ``per_category`` kept segments (or ``max_attempts`` times
    that many images were tried), ``per_prompt`` images per prompt in turn; writes the RGBA tree and
    ``metadata.json`` under ``out``; returns counts (kept, rejected by reason)."""
    out, rules = Path(out), rules or CutoutRules()
    out.mkdir(parents=True, exist_ok=True)
    all_prompts = prompts_for(categories, prompts)
    rejected_file = out / "rejected.json"
    rejected: dict[str, str] = json.loads(rejected_file.read_text()) if rejected_file.is_file() else {}
    metadata, report = {}, {"kept": 0, "rejected": {}}
    bar = tqdm(total=per_category * len(categories), desc="generate", unit="seg", disable=not progress)
    for ci, category in enumerate(categories):
        kept, attempt = 0, 0
        folder_name = category.replace("/", "_")
        cat_prompts = all_prompts[category]
        for pi, prompt in enumerate(cat_prompts):
            metadata[f"{folder_name}_p{pi:02d}"] = {"description": prompt, "short_phrase": category}
        while kept < per_category and attempt < max_attempts * per_category:
            pi = (attempt // per_prompt) % len(cat_prompts)
            key = f"{folder_name}/p{pi:02d}/{attempt:06d}"
            path = out / f"{key}.png"
            attempt += 1
            if path.is_file():
                kept += 1
                bar.update(1)
                continue
            if key in rejected:
                continue
            g = torch.Generator("cpu").manual_seed(seed * 1_000_003 + ci * 10_007 + attempt)
            image = pipe(cat_prompts[pi], height=size, width=size, num_inference_steps=steps, generator=g,
                         output_type="np").images[0]
            rgba, reason = cutout((np.clip(image, 0, 1) * 255).round().astype(np.uint8), rules)
            if rgba is None:
                rejected[key] = reason
                report["rejected"][reason] = report["rejected"].get(reason, 0) + 1
                atomic_write_json(rejected_file, rejected)
                continue
            buf = _png(rgba)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf)
            kept += 1
            bar.update(1)
        report["kept"] += kept
    bar.close()
    atomic_write_json(out / "metadata.json", metadata)
    return report


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()
