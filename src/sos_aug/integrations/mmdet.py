"""mmdetection 3.x: ``SOSCopyPaste`` (a pipeline transform) and ``SOSBatchCopyPaste`` (a
``data_preprocessor.batch_augments`` entry that pastes on the device after transfer).

Add ``custom_imports = dict(imports=['sos_aug.integrations.mmdet'])`` to a config, then::

    dict(type='SOSCopyPaste', bank='banks/coco_train', classes=metainfo['classes'],
         layout='sos', num_pastes=(1, 10), relight=['net', 'lab'])

after ``LoadAnnotations`` and any resize/crop/pad, and before ``PackDetInputs``. The bank is the
paste source, so no ``MultiImageMixDataset`` is needed and the transform works inside
``ClassBalancedDataset`` / ``RepeatDataset``. Labels are positions in ``classes`` (the dataset's
``metainfo['classes']``; COCO's by default). Randomness comes from torch's global generator, which
mmengine seeds per worker and rank (``randomness=dict(seed=...)``; ``diff_rank_seed=True`` for
ranks that draw differently without workers).

Importing this module does two things beside registering the transforms: under ``mmcv-lite`` it
lets mmdet's data pipeline import (:mod:`.mmcv_lite`; a model that calls a compiled op then says
what to install), and it teaches ``PackDetInputs`` to pack ``sos_is_pasted`` as
``gt_instances.is_pasted`` (and ``ignored_instances.is_pasted``), row for row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2  # mmcv's own dependency: its channel swaps are ~30x numpy's reversed-stride copies
import numpy as np
import torch

from .mmcv_lite import allow_mmcv_lite

allow_mmcv_lite()  # before mmdet: its mask structures import mmcv's compiled ops at load time

from mmcv.transforms import BaseTransform  # noqa: E402
from mmdet.datasets.transforms import PackDetInputs  # noqa: E402
from mmdet.registry import DATASETS, MODELS, TRANSFORMS  # noqa: E402
from mmdet.structures.bbox import HorizontalBoxes  # noqa: E402
from mmdet.structures.mask import BitmapMasks, PolygonMasks  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from ..coco import polygon_masks  # noqa: E402
from ..copy_paste import CopyPaste  # noqa: E402
from ..segments import PasteSegments  # noqa: E402
from .padding import unpadded_extent  # noqa: E402

SEGMENTS_KEY = "sos_segments"  # where SOSCopyPaste(defer=True) leaves the fetched segments
IS_PASTED_KEY = "sos_is_pasted"  # which rows of the results' instances are pasted
PackDetInputs.mapping_table = {**PackDetInputs.mapping_table, IS_PASTED_KEY: "is_pasted"}


def _classes(classes: Sequence[str] | str | None) -> list[str]:
    """Class names in label order: a list, or the name of a registered dataset (its METAINFO)."""
    if classes is None or isinstance(classes, str):
        dataset = DATASETS.get(classes or "CocoDataset")
        if dataset is None:
            raise ValueError(f"classes={classes!r} is neither a list of names nor a registered mmdet dataset")
        return list(dataset.METAINFO["classes"])
    return list(classes)


@TRANSFORMS.register_module()
class SOSCopyPaste(BaseTransform):
    """Paste bank segments into one sample's ``img`` and update ``gt_bboxes``, ``gt_bboxes_labels``,
    ``gt_masks`` (``BitmapMasks``; ``PolygonMasks`` come back as ``BitmapMasks``, the exact form of
    an occluded polygon) and ``gt_ignore_flags``; ``sos_is_pasted`` marks the pasted instances.

    Without ``gt_masks`` (a box-only dataset) pasted segments add their tight boxes; an existing box
    is dropped when the pasted segments leave less of it visible than the drop rule allows,
    otherwise kept as it was. Ignored instances (crowd regions) are kept and never become targets.
    After a ``Pad`` (``pad_shape`` in the results) segments go into the image, never its padding.

    With ``defer=True`` it only draws the segments and their layout (the worker's share) and leaves
    them in ``results['sos_segments']``; list that key in ``PackDetInputs(meta_keys=...)`` and let
    :class:`SOSBatchCopyPaste` composite on the device. Put it after every transform that resizes,
    crops or flips (a ``Pad`` may follow it).

    Args:
        bank: the bank's folder. classes: class names in label order, or a registered dataset's
        name (default ``CocoDataset``). layout: ``random``, ``sos``, ``stats`` (with
        ``layout_file``: your training annotations) or ``existing``. num_pastes: (low, high) per
        image. prob: chance an image is pasted into. relight: relighter names (``'net'``, ``'lab'``,
        ``'net+lab'`` or a list), ``relight_weights`` for the net. sampling: ``uniform``,
        ``category_balanced`` or ``repeat_factor`` (with ``reference``: the training set's
        annotation file, and ``t``). drop: the drop rule's name. feather_sigma: alpha feathering in
        pixels. channel_order: of ``img``.
    """

    def __init__(self, bank: str, classes: Sequence[str] | str | None = None, layout: str = "random",
                 num_pastes: Sequence[int] = (1, 10), prob: float = 1.0, relight: Any = None,
                 sampling: str = "uniform", reference: str | None = None, t: float = 0.001,
                 drop: str = "visible_fraction", feather_sigma: float = 0.0, channel_order: str = "bgr",
                 defer: bool = False, relight_weights: str | None = None, layout_file: str | None = None):
        if channel_order not in ("bgr", "rgb"):
            raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
        self.cp = CopyPaste.from_names(bank=bank, classes=_classes(classes), layout=layout, layout_file=layout_file,
                                       num_pastes=num_pastes, prob=prob, relight=relight,
                                       relight_weights=relight_weights, drop=drop, feather_sigma=feather_sigma,
                                       sampling=sampling, reference=reference, t=t)
        self.bgr, self.defer = channel_order == "bgr", defer

    def transform(self, results: dict) -> dict:
        image, target = to_target(results, self.bgr)
        extent = unpadded_extent(image) if "pad_shape" in results else tuple(image.shape[-2:])
        if self.defer:
            results[SEGMENTS_KEY] = self.cp.draw([extent], [target])
            return results
        out, pasted = self.cp(image, target, extents=[extent])
        return from_target(results, out, pasted, self.bgr)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bank={str(self.cp.bank.root)!r}, layout={type(self.cp.layout).__name__}, "
                f"num_pastes={self.cp.num_pastes}, prob={self.cp.p}, defer={self.defer})")


def to_target(results: dict, bgr: bool = True) -> tuple[torch.Tensor, dict]:
    """mmdet's results dict -> a (3, H, W) RGB image (uint8, or float in [0, 1]) and its target
    (``iscrowd``: mmdet's ignore flags; no ``masks`` for a box-only dataset)."""
    img = results["img"]
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"SOSCopyPaste needs results['img'] as an (H, W, 3) array, got shape {img.shape}")
    image = torch.from_numpy(_swap_channels(img) if bgr else np.ascontiguousarray(img)).permute(2, 0, 1)
    if image.is_floating_point():  # after PhotoMetricDistortion: float in 0-255
        image = (image.float() / 255).clamp_(0, 1)
    h, w = image.shape[-2:]
    boxes = results.get("gt_bboxes")
    boxes = torch.zeros(0, 4) if boxes is None else (boxes.tensor if isinstance(boxes, HorizontalBoxes)
                                                       else torch.as_tensor(np.asarray(boxes)))
    n = len(boxes)
    labels = torch.as_tensor(np.asarray(results.get("gt_bboxes_labels", np.zeros(n, np.int64)))).long()
    ignore = torch.as_tensor(np.asarray(results.get("gt_ignore_flags", np.zeros(n, bool)))).bool()
    target = {"boxes": boxes.float().reshape(-1, 4), "labels": labels, "iscrowd": ignore.long()}
    masks = results.get("gt_masks")
    if masks is not None:
        if isinstance(masks, PolygonMasks):
            target["masks"] = polygon_masks(masks.masks, h, w)
        else:
            target["masks"] = _bool_masks(np.asarray(masks.masks)).reshape(len(masks), h, w)
    if not (len(labels) == len(ignore) == n and (masks is None or len(target["masks"]) == n)):
        raise ValueError(f"results hold {n} gt_bboxes, {len(labels)} gt_bboxes_labels, {len(ignore)} "
                         f"gt_ignore_flags and {None if masks is None else len(masks)} gt_masks")
    return image, target


def from_target(results: dict, image: torch.Tensor, target: dict, bgr: bool = True) -> dict:
    """Write a pasted image and its target back into mmdet's results dict, in its types."""
    old = results["img"]
    if old.dtype == np.uint8 and image.dtype == torch.uint8:
        results["img"] = _hwc(image, bgr)
    else:
        pixels = image.permute(1, 2, 0)
        pixels = pixels.float() * 255 if image.is_floating_point() else pixels.float()
        arr = pixels.numpy()
        results["img"] = np.ascontiguousarray(arr[..., ::-1] if bgr else arr).astype(old.dtype, copy=False)
    results["gt_bboxes"] = HorizontalBoxes(torch.as_tensor(target["boxes"]).float())
    results["gt_bboxes_labels"] = target["labels"].numpy().astype(np.int64)
    results["gt_ignore_flags"] = target["iscrowd"].bool().numpy()
    if "masks" in target:
        results["gt_masks"] = bitmap_masks(target["masks"].view(torch.uint8).numpy())
    results[IS_PASTED_KEY] = target["is_pasted"].numpy()
    return results


def _swap_channels(img: np.ndarray) -> np.ndarray:
    """An (H, W, 3) array with its channels reversed (BGR <-> RGB), new and contiguous."""
    if img.dtype in (np.uint8, np.float32):
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img[..., ::-1])


