"""Low-data splits of a COCO training set, the same as mmdetection's ``tools/misc/split_coco.py``
draws them, so a split made here holds the same images as the published semi-supervised ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .coco import load_coco
from .ops.files import atomic_write_json


def percent_name(percent: float) -> str:
    """How a percentage appears in split file names: ``1`` for 1.0, ``0.5`` for 0.5."""
    return str(int(percent)) if float(percent).is_integer() else str(percent)


def labelled_image_indices(num_images: int, percent: float, fold: int) -> set[int]:
    """Positions in the file's ``images`` list that form the labelled part.

    mmdetection's rule: NumPy's global generator seeded with ``fold``, then
    ``choice(range(n), size=int(percent / 100 * n))`` *with* replacement, so slightly fewer than
    ``percent`` of the images are drawn; kept as is so the ids match the published splits. Drawn
    with a private ``RandomState`` of the same seed (same stream) to leave NumPy's global one alone.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    total = int(percent / 100.0 * num_images)
    return set(np.random.RandomState(fold).choice(range(num_images), size=total).tolist())


def split_coco(data: dict, percent: float, fold: int) -> tuple[dict, dict]:
    """(labelled, rest) COCO dicts: images in file order, their annotations, categories, info and
    licenses kept."""
    images = data["images"]
    chosen = labelled_image_indices(len(images), percent, fold)
    labelled = [im for i, im in enumerate(images) if i in chosen]
    rest = [im for i, im in enumerate(images) if i not in chosen]
    ids = {im["id"] for im in labelled}
    common = {k: data[k] for k in ("info", "licenses", "categories") if k in data}
    part = {**common, "images": labelled, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    other = {**common, "images": rest, "annotations": [a for a in data["annotations"] if a["image_id"] not in ids]}
    return part, other


def split_file_names(stem: str, percent: float, fold: int) -> tuple[str, str]:
    """``{stem}.{fold}@{percent}.json`` and ``...-unlabeled.json``, as mmdetection names them."""
    base = f"{stem}.{fold}@{percent_name(percent)}"
    return f"{base}.json", f"{base}-unlabeled.json"


def write_splits(ann_file: str | Path, out: str | Path, percents: list[float], folds: list[int],
                 stem: str = "instances_train2017") -> list[Path]:
    """Every (percent, fold) split of ``ann_file`` written under ``out``; returns the labelled files."""
    data = load_coco(ann_file, ("images", "annotations"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fold in folds:
        for percent in percents:
            part, rest = split_coco(data, percent, fold)
            labelled_name, rest_name = split_file_names(stem, percent, fold)
            atomic_write_json(out / labelled_name, part)
            atomic_write_json(out / rest_name, rest)
            written.append(out / labelled_name)
    return written
