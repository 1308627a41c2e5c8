"""detectron2's train_net with SOS copy-paste: the mapper pastes after LSJ (or the config's usual
augmentations), in the workers or, with ``INPUT.SOS.ON_DEVICE``, on the GPU after transfer.

    python examples/detectron2/train_net.py \\
        --config-file configs/detectron2/mask_rcnn_R_50_FPN_lsj_coco-1pct_sos.yaml \\
        --train-json data/coco/semi_anns/instances_train2017.1@1.json --train-images data/coco/train2017 \\
        --val-json data/coco/annotations/instances_val2017.json --val-images data/coco/val2017 \\
        --num-gpus 8 [KEY VALUE ...]

Without ``--val-json`` nothing is evaluated (``DATASETS.TEST`` is emptied); ``--eval-only`` with
``MODEL.WEIGHTS`` evaluates those weights on ``--val-json`` and trains nothing.

detectron2 is not on the package index: install ``sos-aug[detectron2]``, then build detectron2 from
its source (https://detectron2.readthedocs.io/en/latest/tutorials/install.html), e.g.
``pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'``
(``FORCE_CUDA=0`` for a CPU-only build, about 8 minutes on 2 cores).
"""

from __future__ import annotations

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator

from sos_aug.integrations.detectron2 import CopyPasteMapper, DevicePasteLoader, add_sos_config

TRAIN, VAL = "sos_train", "sos_val"


def lsj(size: int) -> list:
    """Large-scale jitter as detectron2's new baselines use it: scale 0.1-2.0 of a size x size canvas."""
    return [T.ResizeScale(min_scale=0.1, max_scale=2.0, target_height=size, target_width=size),
            T.FixedSizeCrop(crop_size=(size, size)), T.RandomFlip(horizontal=True)]


class Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        size = cfg.INPUT.LSJ_SIZE
        augs = lsj(size) if size else utils.build_augmentation(cfg, is_train=True)
        base = DatasetMapper(cfg, is_train=True, augmentations=augs, recompute_boxes=bool(size))
        mapper = CopyPasteMapper(cfg, is_train=True, mapper=base)
        loader = build_detection_train_loader(cfg, mapper=mapper)
        if mapper.cp is not None and mapper.defer:
            loader = DevicePasteLoader(loader, mapper.cp, cfg.MODEL.DEVICE, bgr=cfg.INPUT.FORMAT == "BGR")
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder or cfg.OUTPUT_DIR)


def setup(args):
    cfg = get_cfg()
    add_sos_config(cfg)  # INPUT.SOS, and INPUT.LSJ_SIZE: >0 for large-scale jitter to that square
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.train_json:
        register_coco_instances(TRAIN, {}, args.train_json, args.train_images)
        cfg.DATASETS.TRAIN = (TRAIN,)
    if args.val_json:
        register_coco_instances(VAL, {}, args.val_json, args.val_images)
        cfg.DATASETS.TEST = (VAL,)
    else:
        cfg.DATASETS.TEST = ()  # nothing to evaluate on (the base config's coco_2017_val is not assumed)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        if not cfg.DATASETS.TEST:
            raise SystemExit("--eval-only needs --val-json and --val-images")
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parser():
    p = default_argument_parser()
    p.add_argument("--train-json", help="training instances JSON (e.g. a 1%% split from sos-aug split)")
    p.add_argument("--train-images", help="training image folder")
    p.add_argument("--val-json", help="validation instances JSON")
    p.add_argument("--val-images", help="validation image folder")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
