"""The embedded default: a small synthetic COCO-format dataset the package draws itself.

It lets ``sos-aug demo`` build a bank and write a preview on a fresh machine with no data. Scenes
are textured gradient backgrounds with shaded polygon objects of five categories, annotated with
exact polygons, so every later stage (bank, layout, compositing, targets) runs as on real COCO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ["ball", "crate", "kite", "star", "pyramid"]


def _shape(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if kind == "ball":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif kind == "crate":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif kind == "kite":
        pts = [(0, -1), (0.6, -0.1), (0, 1), (-0.6, -0.1)]
    elif kind == "star":
        pts = [((1 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5 - math.pi / 2),
                (1 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5 - math.pi / 2)) for i in range(10)]
    else:
        pts = [(0, -0.9), (0.95, 0.8), (-0.95, 0.8)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    top, bottom = rng.integers(40, 230, 3), rng.integers(40, 230, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = top * (1 - t) + bottom * t + rng.normal(0, 12, (h, w, 3))
    noise = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return noise.filter(ImageFilter.GaussianBlur(1.2))


def make_synthetic_coco(out: str | Path, n_images: int = 24, seed: int = 0, size: tuple[int, int] = (320, 416)):
    """Write ``out/images/*.png`` and ``out/annotations.json``; returns the annotation path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    images, anns = [], []
    for i in range(n_images):
        img = _background(rng, h, w)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            cat = int(rng.integers(len(CATEGORIES)))
            r = float(rng.uniform(18, 70))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            poly = _shape(CATEGORIES[cat], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            base = rng.integers(30, 255, 3)
            draw.polygon(poly, fill=tuple(int(v) for v in base), outline=tuple(int(v * 0.5) for v in base))
            flat = [round(v, 2) for p in poly for v in p]
            xs, ys = flat[0::2], flat[1::2]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat + 1, "iscrowd": 0,
                         "segmentation": [flat], "area": 0.0,
                         "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
        name = f"{i + 1:06d}.png"
        img.save(out / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CATEGORIES)]}
    ann_file = out / "annotations.json"
    ann_file.write_text(json.dumps(data))
    return ann_file
