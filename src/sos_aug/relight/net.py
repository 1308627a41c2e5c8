"""``RelightNet``: a small feed-forward net that predicts each pasted segment's relighting.

It looks at the segment's context window (its box grown 2x: the composite around it and its
alpha) at 64x64, and predicts the parameters of :mod:`.family`'s smooth colour/lighting transform,
which is then applied at full resolution to the segment's pixels only. ~0.3M parameters; it
starts as the identity (zero last layer).
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn as nn
from torchvision.ops import roi_align

from .color import rgb_to_lab
from .family import N_PARAMS, apply_family
from .perturb import masked_stats

INPUT = 64  # the net sees each context window at INPUT x INPUT
CONTEXT = 2.0  # the context window is the segment's box grown this much
WEIGHTS = "relight_net.pt"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class RelightNet(nn.Module):
    """Predicts relighting parameters per segment; call it as a relighter on a :class:`RelightBatch`."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(_block(5, w), _block(w, 2 * w), _block(2 * w, 3 * w), _block(3 * w, 4 * w))
        self.head = nn.Sequential(nn.Linear(3 * 4 * w + 12, 256), nn.SiLU(), nn.Linear(256, N_PARAMS))
        self.dropout = nn.Dropout(0.1)  # on the pooled features, while training
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """(S, 4, INPUT, INPUT) windows (RGB in [0, 1] + alpha) -> (S, N_PARAMS) parameters."""
        rgb, alpha = context[:, :3], context[:, 3:]
        lab = rgb_to_lab(rgb)
        fg_mean, fg_std = masked_stats(lab, alpha)
        bg_mean, bg_std = masked_stats(lab, 1 - alpha)
        stats = torch.cat([fg_mean, fg_std, bg_mean, bg_std], 1).flatten(1) / 50.0
        lum = lab[:, :1] / 50.0 - 1
        feats = self.encoder(torch.cat([rgb * 2 - 1, lum, alpha], 1))
        a = nn.functional.adaptive_avg_pool2d(alpha, feats.shape[-2:])
        pooled = [feats.mean((2, 3)), (feats * a).sum((2, 3)) / a.sum((2, 3)).clamp(min=1e-3),
                  (feats * (1 - a)).sum((2, 3)) / (1 - a).sum((2, 3)).clamp(min=1e-3)]
        return self.head(self.dropout(torch.cat(pooled + [stats], 1)))

    @classmethod
    def pretrained(cls) -> RelightNet:
        """The weights shipped inside the package (trained by ``sos-aug relight train``; no download)."""
        with resources.as_file(resources.files("sos_aug.weights").joinpath(WEIGHTS)) as path:
            return cls.load(path)

    def save(self, path) -> None:
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        state["_width"] = torch.tensor(self.encoder[0][0].out_channels)
        torch.save(state, path)

    @classmethod
    def load(cls, path) -> RelightNet:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = cls(width=int(state.pop("_width", torch.tensor(32))))
        net.load_state_dict(state)
        return net.eval()

    @torch.no_grad()
    def __call__(self, batch_or_context, *args, **kwargs):
        if isinstance(batch_or_context, torch.Tensor):
            return super().__call__(batch_or_context, *args, **kwargs)
        return relight_with_net(self, batch_or_context)


def context_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool -> (K, 4) float XYXY context windows: each mask's box grown CONTEXT x, clipped."""
    from ..composite import tight_boxes

    h, w = masks.shape[-2:]
    boxes = tight_boxes(masks)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1) * CONTEXT / 2
    lo = (centre - half).floor().clamp(min=0)
    hi = torch.minimum((centre + half).ceil(), torch.tensor([w, h], device=masks.device, dtype=boxes.dtype))
    return torch.cat([lo, hi], 1)


def relight_with_net(net: RelightNet, batch) -> list[torch.Tensor]:
    """Relight every pasted segment of a :class:`RelightBatch` with ``net``; background untouched."""
    out = []
    for image, masks in zip(batch.images, batch.masks):
        if next(net.parameters()).device != image.device:  # follow the batch (e.g. onto the GPU)
            net.to(image.device)
        if len(masks) == 0:
            out.append(image)
            continue
        boxes = context_boxes(masks)
        stacked = torch.cat([image, torch.zeros_like(image[:1])], 0)[None]
        windows = []
        for k in range(len(masks)):
            stacked[0, 3] = masks[k]
            windows.append(roi_align(stacked, [boxes[k : k + 1].to(stacked.dtype)], INPUT, aligned=True))
        params = net.forward(torch.cat(windows))
        result = image.clone()
        for k in range(len(masks)):
            x0, y0, x1, y1 = (int(v) for v in boxes[k].tolist())
            win = result[:, y0:y1, x0:x1]
            relit = apply_family(params[k : k + 1], win[None])[0].clamp(0, 1)
            m = masks[k, y0:y1, x0:x1]
            win.copy_(torch.where(m, relit, win))
        out.append(result)
    return out
