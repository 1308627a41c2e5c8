# Baseline: Mask R-CNN R50-FPN with large-scale jitter on COCO 1% (fold 1), no sos_aug.
# Make the split with:  sos-aug split --coco data/coco/annotations/instances_train2017.json \
#                           --percent 1 --fold 1 --out data/coco/semi_anns
# (the same images and file names as mmdet's tools/misc/split_coco.py).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_8xb8-amp-lsj-200e_coco.py'

percent, fold = 1, 1
train_dataloader = dict(
    dataset=dict(dataset=dict(ann_file=f'semi_anns/instances_train2017.{fold}@{percent}.json')))
