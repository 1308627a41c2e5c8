# Mask R-CNN R50-FPN, LSJ, COCO 1% (fold 1) with SOS copy-paste: the baseline's schedule and data,
# segments from a bank built on the same 1% split (no leakage), pasted after the crop.
#   sos-aug bank build --coco data/coco/semi_anns/instances_train2017.1@1.json \
#       --images data/coco/train2017 --out banks/coco_1pct
# (or a bank of SOS's released segments: --rgba-tree, with repeat-factor sampling against the split).
_base_ = './mask-rcnn_r50_fpn_lsj_coco-1pct.py'

custom_imports = dict(imports=['sos_aug.integrations.mmdet'], allow_failed_imports=False)

sos_paste = dict(
    type='SOSCopyPaste',
    bank='banks/coco_1pct',
    classes='CocoDataset',       # labels = positions in CocoDataset.METAINFO['classes']
    layout='sos',                # SOS's layout priors
    num_pastes=(1, 10),
    relight=['net', 'lab'],      # the shipped relighting net, then SOS's Lab blending
)
train_pipeline = _base_.lsj_head + [sos_paste, dict(type='PackDetInputs')]
train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))
