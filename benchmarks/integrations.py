"""What sos_aug costs inside each framework's data pipeline: images/s of one data worker's work
(load, LSJ to 1024 x 1024, copy-paste, pack) on coco-mini, without sos_aug, with it, and with it
relighting as the shipped configs do (net + LabBlend), per framework, measured side by side in
interleaved rounds (ratios, not absolute times: this machine is noisy).

    OMP_NUM_THREADS=1 python benchmarks/integrations.py [--images 24] [--rounds 3] [--json out.json]

Frameworks that are not installed are reported as such. mmdet runs with mmcv-lite (no compiled ops,
which these pipelines never call); detectron2 must be built from source.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, train_bank  # noqa: E402

SIZE = 1024
RELIGHT = ("net", "lab")  # what the shipped configs relight with


def torchvision_pipelines(root: Path, bank) -> dict:
    from sos_aug import CocoInstances, CopyPaste, SOSLayout, label_map_from_coco
    from sos_aug.integrations.torchvision import large_scale_jitter
    from sos_aug.relight.named import make_relighter

    ann = root / "annotations" / "instances_train2017.json"
    ds = CocoInstances(ann, root / "train2017")
    lsj = large_scale_jitter(SIZE)
    cps = {relight: CopyPaste(bank, layout=SOSLayout(), num_pastes=(1, 10), label_map=label_map_from_coco(ann),
                              relight=make_relighter(RELIGHT) if relight else None) for relight in (False, True)}
    g = torch.Generator().manual_seed(0)

    def run(i: int, paste: bool, relight: bool = False):
        image, target = lsj(*ds[i])
        return cps[relight](image, target, generator=g) if paste else (image, target)

    return {"without": lambda i: run(i, False), "with": lambda i: run(i, True),
            "with_relight": lambda i: run(i, True, True)}


def mmdet_pipelines(root: Path, bank) -> dict:
    from sos_aug.integrations.mmcv_lite import allow_mmcv_lite

    allow_mmcv_lite()  # as importing the adapter does first: mmdet's mask module imports under mmcv-lite
    from mmdet.datasets import CocoDataset
    from mmengine.registry import init_default_scope

    import sos_aug.integrations.mmdet  # noqa: F401  (registers SOSCopyPaste)

    init_default_scope("mmdet")
    head = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
            dict(type="RandomResize", scale=(SIZE, SIZE), ratio_range=(0.1, 2.0), keep_ratio=True),
            dict(type="RandomCrop", crop_type="absolute_range", crop_size=(SIZE, SIZE), recompute_bbox=True,
                 allow_negative_crop=True),
            dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)), dict(type="RandomFlip", prob=0.5)]
    paste = dict(type="SOSCopyPaste", bank=str(bank.root), classes="CocoDataset", layout="sos", num_pastes=(1, 10))

    def dataset(pipeline):
        return CocoDataset(ann_file=str(root / "annotations" / "instances_train2017.json"),
                           data_prefix=dict(img=str(root / "train2017")), data_root="", serialize_data=False,
                           filter_cfg=dict(filter_empty_gt=True), pipeline=pipeline)

    without = dataset(head + [dict(type="PackDetInputs")])
    with_sos = dataset(head + [paste, dict(type="PackDetInputs")])
    relit = dataset(head + [dict(paste, relight=list(RELIGHT)), dict(type="PackDetInputs")])
    return {"without": lambda i: without[i % len(without)], "with": lambda i: with_sos[i % len(with_sos)],
            "with_relight": lambda i: relit[i % len(relit)]}


def detectron2_pipelines(root: Path, bank) -> dict:
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data import transforms as T
    from detectron2.data.datasets import register_coco_instances

    from sos_aug.integrations.detectron2 import CopyPasteMapper, add_sos_config

    name = "sos_bench_coco_mini"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(root / "annotations" / "instances_train2017.json"),
                                str(root / "train2017"))
    cfg = get_cfg()
    add_sos_config(cfg)
    cfg.DATASETS.TRAIN = (name,)
    cfg.INPUT.MASK_FORMAT = "polygon"
    cfg.INPUT.SOS.update(ENABLED=True, BANK=str(bank.root), LAYOUT="sos", NUM_PASTES=(1, 10))
    dicts = DatasetCatalog.get(name)
    augs = [T.ResizeScale(min_scale=0.1, max_scale=2.0, target_height=SIZE, target_width=SIZE),
            T.FixedSizeCrop(crop_size=(SIZE, SIZE)), T.RandomFlip()]
    base = DatasetMapper(cfg, is_train=True, augmentations=augs, image_format="BGR", use_instance_mask=True,
                         instance_mask_format="polygon", recompute_boxes=True)
    sos = CopyPasteMapper(cfg, mapper=base)
    relit_cfg = cfg.clone()
    relit_cfg.INPUT.SOS.RELIGHT = list(RELIGHT)
    relit = CopyPasteMapper(relit_cfg, mapper=base)
    return {"without": lambda i: base(copy.deepcopy(dicts[i % len(dicts)])),
            "with": lambda i: sos(copy.deepcopy(dicts[i % len(dicts)])),
            "with_relight": lambda i: relit(copy.deepcopy(dicts[i % len(dicts)]))}


FRAMEWORKS = {"torchvision": torchvision_pipelines, "mmdet": mmdet_pipelines, "detectron2": detectron2_pipelines}


def images_per_second(fn, n: int, clock=time.perf_counter) -> float:
    t0 = clock()
    for i in range(n):
        fn(i)
    return n / (clock() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24, help="images per measurement (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=list(FRAMEWORKS))
    p.add_argument("--work", default="bench_out/integrations", help="where the bank is built")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time (a shared machine)")
    args = p.parse_args(argv)
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    np.random.seed(0)
    root = coco_mini()
    bank = train_bank(root, Path(args.work))
    pipelines, report = {}, {"machine": machine(), "size": SIZE, "images": args.images,
                             "clock": "cpu" if args.cpu_time else "wall", "frameworks": {}}
    for name in args.frameworks:
        try:
            pipelines[name] = FRAMEWORKS[name](root, bank)
        except ImportError as err:
            report["frameworks"][name] = {"skipped": f"not installed ({err.name or err})"}
    for fns in pipelines.values():  # warm-up: first reads, lazy imports, the bank's index
        for fn in fns.values():
            fn(0)
    speeds = {name: {arm: [] for arm in fns} for name, fns in pipelines.items()}
    for _ in range(args.rounds):
        for name, fns in pipelines.items():
            for arm, fn in fns.items():
                speeds[name][arm].append(images_per_second(fn, args.images, clock))
    for name, arms in speeds.items():
        rates = {arm: statistics.median(runs) for arm, runs in arms.items()}
        report["frameworks"][name] = {
            **{f"images_per_s_{arm}": round(rate, 2) for arm, rate in rates.items()},
            "slowdown": round(rates["without"] / rates["with"], 2),
            "slowdown_relighting": round(rates["without"] / rates["with_relight"], 2)}
    for name, row in report["frameworks"].items():
        print(f"{name:12s} " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
