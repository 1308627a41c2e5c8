"""Referring expressions out to the formats grounding code reads: ODVG jsonl as mmdet 3.x's
``ODVGDataset`` parses it (grounding and detection forms, end-exclusive ``tokens_positive``),
gRefCOCO ``grefs.json`` (no-target expressions included, ``ann_id == [-1]``) and RefCOCO-style refs
(single-target), both beside a COCO instances JSON whose annotation ids they reference."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..ops.files import atomic_write_bytes, atomic_write_json


@dataclass
class Sample:
    """One image with its final target (``boxes`` XYXY, ``labels``, ``masks``, ``iscrowd``,
    ``referring``), as CopyPaste returns it; ``file_name`` relative to the images folder."""

    file_name: str
    image_id: int
    target: dict


def _boxes(target: dict) -> list[list[float]]:
    return torch.as_tensor(target["boxes"]).as_subclass(torch.Tensor).float().reshape(-1, 4).tolist()


def odvg_grounding(sample: Sample, height: int, width: int) -> dict:
    """An ODVG grounding record: the caption joins the expressions (no-target ones have no box and
    are left out), each region's ``tokens_positive`` spans its phrase, end exclusive."""
    boxes = _boxes(sample.target)
    caption, regions = "", []
    for r in sample.target.get("referring", []):
        if not r["targets"]:
            continue
        start = len(caption)
        caption += r["text"]
        regions.append({"bbox": boxes[r["targets"][0]] if len(r["targets"]) == 1 else [boxes[t] for t in r["targets"]],
                        "phrase": r["text"], "tokens_positive": [[start, len(caption)]]})
        caption += ". "
    return {"filename": sample.file_name, "height": height, "width": width,
            "grounding": {"caption": caption.rstrip(), "regions": regions}}


def odvg_detection(sample: Sample, height: int, width: int, label_to_index: dict[int, int],
                   names: dict[int, str]) -> dict:
    """An ODVG detection record (crowd regions left out); labels are positions in the label map."""
    crowd = sample.target.get("iscrowd", torch.zeros(len(sample.target["labels"]))).tolist()
    instances = [{"bbox": b, "label": label_to_index[int(lab)], "category": names[int(lab)]}
                 for b, lab, c in zip(_boxes(sample.target), sample.target["labels"].tolist(), crowd) if not c]
    return {"filename": sample.file_name, "height": height, "width": width, "detection": {"instances": instances}}


def _rle(mask: torch.Tensor) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def write_grounding(out: str | Path, samples: Iterable[Sample], categories: Sequence[dict], split: str = "train",
                    sizes: dict[int, tuple[int, int]] | None = None) -> dict[str, Path]:
    """Write ``instances.json`` (COCO, RLE masks), ``grefs.json``, ``refs.json``, ``odvg.jsonl``,
    ``odvg_detection.jsonl`` and ``label_map.json`` under ``out`` (each atomically); returns the paths.
    ``categories`` are the COCO categories the targets' labels are ids of."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {int(c["id"]): c["name"] for c in categories}
    label_to_index = {cid: k for k, cid in enumerate(sorted(names))}
    images, anns, grefs, refs, odvg, det = [], [], [], [], [], []
    ann_id = ref_id = sent_id = 1
    for s in samples:
        masks = s.target["masks"].as_subclass(torch.Tensor).bool()
        h, w = (sizes or {}).get(s.image_id, tuple(masks.shape[-2:]))
        images.append({"id": s.image_id, "file_name": s.file_name, "height": h, "width": w})
        ids = []
        crowd = s.target.get("iscrowd", torch.zeros(len(masks))).tolist()
        for b, lab, m, c in zip(_boxes(s.target), s.target["labels"].tolist(), masks, crowd):
            anns.append({"id": ann_id, "image_id": s.image_id, "category_id": int(lab), "iscrowd": int(c),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": int(m.sum()),
                         "segmentation": _rle(m)})
            ids.append(ann_id)
            ann_id += 1
        labels = s.target["labels"].tolist()
        for r in s.target.get("referring", []):
            sentence = {"raw": r.get("original", r["text"]), "sent": r["text"], "tokens": r["text"].split(),
                        "sent_id": sent_id}
            targets = r["targets"]
            grefs.append({"ref_id": ref_id, "image_id": s.image_id, "file_name": s.file_name, "split": split,
                          "ann_id": [ids[t] for t in targets] or [-1],
                          "category_id": sorted({int(labels[t]) for t in targets}) or [-1],
                          "no_target": not targets, "kind": r["kind"], "sentences": [sentence],
                          "sent_ids": [sent_id]})
            if len(targets) == 1:
                refs.append({"ref_id": ref_id, "ann_id": ids[targets[0]], "image_id": s.image_id,
                             "category_id": int(labels[targets[0]]), "file_name": s.file_name, "split": split,
                             "sentences": [sentence], "sent_ids": [sent_id]})
            ref_id += 1
            sent_id += 1
        odvg.append(odvg_grounding(s, h, w))
        det.append(odvg_detection(s, h, w, label_to_index, names))
    paths = {name: out / name for name in ("instances.json", "grefs.json", "refs.json", "odvg.jsonl",
                                          "odvg_detection.jsonl", "label_map.json")}
    atomic_write_json(paths["instances.json"], {"images": images, "annotations": anns,
                                                "categories": list(categories)})
    atomic_write_json(paths["grefs.json"], grefs)
    atomic_write_json(paths["refs.json"], refs)
    for name, rows in (("odvg.jsonl", odvg), ("odvg_detection.jsonl", det)):
        atomic_write_bytes(paths[name], "".join(json.dumps(r) + "\n" for r in rows).encode())
    atomic_write_json(paths["label_map.json"], {str(k): names[cid] for cid, k in label_to_index.items()})
    return paths
