"""Where segments come from: COCO/LVIS instances, SOS RGBA trees, X-Paste/DiverGen pools.

Each source lists deterministic *work units* (an image, a chunk of files) and a picklable function
that turns one unit into encoded segments and counted skips. The builder runs units in worker
processes and writes their results in unit order, so a resumed build equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..coco import image_path, load_coco, load_json, read_rgb, segmentation_to_mask
from .format import FLAG_NAMES, FLAG_UNKNOWN, encode_segment


@dataclass
class Item:
    """One encoded segment as a worker hands it to the writer."""

    blob: bytes
    height: int
    width: int
    category: int
    area: int
    source_id: int
    text_key: str | None = None
    flags: tuple[int, int, int] = (FLAG_UNKNOWN,) * 3


@dataclass
class UnitResult:
    items: list[Item] = field(default_factory=list)
    skips: list[tuple[str, str]] = field(default_factory=list)  # (reason, what)


@dataclass
class Source:
    """What a builder needs from a source: categories, texts, units and the unit processor."""

    kind: str
    description: dict
    categories: list[dict]
    units: list[Any]
    process: Callable[[Any], UnitResult]
    texts: dict[str, dict] = field(default_factory=dict)


# -- COCO / LVIS ----------------------------------------------------------------------------------
def coco_source(
    ann_file: str | Path,
    images: str | Path,
    min_area: int = 1,
    categories: list[str | int] | None = None,
    margin: float = 0.05,
) -> Source:
    """Every non-crowd instance with a non-empty mask, cropped tightly with a small margin. A missing
    image folder is an error up front (not an empty bank that fails later)."""
    ann_file, images = Path(ann_file), Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: image folder not found")
    data = load_coco(ann_file)
    cats = [_category_record(c) for c in data["categories"]]
    keep = _selected_category_ids(cats, categories, ann_file)
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    units = []
    for img in sorted(data["images"], key=lambda im: im["id"]):
        anns = by_image.pop(img["id"], [])
        if anns:
            units.append((str(image_path(images, img)), img["id"], img.get("height"), img.get("width"), anns))
    orphans = [a for anns in by_image.values() for a in anns]
    if orphans:  # annotations naming an image the file does not list
        units.append((None, -1, None, None, orphans))
    valid_ids = {c["id"] for c in cats}
    return Source(
        kind="coco",
        description={"annotations": str(ann_file), "images": str(images), "min_area": min_area,
                     "categories": categories, "margin": margin},
        categories=[c for c in cats if c["id"] in keep],
        units=units,
        process=_CocoUnit(min_area, keep, valid_ids, margin),
    )


class _CocoUnit:
    def __init__(self, min_area: int, keep: set[int], valid: set[int], margin: float):
        self.min_area, self.keep, self.valid, self.margin = min_area, keep, valid, margin

    def __call__(self, unit) -> UnitResult:
        path, image_id, height, width, anns = unit
        out = UnitResult()
        if path is None:  # one skip per image: a fault of the image, whatever it holds
            out.skips.append(("unknown_image", f"image_id {image_id} ({_lost(anns)})"))
            return out
        wanted = [a for a in anns if not a.get("iscrowd", 0)]
        if not wanted:
            return out
        rgb, problem = read_rgb(path)
        if rgb is None:
            out.skips.append((problem[0], f"{problem[1]} ({_lost(wanted)})"))
            return out
        h, w = rgb.shape[:2]
        if (height, width) != (None, None) and (height, width) != (h, w):
            out.skips.append(("size_mismatch", f"{path}: JSON says {height}x{width}, file is {h}x{w} "
                                               f"({_lost(wanted)})"))
            return out
        for ann in wanted:
            what = f"{path} annotation {ann.get('id')}"
            cat = ann.get("category_id")
            if cat not in self.valid:
                out.skips.append(("unknown_category", f"{what}: category_id {cat}"))
                continue
            if cat not in self.keep:
                continue
            try:
                mask = segmentation_to_mask(ann.get("segmentation"), h, w)
            except ValueError as err:
                out.skips.append((str(err), what))
                continue
            area = int(mask.sum())
            if area == 0:
                out.skips.append(("empty_mask", what))
                continue
            if area < self.min_area:
                continue
            rgba = crop_with_margin(rgb, mask, self.margin)
            src = f"coco:{Path(path).name}#{ann.get('id')}"
            out.items.append(Item(encode_segment(rgba, src), rgba.shape[1], rgba.shape[2], cat, area, int(image_id)))
        return out


def _lost(anns: list) -> str:
    return f"{len(anns)} annotation{'s' if len(anns) != 1 else ''} not used"


def crop_with_margin(rgb: np.ndarray, mask: np.ndarray, margin: float) -> np.ndarray:
    """Tight crop of the mask's box grown by ``margin`` of its size, as planar (4, h, w) RGBA."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    pad = max(2, int(round(margin * max(y1 - y0, x1 - x0))))
    y0, x0 = max(0, y0 - pad), max(0, x0 - pad)
    y1, x1 = min(rgb.shape[0], y1 + pad), min(rgb.shape[1], x1 + pad)
    out = np.empty((4, y1 - y0, x1 - x0), np.uint8)
    out[:3] = rgb[y0:y1, x0:x1].transpose(2, 0, 1)
    out[3] = mask[y0:y1, x0:x1] * 255
    return out