def _hwc(image: torch.Tensor, bgr: bool) -> np.ndarray:
    """A (3, H, W) uint8 image, planar or a channels-last view, as mmdet's (H, W, 3) array."""
    if image.is_contiguous():  # planar: interleave the three planes (reversed for BGR) in one pass
        planes = list(image.numpy())
        return cv2.merge(planes[::-1] if bgr else planes)
    hwc = image.permute(1, 2, 0)
    if hwc.is_contiguous():  # a channels-last view: already interleaved
        return _swap_channels(hwc.numpy()) if bgr else hwc.numpy().copy()
    return np.ascontiguousarray(hwc.numpy()[..., ::-1] if bgr else hwc.numpy())


def _bool_masks(masks: np.ndarray) -> torch.Tensor:
    """BitmapMasks' uint8 0/1 array as bool without a copy (any other array is converted)."""
    t = torch.from_numpy(masks)
    if masks.dtype == np.uint8 and masks.size and masks.max() <= 1:
        return t.view(torch.bool)
    return t.bool()


def bitmap_masks(masks: np.ndarray) -> BitmapMasks:
    """``BitmapMasks`` around an (N, H, W) uint8 array as it is (its constructor copies the array
    mask by mask through ``np.stack``: a third of this transform's time at 1024²)."""
    n, h, w = masks.shape
    out = BitmapMasks([], h, w)
    out.masks = np.ascontiguousarray(masks)
    return out


