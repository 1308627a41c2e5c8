"""Offline synthesis of SOS-style datasets with the in-loop code path: every image is a background
(a real photo resized and cropped, or a plain/gradient canvas) through the same :class:`CopyPaste`
(layout, compositing, relighting, referring expressions) the training loop uses.

The job is split into shards of images. Each shard draws from its own generator, seeded by the run's
seed and the shard's number, and is written atomically (images first, then its annotation part), so a
killed run resumes at the first unfinished shard and its merged output is identical to an
uninterrupted run's. The merge writes a COCO instances JSON (each annotation keeps its bank row,
source and text), COCO panoptic PNGs + JSON as SOS writes them, and, with referring expressions,
the grounding exports (:mod:`sos_aug.grounding_export`).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from .bank.store import SegmentBank
from .copy_paste import CopyPaste
from .layout import LAYOUT_NAMES
from .ops.files import atomic_write_bytes, atomic_write_json
from .ops.masks import tight_boxes
from .paste import DropRule
from .referring.export import Sample, write_grounding
from .referring.expressions import KINDS, Referring
from .relight.named import make_relighter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class SynthesisConfig:
    """What a synthesis run makes; saved with the output, and a resumed run must match it."""

    num_images: int
    size: int = 1024
    layout: str = "sos"
    pastes: tuple[int, int] = (5, 19)
    relight: str | None = None
    referring: bool = False
    backgrounds: str | None = None  # a folder of photos; None: plain and gradient canvases
    seed: int = 0
    shard_size: int = 100
    categories: list[str] | None = None  # only these bank categories
    sampling: str = "category_balanced"  # how segments are drawn: uniform, category_balanced, repeat_factor
    single_category: bool = False  # one category per image (intra-class referring, SOS's SFC/GC sets)
    min_visible: float = 0.5  # an instance hidden beyond this is dropped from the targets
    image_format: str = "jpg"
    quality: int = 95

    def __post_init__(self):
        self.pastes = tuple(self.pastes)
        if self.layout not in LAYOUT_NAMES or self.layout == "stats":
            raise ValueError(f"unknown layout {self.layout!r}; choose from random, sos, existing")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if self.num_images < 1 or self.shard_size < 1:
            raise ValueError("num_images and shard_size must be at least 1")


def background_files(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no background image (.jpg, .png, ...) found")
    return files


def draw_background(size: int, g: torch.Generator, files: Sequence[Path] | None = None) -> torch.Tensor:
    """A (3, size, size) uint8 canvas: a photo from ``files`` (shorter side scaled to ``size``, a
    random square cropped), or a plain colour or a linear gradient between two colours."""
    if files:
        for _ in range(8):  # an unreadable photo is passed over (the next draw takes another)
            path = files[int(torch.randint(len(files), (1,), generator=g))]
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    scale = size / min(im.size)
                    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                                   Image.BILINEAR)
            except OSError:
                continue
            x = int(torch.randint(im.width - size + 1, (1,), generator=g))
            y = int(torch.randint(im.height - size + 1, (1,), generator=g))
            return torch.from_numpy(np.asarray(im.crop((x, y, x + size, y + size))).copy()).permute(2, 0, 1)
        raise OSError(f"eight background photos in a row could not be read (last: {path})")
    a, b = torch.randint(0, 256, (2, 3), generator=g).float()
    if float(torch.rand(1, generator=g)) < 0.5:
        return a.round().to(torch.uint8)[:, None, None].expand(3, size, size).contiguous()
    angle = float(torch.rand(1, generator=g)) * 2 * np.pi
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    t = ((xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle) + 0.75) / 1.5
    return (a[:, None, None] + (b - a)[:, None, None] * t.clamp(0, 1)).round().to(torch.uint8)


class Synthesizer:
    """Makes the images of one shard at a time (see the module docstring)."""

    def __init__(self, bank: SegmentBank, config: SynthesisConfig, reference: str | Path | None = None):
        self.config = config
        if config.sampling != bank.sampling or reference is not None:
            bank = bank.with_sampling(config.sampling, reference=reference)
        if config.categories:
            bank = bank.subset(categories=config.categories)
        if len(bank) == 0:
            raise ValueError("no segment left in the bank after the category filter")
        self.bank = bank
        self.names = {cid: c["name"] for cid, c in bank.categories.items()}
        self.files = background_files(config.backgrounds) if config.backgrounds else None
        self.relight = make_relighter(config.relight)
        self._by_category: dict[int, CopyPaste] = {}
        self.copy_paste = self._copy_paste(bank)

    def _copy_paste(self, bank: SegmentBank) -> CopyPaste:
        c = self.config
        referring = Referring(per_kind={k: 3 for k in KINDS}, vocabulary=sorted(self.names.values())) \
            if c.referring else None
        return CopyPaste.from_names(bank=bank, layout=c.layout, num_pastes=c.pastes,
                                    drop=DropRule(min_visible=c.min_visible), relight=self.relight, referring=referring)

    def _for_image(self, g: torch.Generator) -> CopyPaste:
        if not self.config.single_category:
            return self.copy_paste
        counts = self.bank.category_counts()
        cats = sorted(counts)
        cid = cats[int(torch.randint(len(cats), (1,), generator=g))]
        if cid not in self._by_category:
            self._by_category[cid] = self._copy_paste(self.bank.subset(categories=[cid]))
        return self._by_category[cid]

    def image(self, index: int, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Image ``index`` and its target (labels = bank category ids)."""
        c = self.config
        background = draw_background(c.size, g, self.files)
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                 "masks": torch.zeros(0, c.size, c.size, dtype=torch.bool)}
        return self._for_image(g)(background, empty, generator=g)

    def shard(self, k: int) -> Iterator[tuple[int, torch.Tensor, dict]]:
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + k)
        for index in range(k * c.shard_size, min((k + 1) * c.shard_size, c.num_images)):
            yield (index, *self.image(index, g))


