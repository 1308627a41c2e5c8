# As mask-rcnn_r50_fpn_lsj_coco-1pct_sos.py, but the workers only draw the segments and their layout;
# SOSBatchCopyPaste composites them on the GPU batch (after BatchFixedSizePad).
_base_ = './mask-rcnn_r50_fpn_lsj_coco-1pct_sos.py'

image_size = (1024, 1024)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_type='absolute_range', crop_size=image_size, recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='RandomFlip', prob=0.5),
    dict(type='SOSCopyPaste', bank='banks/coco_1pct', classes='CocoDataset', layout='sos', defer=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor',
                                          'flip', 'flip_direction', 'sos_segments')),
]
train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))
model = dict(data_preprocessor=dict(batch_augments=[
    dict(type='BatchFixedSizePad', size=image_size, pad_mask=True),
    dict(type='SOSBatchCopyPaste', bank='banks/coco_1pct', classes='CocoDataset', layout='sos',
         num_pastes=(1, 10), relight=['net', 'lab'],
         mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]),
]))
