"""What the benchmarks share: where the real data is, and which machine ran them."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

import torch


def data_root() -> Path:
    """Where the shared real data lives: ``$SOS_AUG_TEST_DATA``, else ``../shared/data``."""
    return Path(os.environ.get("SOS_AUG_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")).resolve()


def portable(path: str | Path) -> str:
    """A path as results files record it: relative to the shared data root where it lies inside it,
    else its last three parts (never this machine's absolute path)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(data_root()).as_posix()
    except ValueError:
        return "/".join(path.parts[-3:])


def shared_data(name: str) -> Path:
    """``../shared/data/NAME`` (or ``$SOS_AUG_TEST_DATA/NAME``), or exit saying where it was looked for."""
    path = data_root() / name
    if not path.is_dir():
        raise SystemExit(f"benchmarks need the real data set {name!r} at {path}; set SOS_AUG_TEST_DATA")
    return path


def coco_mini() -> Path:
    path = shared_data("coco-mini")
    if not (path / "annotations").is_dir():
        raise SystemExit(f"benchmarks need the real COCO subset at {path}; set SOS_AUG_TEST_DATA")
    return path


def train_bank(root: Path, work: Path):
    """The bank of coco-mini train2017 segments the CopyPaste benchmarks paste from (built once)."""
    from sos_aug import SegmentBank, build_bank, coco_source

    bank_dir = work / "bank-train2017"
    if not (bank_dir / "meta.json").exists():
        build_bank(bank_dir, coco_source(root / "annotations" / "instances_train2017.json", root / "train2017"),
                   progress=False)
    return SegmentBank(bank_dir)


def machine() -> str:
    """The CPU's name, its vector extensions that change these figures (machines of one name differ),
    core count and torch version."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "BF16"), ("amx_tile", "AMX"))
           if flag in flags] or (["no AVX-512"] if "avx2" in flags else [])
    return f"{cpu} ({'+'.join(isa)}), {os.cpu_count()} cores, torch {torch.__version__}" if isa else \
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def add_allocator_flag(parser) -> None:
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc as it is; by default the process keeps freed memory, as "
                             "DataLoader workers under CopyPasteCollate do (sos_aug.allocator), for every method")


def set_allocator(args) -> str:
    """The allocator the benchmark's methods all run under, as a worker under CopyPasteCollate would
    (unless ``--default-allocator``); returns how to describe it."""
    if args.default_allocator:
        return "glibc default"
    from sos_aug.allocator import keep_freed_memory

    return "keep_freed_memory" if keep_freed_memory() else "default (keep_freed_memory not available here)"


@contextlib.contextmanager
def piece_by_piece():
    """Within it, CopyPaste's batched backends go piece by piece (the internal path rotated and
    feathered pieces take), so benchmarks can time it against the others on the same draws."""
    from sos_aug.paste import front

    chosen = front.choose_backend

    def loop(backend, device, placements, feather_sigma=0.0):
        return "loop" if chosen(backend, device, placements, feather_sigma) != "window" else "window"

    front.choose_backend = loop
    try:
        yield
    finally:
        front.choose_backend = chosen


def print_and_save(report: dict, json_path: str | None) -> dict:
    """Print a benchmark's report as JSON, and write it to ``json_path`` where given."""
    text = json.dumps(report, indent=1)
    print(text)
    if json_path:
        Path(json_path).write_text(text)
    return report