def _encode(image: torch.Tensor, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    pil.save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": quality} if fmt == "jpg" else {}))
    return buf.getvalue()


def _panoptic_png(masks: torch.Tensor, ids: list[int]) -> bytes:
    """COCO panoptic PNG: each pixel's segment id as R + 256 G + 256² B (0: no segment)."""
    h, w = masks.shape[-2:]
    seg = np.zeros((h, w), dtype=np.uint32)
    for m, sid in zip(masks.numpy(), ids):
        seg[m] = sid
    rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def write_shard(syn: Synthesizer, k: int, out: Path, on_image: Callable[[], None] | None = None) -> dict:
    """Make shard ``k``: its images and panoptic PNGs, then its annotation part (written last and
    atomically: a shard whose part exists is complete). ``on_image`` is called as each image is made."""
    c = syn.config
    part = {"images": [], "annotations": [], "panoptic": [], "referring": {}}
    bank_text = syn.bank.index["text"]
    for index, image, target in syn.shard(k):
        name = f"{index:08d}"
        file_name = f"images/{name}.{c.image_format}"
        atomic_write_bytes(out / file_name, _encode(image, c.image_format, c.quality))
        masks = target["masks"].as_subclass(torch.Tensor).bool()
        boxes = tight_boxes(masks).tolist()
        rows = target["pasted_rows"].tolist()
        segment_ids = list(range(1, len(masks) + 1))
        atomic_write_bytes(out / "panoptic" / f"{name}.png", _panoptic_png(masks, segment_ids))
        image_id = index + 1
        part["images"].append({"id": image_id, "file_name": file_name, "height": c.size, "width": c.size})
        infos = []
        for j, (m, box, lab, row) in enumerate(zip(masks.numpy(), boxes, target["labels"].tolist(), rows)):
            x0, y0, x1, y1 = box
            area = int(m.sum())
            view_row = int(row)
            text = syn.bank.text(int(bank_text[view_row]))
            part["annotations"].append({
                "image_id": image_id, "category_id": int(lab), "iscrowd": 0, "area": area,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": _rle(m),
                "bank_row": syn.bank.root_row(view_row), "source": syn.bank.source(view_row),
                "text": text.get("short_phrase", ""), "segment_id": segment_ids[j]})
            infos.append({"id": segment_ids[j], "category_id": int(lab), "iscrowd": 0, "area": area,
                          "bbox": [x0, y0, x1 - x0, y1 - y0]})
        part["panoptic"].append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": infos})
        if c.referring:
            part["referring"][str(image_id)] = target["referring"]
        if on_image is not None:
            on_image()
    atomic_write_json(out / "shards" / f"{k:06d}.json", part)
    return part


_WORKER: dict = {}


def _init_worker(bank_path: str, config: SynthesisConfig, reference, made=None) -> None:
    """A worker process's own Synthesizer (the bank reopened there, one torch thread); ``made``, a
    queue the worker reports each finished image to."""
    torch.set_num_threads(1)
    bank = SegmentBank(bank_path)
    _WORKER["syn"] = Synthesizer(bank, config, reference)
    _WORKER["made"] = made


def _run_shard(args: tuple[int, str]) -> int:
    """Shard ``k`` in a worker; returns how many images it made."""
    k, out = args
    made = _WORKER.get("made")
    return len(write_shard(_WORKER["syn"], k, Path(out), None if made is None else lambda: made.put(1))["images"])


def _run_in_processes(workers: int, syn: Synthesizer, todo: list[int], out: Path, config: SynthesisConfig,
                      reference, bar) -> None:
    """The shards in ``workers`` processes; the bar moves as each image is made."""
    made = multiprocessing.get_context().Queue()
    shown = finished = 0
    with ProcessPoolExecutor(workers, initializer=_init_worker,
                             initargs=(str(syn.bank.root), config, reference, made)) as pool:
        pending = {pool.submit(_run_shard, (k, str(out))) for k in todo}
        while pending or shown < finished:
            done, pending = wait(pending, timeout=0.2) if pending else (set(), set())
            finished += sum(future.result() for future in done)  # a shard's error stops the run here, named
            while True:
                try:  # every image made was reported before its shard returned: the rest is on its way
                    made.get(timeout=0.2) if not pending and shown < finished else made.get_nowait()
                except queue.Empty:
                    break
                shown += 1
                bar.update(1)


def _ray_shard(bank_path: str, config: SynthesisConfig, reference, k: int, out: str) -> int:
    """Shard ``k`` as a Ray task: the worker process keeps one Synthesizer per settings. A task
    killed midway left no annotation part, so its retry makes the whole shard again."""
    key = (bank_path, json.dumps(asdict(config), sort_keys=True), str(reference))
    if _WORKER.get("key") != key:
        _init_worker(bank_path, config, reference)
        _WORKER["key"] = key
    return _run_shard((k, out))


def _run_on_ray(address: str, syn: Synthesizer, todo: list[int], out: Path, config: SynthesisConfig,
                reference, bar) -> None:
    """The shards as Ray tasks on a local (``address="local"``) or running cluster; each retried
    up to three times if its worker dies."""
    import ray  # an optional extra: pip install sos-aug[ray]

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    task = ray.remote(max_retries=3, retry_exceptions=False)(_ray_shard)
    pending = [task.remote(str(syn.bank.root), config, reference, k, str(out)) for k in todo]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        bar.update(ray.get(done[0]))


def synthesize(bank: SegmentBank | str | Path, out: str | Path, config: SynthesisConfig,
               reference: str | Path | None = None, progress: bool = True, workers: int = 1,
               ray_address: str | None = None) -> dict:
    """Make (or finish) the dataset ``config`` describes under ``out``; returns a report. With
    ``workers`` > 1 the shards run in that many processes, with ``ray_address`` as Ray tasks
    (``"local"`` starts Ray here); the output is the same either way."""
    out = Path(out)
    for sub in ("images", "panoptic", "shards"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    saved = out / "synthesis.json"
    settings = {**asdict(config), "pastes": list(config.pastes)}
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise ValueError(f"{saved}: this folder holds a run with other settings; use a new --out")
    atomic_write_json(saved, settings)
    syn = Synthesizer(bank if isinstance(bank, SegmentBank) else SegmentBank(bank), config, reference)
    shards = -(-config.num_images // config.shard_size)
    todo = [k for k in range(shards) if not (out / "shards" / f"{k:06d}.json").is_file()]
    bar = tqdm(total=config.num_images, desc="synthesize", unit="img", disable=not progress,
               initial=config.num_images - sum(min(config.shard_size, config.num_images - k * config.shard_size)
                                               for k in todo))
    if ray_address is not None:
        _run_on_ray(ray_address, syn, todo, out, config, reference, bar)
    elif workers > 1 and len(todo) > 1:
        _run_in_processes(workers, syn, todo, out, config, reference, bar)
    else:
        for k in todo:
            write_shard(syn, k, out, lambda: bar.update(1))
    bar.close()
    return merge(out, syn, shards)


def merge(out: Path, syn: Synthesizer, shards: int) -> dict:
    """Join the shards' parts into ``instances.json``, ``panoptic.json`` and, with referring
    expressions, the grounding exports (annotation ids numbered in shard order)."""
    categories = [{"id": cid, "name": name, "supercategory": syn.bank.categories[cid].get("supercategory", "")}
                  for cid, name in sorted(syn.names.items())]
    images, anns, panoptic, samples_refs = [], [], [], []
    next_id = 1
    for k in range(shards):
        part = json.loads((out / "shards" / f"{k:06d}.json").read_text())
        images += part["images"]
        for a in part["annotations"]:
            anns.append({"id": next_id, **{key: v for key, v in a.items() if key != "segment_id"}})
            next_id += 1
        panoptic += part["panoptic"]
        samples_refs.append(part.get("referring", {}))
    atomic_write_json(out / "instances.json", {"images": images, "annotations": anns, "categories": categories})
    atomic_write_json(out / "panoptic.json", {
        "images": images, "annotations": panoptic,
        "categories": [{**c, "isthing": 1, "color": [0, 0, 0]} for c in categories]})
    report = {"images": len(images), "annotations": len(anns), "skipped_segments": syn.copy_paste.skipped}
    if syn.config.referring:
        refs = {int(i): r for part in samples_refs for i, r in part.items()}
        by_image: dict[int, list[dict]] = {}
        for a in anns:
            by_image.setdefault(a["image_id"], []).append(a)
        samples = (_sample(im, by_image.get(im["id"], []), refs.get(im["id"], [])) for im in images)
        write_grounding(out / "grounding", samples, categories)
        report["expressions"] = sum(len(r) for r in refs.values())
    return report


def _sample(image: dict, anns: list[dict], referring: list[dict]) -> Sample:
    """A merged image as a grounding :class:`Sample` (masks decoded from their RLE)."""
    h, w = image["height"], image["width"]
    masks = torch.from_numpy(np.stack([mask_utils.decode(a["segmentation"]) for a in anns]).astype(bool)) \
        if anns else torch.zeros(0, h, w, dtype=torch.bool)
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32).reshape(-1, 4)
    target = {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.long),
              "masks": masks, "iscrowd": torch.zeros(len(anns), dtype=torch.long), "referring": referring}
    return Sample(image["file_name"], image["id"], target)