@MODELS.register_module()
class SOSBatchCopyPaste(torch.nn.Module):
    """Paste on the device, in ``DetDataPreprocessor(batch_augments=[dict(type='SOSBatchCopyPaste', ...)])``.

    It runs after normalisation and padding: each image's part before any padding is taken back
    to [0, 1] with ``mean``/``std`` (write the preprocessor's), pasted, and normalised again; no
    segment lands in the padding, the batch's or a pipeline ``Pad``'s. Each data sample's
    ``gt_instances`` (and ``ignored_instances``) are rewritten; ``gt_instances.is_pasted`` marks
    pasted ones. The same arguments as :class:`SOSCopyPaste`, and:

    ``draw_on_device``: ``False`` (default) composites the segments and layouts the workers drew
    (``SOSCopyPaste(defer=True)``, with ``'sos_segments'`` in ``PackDetInputs(meta_keys=...)``)
    and fails, saying so, when a sample arrives without them; ``True`` draws them here instead.
    """

    def __init__(self, bank: str, classes: Sequence[str] | str | None = None,
                 mean: Sequence[float] = (123.675, 116.28, 103.53), std: Sequence[float] = (58.395, 57.12, 57.375),
                 draw_on_device: bool = False, **kwargs):
        super().__init__()
        self.paste = SOSCopyPaste(bank, classes, channel_order="rgb", **kwargs)
        self.draw_on_device = draw_on_device
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def forward(self, inputs: torch.Tensor, data_samples: list) -> tuple[torch.Tensor, list]:
        if not self.training:
            return inputs, data_samples
        parts = None if self.draw_on_device else _drawn_segments(data_samples)
        crops, targets, hows = [], [], []
        for i, sample in enumerate(data_samples):
            h, w = sample.img_shape[:2]
            if parts:
                _check_drawn(parts[i], h, w)
            crops.append(((inputs[i, :, :h, :w] * self.std + self.mean) / 255).clamp(0, 1))
            target, how = _sample_target(sample, h, w, inputs.device)
            targets.append(target)
            hows.append(how)
        segments = PasteSegments.concat(parts).to(inputs.device) if parts else None
        extents = None if parts else [unpadded_extent(c) for c in crops]
        out, pasted = self.paste.cp(crops, targets, segments=segments, extents=extents)
        inputs = inputs.clone()
        for i, (sample, image, target, how) in enumerate(zip(data_samples, out, pasted, hows)):
            h, w = image.shape[-2:]
            inputs[i, :, :h, :w] = (image.float() * 255 - self.mean) / self.std
            _write_instances(sample, target, how)
        return inputs, data_samples


