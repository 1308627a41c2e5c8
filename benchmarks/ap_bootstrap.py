"""COCO AP from compact per-detection match records, so a paired bootstrap over validation images
and seeds costs milliseconds per draw instead of a COCOeval per draw.

:func:`match_records` reads what ``COCOeval.evaluate()`` decided for every detection (area "all",
100 detections per image): its image, category, score, and at which of the ten IoU thresholds it
matched or was ignored; plus each (image, category)'s count of non-ignored ground truth.
:func:`average_precision` repeats ``COCOeval.accumulate()``'s arithmetic on any multiset of images
(an image drawn twice counts twice), and equals ``stats[0]`` on the original set (tested).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pycocotools.cocoeval import COCOeval


def match_records(ev: COCOeval) -> dict[str, np.ndarray]:
    """The evaluated detections of ``ev`` (after ``evaluate()``) for area "all", maxDets 100."""
    p = ev.params
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    area_all = p.areaRngLbl.index("all")
    max_det = p.maxDets[-1]
    bits = 1 << np.arange(len(p.iouThrs), dtype=np.uint16)
    img, cat, score, match, ignore = [], [], [], [], []
    gt = np.zeros((n_img, len(p.catIds)), dtype=np.int32)
    for k in range(len(p.catIds)):
        for i in range(n_img):
            e = ev.evalImgs[k * n_area * n_img + area_all * n_img + i]
            if e is None:
                continue
            gt[i, k] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            d = len(e["dtScores"][:max_det])
            if d == 0:
                continue
            img.append(np.full(d, i, np.int32))
            cat.append(np.full(d, k, np.int16))
            score.append(np.asarray(e["dtScores"][:max_det], np.float32))
            match.append((np.asarray(e["dtMatches"][:, :max_det]) != 0).T.astype(np.uint16) @ bits)
            ignore.append((np.asarray(e["dtIgnore"][:, :max_det]) != 0).T.astype(np.uint16) @ bits)

    def cat_or_empty(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return {"img": cat_or_empty(img, np.int32), "cat": cat_or_empty(cat, np.int16),
            "score": cat_or_empty(score, np.float32), "match": cat_or_empty(match, np.uint16),
            "ignore": cat_or_empty(ignore, np.uint16), "gt": gt, "thresholds": np.asarray(p.iouThrs, np.float64),
            "recall_thresholds": np.asarray(p.recThrs, np.float64)}


def save(records: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """``{kind: match_records}`` into one compressed ``.npz``, written atomically."""
    flat = {f"{kind}.{name}": arr for kind, rec in records.items() for name, arr in rec.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **flat)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load(path: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            kind, name = key.split(".", 1)
            out.setdefault(kind, {})[name] = z[key]
    return out


def average_precision(rec: dict[str, np.ndarray], counts: np.ndarray | None = None,
                      per_category: bool = False) -> float | np.ndarray:
    """AP in % (IoU .50:.95, area all, 100 detections) over the images weighted by ``counts``
    (how often each image is drawn; None: each once). With ``per_category``, one AP per category
    (NaN where it has no ground truth in the draw)."""
    n_img, n_cat = rec["gt"].shape
    counts = np.ones(n_img, np.int64) if counts is None else np.asarray(counts, np.int64)
    n_t = len(rec["thresholds"])
    rec_thr = rec["recall_thresholds"]
    bits = 1 << np.arange(n_t, dtype=np.uint16)
    if "_order" not in rec:  # COCOeval's order: by score, ties in input order (computed once per record)
        rec["_order"] = np.argsort(-rec["score"], kind="mergesort")
    order = rec["_order"]
    aps = np.full(n_cat, np.nan)
    for k in range(n_cat):
        npig = int((rec["gt"][:, k] * counts).sum())
        if npig == 0:
            continue
        sel = order[rec["cat"][order] == k]
        reps = counts[rec["img"][sel]]
        sel = np.repeat(sel, reps)
        if len(sel) == 0:
            aps[k] = 0.0
            continue
        matched = (rec["match"][sel][:, None] & bits) != 0  # (D, T)
        ignored = (rec["ignore"][sel][:, None] & bits) != 0
        tp = np.cumsum(matched & ~ignored, 0, dtype=np.float64)
        fp = np.cumsum(~matched & ~ignored, 0, dtype=np.float64)
        precisions = []
        for t in range(n_t):
            rc = tp[:, t] / npig
            pr = tp[:, t] / (fp[:, t] + tp[:, t] + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1]
            q = np.zeros(len(rec_thr))
            idx = np.searchsorted(rc, rec_thr, side="left")
            ok = idx < len(pr)
            q[ok] = pr[idx[ok]]
            precisions.append(q)
        aps[k] = 100 * float(np.mean(precisions))
    if per_category:
        return aps
    return float(np.nanmean(aps)) if np.isfinite(aps).any() else 0.0
