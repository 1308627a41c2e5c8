# LVIS v1 Mask R-CNN (mmdet's ClassBalancedDataset, repeat threshold 1e-3) with SOS copy-paste whose
# bank is sampled by LVIS's repeat factor measured on the training file: rare categories are pasted
# more even when the bank's own segments say nothing about frequency (SOS's FC/GC segment trees).
# classes='LVISV1Dataset': bank categories match LVIS names, synonyms and COCO's spellings (bus ->
# bus_(vehicle)); what matches no class is reported once. Needs `lvis` (in sos-aug[mmdet]).
_base_ = 'mmdet::lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py'

custom_imports = dict(imports=['sos_aug.integrations.mmdet'], allow_failed_imports=False)

sos_paste = dict(
    type='SOSCopyPaste',
    bank='banks/lvis_segments',
    classes='LVISV1Dataset',
    layout='sos',
    num_pastes=(1, 10),
    sampling='repeat_factor',
    reference='data/lvis_v1/annotations/lvis_v1_train.json',
    t=0.001,   # r_c = max(1, sqrt(t / f_c)): on LVIS only categories in under 0.1% of the images repeat;
               # on a small file every f_c may exceed t, so every weight is 1 (correct by the formula);
               # SegmentBank(...).sampling_weights('repeat_factor', t, reference) shows them
)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomChoiceResize', scales=[(1333, 640), (1333, 672), (1333, 704), (1333, 736), (1333, 768),
                                            (1333, 800)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    sos_paste,
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))
