"""What the benchmarks share: where the real data is, and which machine ran them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def coco_mini() -> Path:
    root = Path(os.environ.get("SOS_AUG_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / "coco-mini"
    if not (path / "annotations").is_dir():
        raise SystemExit(f"benchmarks need the real COCO subset at {path}; set SOS_AUG_TEST_DATA")
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
