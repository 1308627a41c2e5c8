# Baseline: Mask R-CNN R50-FPN with large-scale jitter on COCO 1% (fold 1), no sos_aug.
# Make the split with:  sos-aug split --coco data/coco/annotations/instances_train2017.json \
#                           --percent 1 --fold 1 --out data/coco/semi_anns
# (the same images and file names as mmdet's tools/misc/split_coco.py).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_8xb8-amp-lsj-200e_coco.py'

percent, fold = 1, 1
image_size = (1024, 1024)
lsj_head = [  # mmdet's LSJ training pipeline up to packing; the SOS configs paste after it
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_type='absolute_range', crop_size=image_size, recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='RandomFlip', prob=0.5),
]
train_pipeline = lsj_head + [dict(type='PackDetInputs')]
train_dataloader = dict(
    dataset=dict(dataset=dict(ann_file=f'semi_anns/instances_train2017.{fold}@{percent}.json',
                              pipeline=train_pipeline)))