# -- SOS RGBA tree ----------------------------------------------------------------------------------
def rgba_tree_source(
    root: str | Path, metadata: str | Path | None = None, flags: str | Path | None = None, chunk: int = 64
) -> Source:
    """Segments laid out as SOS releases them: ``category/sub_category/ID.png`` with alpha = mask.

    ``metadata`` maps ``"{category}_{sub_category}"`` to ``description``/``short_phrase``/``features``;
    ``flags`` maps a segment (``"category/sub_category/ID"`` or ``"ID"``) to its quality flags.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: RGBA tree directory not found")
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/*.png"))
    names = sorted({f.split("/")[0] for f in files})
    cats = [{"id": i + 1, "name": n, "synonyms": [], "frequency": None} for i, n in enumerate(names)]
    texts = {}
    if metadata:
        meta = load_json(Path(metadata))
        texts = {k: {f: v[f] for f in ("description", "short_phrase", "features") if f in v}
                 for k, v in meta.items() if isinstance(v, dict)}
    flag_map = load_json(Path(flags)) if flags else {}
    cat_ids = {c["name"]: c["id"] for c in cats}
    units = []
    for i in range(0, len(files), chunk):
        batch = []
        for rel in files[i : i + chunk]:
            cat, sub, name = rel.split("/")
            key = f"{cat}_{sub}"
            fl = flag_map.get(rel[:-4]) or flag_map.get(name[:-4]) or {}
            batch.append((str(root / rel), rel, cat_ids[cat], key if key in texts else None, _flag_tuple(fl)))
        units.append(batch)
    return Source(
        kind="rgba_tree",
        description={"root": str(root), "metadata": str(metadata) if metadata else None,
                     "flags": str(flags) if flags else None},
        categories=cats, units=units, process=_process_rgba_files, texts=texts,
    )


def _process_rgba_files(unit) -> UnitResult:
    out = UnitResult()
    for path, rel, cat, text_key, flags in unit:
        rgba, reason = _read_rgba(path)
        if reason:
            out.skips.append((reason, path))
            continue
        area = int((rgba[3] > 0).sum())
        ident = Path(rel).stem
        sid = int(ident) if ident.isdigit() else -1
        out.items.append(Item(encode_segment(rgba, rel), rgba.shape[1], rgba.shape[2], cat, area, sid,
                              text_key, flags))
    return out


def _flag_tuple(flags: dict) -> tuple[int, int, int]:
    vals = []
    for name in FLAG_NAMES:
        v = flags.get(name)
        vals.append(FLAG_UNKNOWN if v is None else int(min(254, max(0, int(v)))))
    return tuple(vals)


# -- X-Paste / DiverGen pool ----------------------------------------------------------------------------
def xpaste_source(pool: str | Path, categories_from: str | Path | None = None, chunk: int = 64) -> Source:
    """A pool JSON ``{category_id: [paths]}``; a path is an RGBA png or ``image.png|mask.png``.

    Relative paths are taken from the pool file's folder. ``categories_from`` (a COCO/LVIS JSON) names
    the ids; otherwise they are named ``class_<id>``.
    """
    pool = Path(pool)
    data = load_json(pool)
    if not isinstance(data, dict):
        raise ValueError(f"{pool}: expected an object {{category_id: [paths]}}")
    if categories_from:
        cats = [_category_record(c) for c in load_coco(categories_from, ("categories",))["categories"]]
    else:
        cats = []
    known = {c["id"] for c in cats}
    units, bad = [], []
    entries = []
    for key in sorted(data, key=lambda k: (len(str(k)), str(k))):
        try:
            cid = int(key)
        except ValueError:
            bad.append(("bad_json_entry", f"{pool}: key {key!r} is not a category id"))
            continue
        if cats and cid not in known:
            bad += [("unknown_category", f"{pool}: category {cid} ({p})") for p in data[key]]
            continue
        if not cats and cid not in known:
            cats.append({"id": cid, "name": f"class_{cid}", "synonyms": [], "frequency": None})
            known.add(cid)
        paths = data[key] if isinstance(data[key], list) else []
        if not isinstance(data[key], list):
            bad.append(("bad_json_entry", f"{pool}: category {key} is not a list"))
        for p in paths:
            entries.append((p, cid))
    for i in range(0, len(entries), chunk):
        units.append([(p, cid, str(pool.parent)) for p, cid in entries[i : i + chunk]])
    if bad:
        units.insert(0, [("__skip__", r, w) for r, w in bad])
    return Source(kind="xpaste", description={"pool": str(pool)}, categories=cats, units=units,
                  process=_process_pool_entries)


def _process_pool_entries(unit) -> UnitResult:
    out = UnitResult()
    for entry, cid, base in unit:
        if entry == "__skip__":
            out.skips.append((cid, base))
            continue
        if not isinstance(entry, str) or not entry:
            out.skips.append(("bad_json_entry", f"category {cid}: {entry!r}"))
            continue
        parts = [_resolve(base, p) for p in entry.split("|")]
        if len(parts) == 1:
            rgba, reason = _read_rgba(parts[0])
        elif len(parts) == 2:
            rgba, reason = _read_image_and_mask(parts[0], parts[1])
        else:
            rgba, reason = None, "bad_json_entry"
        if reason:
            out.skips.append((reason, entry))
            continue
        area = int((rgba[3] > 0).sum())
        out.items.append(Item(encode_segment(rgba, entry), rgba.shape[1], rgba.shape[2], cid, area, -1))
    return out


def _resolve(base: str, p: str) -> str:
    path = Path(p)
    return str(path if path.is_absolute() else Path(base) / path)


def _read_rgba(path: str) -> tuple[np.ndarray | None, str | None]:
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGBA", "LA", "PA") and "transparency" not in im.info:
                return None, "no_alpha"
            arr = np.asarray(im.convert("RGBA"))
    except FileNotFoundError:
        return None, "missing_image"
    except (UnidentifiedImageError, OSError, ValueError):
        return None, "corrupt_image"
    if arr.shape[0] == 0 or arr.shape[1] == 0 or not arr[..., 3].any():
        return None, "empty_mask"
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), None


def _read_image_and_mask(image: str, mask: str) -> tuple[np.ndarray | None, str | None]:
    try:
        with Image.open(image) as im:
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(mask) as m:
            alpha = np.asarray(m.convert("L"))
    except FileNotFoundError:
        return None, "missing_image"
    except (UnidentifiedImageError, OSError, ValueError):
        return None, "corrupt_image"
    if rgb.shape[:2] != alpha.shape:
        return None, "size_mismatch"
    if not alpha.any():
        return None, "empty_mask"
    return np.concatenate([rgb.transpose(2, 0, 1), alpha[None]], 0), None


# -- helpers --------------------------------------------------------------------------------------------
def _category_record(c: dict) -> dict:
    return {"id": int(c["id"]), "name": c["name"], "synonyms": list(c.get("synonyms", [])),
            "frequency": c.get("frequency")}


def _selected_category_ids(cats: list[dict], wanted: list | None, where: Path) -> set[int]:
    if not wanted:
        return {c["id"] for c in cats}
    by_name = {c["name"].lower(): c["id"] for c in cats}
    ids = set()
    for w in wanted:
        if str(w).isdigit() and int(w) in {c["id"] for c in cats}:
            ids.add(int(w))
        elif str(w).lower() in by_name:
            ids.add(by_name[str(w).lower()])
        else:
            raise ValueError(f"{where}: --categories names {w!r}, which is not a category there")
    return ids
