"""Shared fixtures: the real COCO subset (``SOS_AUG_TEST_DATA``, default ``../shared/data``), banks
built from it once per session, a pasted batch for the relighting tests, and a broken compiler."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from sos_aug import CopyPaste
from sos_aug.bank import SegmentBank, build_bank, coco_source
from sos_aug.ops import backends
from sos_aug.relight import RelightBatch

REPO = Path(__file__).resolve().parents[1]

# CI replays the same examples on every run (a landing never fails on a fresh random draw); local
# runs keep exploring, which is how new counter-examples are found (they then become @example cases).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("SOS_AUG_HYPOTHESIS", "explore"))


def data_root() -> Path:
    return Path(os.environ.get("SOS_AUG_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    root = data_root() / "coco-mini"
    if not (root / "annotations" / "instances_train2017.json").is_file():
        pytest.fail(
            f"the real COCO subset is expected at {root} (with annotations/ and train2017/, val2017/); "
            "set SOS_AUG_TEST_DATA to the folder that holds coco-mini/",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def train_ann(coco_mini) -> Path:
    return coco_mini / "annotations" / "instances_train2017.json"


@pytest.fixture(scope="session")
def val_ann(coco_mini) -> Path:
    return coco_mini / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="session")
def train_bank(tmp_path_factory, coco_mini, train_ann) -> SegmentBank:
    out = tmp_path_factory.mktemp("banks") / "train"
    build_bank(out, coco_source(train_ann, coco_mini / "train2017", min_area=1), workers=2, progress=False)
    return SegmentBank(out)


@pytest.fixture(scope="session")
def val_set(coco_mini, val_ann):
    from sos_aug import CocoInstances

    return CocoInstances(val_ann, coco_mini / "val2017")


@pytest.fixture(scope="module")
def pasted(train_bank, val_set):
    """Two real val images with real bank segments pasted (hard alpha), as float batches."""
    cp = CopyPaste(train_bank, num_pastes=(5, 5))
    images, targets = zip(*[val_set[i] for i in range(2)])
    out, out_targets = cp(list(images), list(targets), generator=torch.Generator().manual_seed(0))
    plain = [im.as_subclass(torch.Tensor).float() / 255 for im in out]
    masks = [t["masks"].as_subclass(torch.Tensor)[t["is_pasted"]] for t in out_targets]
    return RelightBatch(plain, plain, masks), images, targets


@pytest.fixture
def no_compiler(monkeypatch):
    """``torch.compile`` whose compiled functions fail when called, as a missing C++ compiler does."""
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(backends, "COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
