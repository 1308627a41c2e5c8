# As mask-rcnn_r50_fpn_lsj_coco-1pct_sos.py, but the workers only draw the segments and their layout;
# SOSBatchCopyPaste composites them on the GPU batch (after BatchFixedSizePad).
_base_ = './mask-rcnn_r50_fpn_lsj_coco-1pct_sos.py'

image_size = (1024, 1024)
train_pipeline = _base_.lsj_head + [
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
