"""Segment bank: random-access reads vs one PNG per segment (the X-Paste layout), index size, how
fast synthetic 1M- and 10M-segment indexes open, and segments/s of ``bank build --rgba-tree`` on the
same real COCO segments laid out as SOS releases its FC/GC trees (with the time 10M would take on 2
and on 64 cores, scaled by cores). One run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine  # noqa: E402

from sos_aug.bank import SegmentBank, build_bank, coco_source, rgba_tree_source  # noqa: E402
from sos_aug.bank.format import FORMAT_NAME, FORMAT_VERSION, INDEX_DTYPE  # noqa: E402
from sos_aug.ops.files import atomic_write_json  # noqa: E402


def png_pool(bank: SegmentBank, folder: Path) -> list[Path]:
    """Write every segment as its own RGBA PNG, as X-Paste and DiverGen keep their pools."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(bank)):
        path = folder / f"{i:07d}.png"
        if not path.exists():
            Image.fromarray(bank[i].rgba.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def reads_per_second(read, order: np.ndarray) -> float:
    for i in order[:50]:
        read(int(i))  # warm the page cache and code paths alike
    start = time.perf_counter()
    for i in order:
        read(int(i))
    return len(order) / (time.perf_counter() - start)


def read_png(paths):
    def read(i):
        with Image.open(paths[i]) as im:
            return torch.from_numpy(np.asarray(im.convert("RGBA")).copy()).permute(2, 0, 1)
    return read


def rgba_tree(bank: SegmentBank, folder: Path, long_side: int | None = None, count: int | None = None) -> Path:
    """The bank's segments laid out as SOS releases its FC/GC sets: category/sub_category/ID.png;
    with ``long_side``, each resized so its longer side has that many pixels (SOS's generated
    segments are cut from 1024-pixel images, far larger than most COCO instances)."""
    for i in range(count or len(bank)):
        seg = bank[i]
        path = folder / seg.category.replace(" ", "_") / "real" / f"{i:07d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(seg.rgba.permute(1, 2, 0).numpy())
            if long_side:
                scale = long_side / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
            im.save(path)
    return folder


def mean_pixels(tree: Path) -> float:
    """Mean pixels per segment of an RGBA tree."""
    sizes = []
    for path in tree.rglob("*.png"):
        with Image.open(path) as im:
            sizes.append(im.width * im.height)
    return float(np.mean(sizes))


def build_rate(tree: Path, out: Path, workers: int) -> float:
    """Segments per second of ``bank build --rgba-tree`` with ``workers`` processes (a fresh build)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = build_bank(out, rgba_tree_source(tree), workers=workers, progress=False)
    return report["added"] / (time.perf_counter() - start)


def synthetic_index(folder: Path, n: int = 1_000_000) -> Path:
    """An index of ``n`` records over one shard (enough to time open/len/sampling, not reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    index = np.zeros(n, INDEX_DTYPE)
    index["length"] = 1
    index["offset"] = np.arange(n)
    index["category"] = rng.integers(1, 1204, n)
    index["area"] = rng.integers(1, 10**5, n)
    index["source_id"] = rng.integers(0, 10**5, n)
    index["text"] = -1
    index["flags"] = 255
    index.tofile(folder / "index-0001.bin")
    (folder / "shard-0001-0000.bin").write_bytes(b"\0" * n)
    cats = [{"id": i, "name": f"cat{i}", "synonyms": [], "frequency": "r"} for i in range(1, 1204)]
    atomic_write_json(folder / "meta.json", {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "generation": 1, "num_segments": n,
        "index": "index-0001.bin", "texts": None, "index_record_bytes": INDEX_DTYPE.itemsize,
        "shards": [{"file": "shard-0001-0000.bin", "bytes": n}], "categories": cats, "skipped": {},
        "provenance": []})
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="bench_out")
    p.add_argument("--reads", type=int, default=3000)
    p.add_argument("--json")
    p.add_argument("--workers", type=int, default=2, help="processes for the RGBA-tree build")
    args = p.parse_args(argv)
    root, work = coco_mini(), Path(args.work)
    bank_dir = work / "bank-all"
    if not (bank_dir / "meta.json").exists():
        for split in ("train2017", "val2017"):
            build_bank(bank_dir, coco_source(root / "annotations" / f"instances_{split}.json", root / split),
                       workers=2, progress=False)
    bank = SegmentBank(bank_dir)
    paths = png_pool(bank, work / "png-pool")
    order = np.random.default_rng(0).integers(0, len(bank), args.reads)
    bank_rate = reads_per_second(lambda i: bank[i].rgba, order)
    png_rate = reads_per_second(read_png(paths), order)
    png_bytes = sum(p.stat().st_size for p in paths)
    shard_bytes = sum(s["bytes"] for s in bank.meta["shards"])

    tree = rgba_tree(bank, work / "rgba-tree")
    build = build_rate(tree, work / "bank-from-tree", workers=args.workers)
    ten_million = 10_000_000
    hours = {cores: ten_million / (build * cores / args.workers) / 3600 for cores in (2, 64)}
    big_tree = rgba_tree(bank, work / "rgba-tree-512", long_side=512, count=300)
    build512 = build_rate(big_tree, work / "bank-from-tree-512", workers=args.workers)
    hours512 = {cores: ten_million / (build512 * cores / args.workers) / 3600 for cores in (2, 64)}

    big10 = synthetic_index(work / "bank-10m", n=ten_million)
    start = time.perf_counter()
    b10 = SegmentBank(big10)
    _ = len(b10), b10.index["category"][-1]
    open10_s = time.perf_counter() - start
    index10_bytes = (big10 / "index-0001.bin").stat().st_size
    shutil.rmtree(big10)

    million = synthetic_index(work / "bank-1m")
    start = time.perf_counter()
    big = SegmentBank(million)
    n = len(big)
    _ = big.index["category"][-1]
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    big.with_sampling("repeat_factor").sample(1024, torch.Generator().manual_seed(0))
    sample_s = time.perf_counter() - start
    rows = {
        "segments": len(bank), "bank_reads_per_s": bank_rate, "png_reads_per_s": png_rate,
        "read_speedup": bank_rate / png_rate, "index_bytes_per_segment": INDEX_DTYPE.itemsize,
        "shard_bytes": shard_bytes, "png_pool_bytes": png_bytes, "million_open_s": open_s, "million_len": n,
        "million_first_repeat_factor_sample_s": sample_s,
        "rgba_tree_build_segments_per_s": build, "build_workers": args.workers,
        "rgba_tree_mean_pixels": mean_pixels(tree), "hours_for_10m_at": hours,
        "rgba_tree_512_build_segments_per_s": build512, "rgba_tree_512_mean_pixels": mean_pixels(big_tree),
        "hours_for_10m_512_at": hours512, "ten_million_index_bytes": index10_bytes, "ten_million_open_s": open10_s,
    }
    print(f"machine: {machine()}")
    print(f"{len(bank)} real COCO segments (coco-mini train+val), {args.reads} random reads each, decode included")
    print(f"  bank     {bank_rate:9.0f} reads/s   shards {shard_bytes / 1e6:6.1f} MB")
    print(f"  PNG pool {png_rate:9.0f} reads/s   files  {png_bytes / 1e6:6.1f} MB   "
          f"-> bank is {rows['read_speedup']:.1f}x")
    print(f"  index: {INDEX_DTYPE.itemsize} bytes per segment")
    print(f"  synthetic 1M-segment bank: opened in {open_s * 1e3:.1f} ms; first repeat-factor sample "
          f"(weights + CDF over 1M) {sample_s * 1e3:.0f} ms")
    print(f"  bank build --rgba-tree --workers {args.workers}: {build:.0f} segments/s -> 10M segments in "
          f"{hours[2]:.1f} h on 2 cores, {hours[64]:.2f} h on 64 (scaled by cores); "
          f"{rows['rgba_tree_mean_pixels'] / 1e3:.0f}K pixels per segment (COCO sizes)")
    print(f"  same, 300 segments resized to a 512-pixel long side ({rows['rgba_tree_512_mean_pixels'] / 1e3:.0f}K "
          f"pixels each): {build512:.0f} segments/s -> 10M in {hours512[2]:.1f} h on 2 cores, "
          f"{hours512[64]:.2f} h on 64")
    print(f"  synthetic 10M-segment index: {index10_bytes / 1e9:.2f} GB, opened in {open10_s * 1e3:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), **rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
