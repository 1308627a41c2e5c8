"""Referring expressions for a whole COCO-format set, as it is or after pasting, written as the
grounding files (:mod:`.referring.export`): what ``sos-aug refer`` runs. It stands above CopyPaste
(it pastes first where asked); the referring room below it never imports CopyPaste."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .coco import CocoInstances
from .copy_paste import CopyPaste
from .referring.export import Sample, write_grounding
from .referring.expressions import KINDS, Referring
from .referring.review import Drawn, pick, write_review


def split_of(ann_file) -> str:
    """The split a COCO file holds, as gRefCOCO and RefCOCO record it: ``train``, ``val`` or
    ``test`` where its name says so (``instances_val2017.json``), else the file's stem."""
    stem = Path(ann_file).stem
    found = re.search(r"(?<![a-z])(train|val|test)", stem.lower())
    return found.group(1) if found else stem


def refer_coco(ann_file, images_dir, out, bank_path=None, paste=False, per_kind=2, limit=0, seed=0,
               layout="sos", num=(2, 8), progress=True, split: str | None = None, review: int = 0) -> dict:
    """Referring expressions for a COCO-format set as it is (real images only) or after pasting
    (the pasted images written to ``out/images``), exported with :func:`.export.write_grounding`
    under ``split`` (by default :func:`split_of` the file); with ``review``, that many of them drawn
    at random (seeded, spread over kinds) into ``out/review`` (:mod:`.review`)."""
    ds = CocoInstances(ann_file, images_dir, only_annotated=True)
    names = {c["id"]: c["name"] for c in ds.categories}
    referring = Referring(per_kind={k: per_kind for k in KINDS}, vocabulary=sorted(names.values()))
    cp = None
    if paste:
        if not bank_path:
            raise ValueError("refer --paste needs --bank")
        cp = CopyPaste.from_names(bank=bank_path, label_map=ann_file, layout=layout, layout_file=ann_file,
                                  num_pastes=num, referring=referring)
        (Path(out) / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    n = min(len(ds), limit) if limit else len(ds)
    samples, counts = [], dict.fromkeys(KINDS, 0)
    for i in tqdm(range(n), desc="refer", disable=not progress):
        image, target = ds[i]
        info = ds.infos[i]
        if cp is not None:
            image, target = cp(image, target, generator=g)
            file_name = f"images/{Path(info['file_name']).stem}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(Path(out) / file_name)
        else:
            target = dict(target)
            labels = target["labels"].tolist()
            target["referring"] = referring(image, target, [names[int(lab)] for lab in labels], None, g)
            file_name = info["file_name"]
        for r in target["referring"]:
            counts[r["kind"]] += 1
        samples.append(Sample(file_name, int(info["id"]), target))
    if progress:
        print(f"refer: writing the grounding files to {out} ...", file=sys.stderr, flush=True)
    paths = write_grounding(out, samples, ds.categories, split=split or split_of(ann_file))
    files = {k: str(v) for k, v in paths.items()}
    if review:
        files["review"] = str(_review(ds, samples, Path(out), review, seed, pasted=cp is not None))
    return {"images": len(samples), "expressions": counts, "files": files}


def _review(ds: CocoInstances, samples: list[Sample], out: Path, n: int, seed: int, pasted: bool) -> Path:
    """``n`` expressions drawn at random, spread over kinds, as pictures and a review page."""
    chosen = pick([(i, r) for i, s in enumerate(samples) for r in s.target["referring"]], n, seed)
    items = []
    for i, record in chosen:
        sample = samples[i]
        if pasted:
            image = torch.from_numpy(np.array(Image.open(out / sample.file_name).convert("RGB"))).permute(2, 0, 1)
        else:
            image = ds[i][0]
        items.append(Drawn(record, image, sample.target, sample.file_name))
    return write_review(out / "review", items)