def _drawn_segments(data_samples: list) -> list[PasteSegments]:
    """The segments the workers drew for each sample, or an error that says how to get them there."""
    parts = [s.metainfo.get(SEGMENTS_KEY) for s in data_samples]
    if any(p is None for p in parts):
        raise ValueError(f"SOSBatchCopyPaste: {sum(p is None for p in parts)} of {len(parts)} samples carry no "
                         f"{SEGMENTS_KEY!r}: put SOSCopyPaste(..., defer=True) in the train pipeline and list "
                         f"{SEGMENTS_KEY!r} in PackDetInputs(meta_keys=...), or pass draw_on_device=True to draw "
                         "the segments here")
    return parts


def _check_drawn(segments: PasteSegments, h: int, w: int) -> None:
    """The worker drew for the image before any later ``Pad``: never for a larger one."""
    dh, dw = segments.sizes[0]
    if dh > h or dw > w:
        raise ValueError(f"SOSBatchCopyPaste: the layout was drawn in the worker for a {dh}x{dw} image but the "
                         f"sample is {h}x{w}: put SOSCopyPaste(..., defer=True) after every transform that "
                         "resizes, crops or flips (just before PackDetInputs; a Pad may follow it)")


def _sample_target(sample, h: int, w: int, device: torch.device) -> tuple[dict, dict]:
    """A data sample's ground truth as one target (its ignored instances appended with ``iscrowd``
    set), cropped to the image, and how each part came in (box type, mask size) to write it back
    alike."""
    parts = [("gt_instances", False)]
    if "ignored_instances" in sample and len(sample.ignored_instances):
        parts.append(("ignored_instances", True))
    boxes, labels, masks, ignore, how = [], [], [], [], {}
    for key, ignored in parts:
        inst = getattr(sample, key)
        b = inst.bboxes.tensor if isinstance(inst.bboxes, HorizontalBoxes) else torch.as_tensor(inst.bboxes)
        boxes.append(b.float().to(device).reshape(-1, 4))
        labels.append(torch.as_tensor(inst.labels).long().to(device))
        ignore.append(torch.full((len(b),), ignored, dtype=torch.long, device=device))
        size = None
        if "masks" in inst:
            m = inst.masks.to_bitmap() if isinstance(inst.masks, PolygonMasks) else inst.masks
            m = m.to_tensor(torch.bool, device) if hasattr(m, "to_tensor") else torch.as_tensor(m)
            size = tuple(m.shape[-2:])
            masks.append(m.to(device).bool()[:, :h, :w])
        how[key] = (isinstance(inst.bboxes, HorizontalBoxes), size)
    target = {"boxes": torch.cat(boxes), "labels": torch.cat(labels), "iscrowd": torch.cat(ignore)}
    if len(masks) == len(parts):
        target["masks"] = torch.cat(masks)
    return target, how


def _write_instances(sample, target: dict, how: dict) -> None:
    """Split a pasted target back into ``gt_instances`` and ``ignored_instances``, boxes in the type
    and masks at the size they came in (padded to the batch where the preprocessor padded them)."""
    ignore = target["iscrowd"].bool()
    for key, rows in (("gt_instances", ~ignore), ("ignored_instances", ignore)):
        if key not in how and not rows.any():
            continue
        boxed, size = how.get(key, how["gt_instances"])
        inst = InstanceData()
        boxes = torch.as_tensor(target["boxes"]).float()[rows]
        inst.bboxes = HorizontalBoxes(boxes) if boxed else boxes
        inst.labels = target["labels"][rows]
        if "masks" in target:
            masks = target["masks"]
            mask_h, mask_w = size or masks.shape[-2:]
            m = torch.zeros((int(rows.sum()), mask_h, mask_w), dtype=torch.uint8, device=masks.device)
            m[:, : masks.shape[-2], : masks.shape[-1]] = masks[rows]
            inst.masks = bitmap_masks(m.cpu().numpy())
        inst.is_pasted = target["is_pasted"][rows]
        setattr(sample, key, inst)
