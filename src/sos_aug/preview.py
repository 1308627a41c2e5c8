"""Pictures a person checks by eye: augmented images with outlines, boxes and labels (and a whole
preview of CopyPaste on a COCO set, what ``sos-aug preview`` draws); bank contact sheets."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid
from tqdm import tqdm

from .coco import CocoInstances
from .copy_paste import CopyPaste
from .referring.expressions import Referring
from .relight.named import make_relighter

PASTED_COLOR = (255, 0, 255)
REAL_COLOR = (0, 255, 255)


def outline(masks: torch.Tensor, width: int = 2) -> torch.Tensor:
    """The border pixels of (N, H, W) bool masks: mask minus its erosion."""
    if len(masks) == 0:
        return masks
    m = masks.float()[:, None]
    eroded = -nnf.max_pool2d(-m, 2 * width + 1, stride=1, padding=width)
    return (m - eroded)[:, 0] > 0


def draw_instances(image: torch.Tensor, target: Mapping, names: Mapping[int, str] | None = None,
                   outlines: bool = True) -> torch.Tensor:
    """Draw mask outlines, boxes and labels; pasted instances in magenta with a '+' before the name.
    Without ``outlines`` only pasted instances get a box, so their pixels stay visible."""
    image = image.as_subclass(torch.Tensor).cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    masks = target["masks"].as_subclass(torch.Tensor).cpu().bool()
    pasted = target.get("is_pasted", torch.zeros(len(masks), dtype=torch.bool)).cpu()
    labels = target["labels"].cpu().tolist()
    text = target.get("names") or [names.get(int(x), str(x)) if names else str(x) for x in labels]
    colors = [PASTED_COLOR if p else REAL_COLOR for p in pasted.tolist()]
    if not outlines:
        keep = pasted.nonzero().flatten()
        boxes = target["boxes"].as_subclass(torch.Tensor).cpu().float()[keep]
        if len(keep):
            image = draw_bounding_boxes(image, boxes, colors=[PASTED_COLOR] * len(keep), width=1)
        return image
    if len(masks):
        image = draw_segmentation_masks(image, outline(masks), alpha=1.0, colors=colors)
        tags = [("+" if p else "") + t for t, p in zip(text, pasted.tolist())]
        image = draw_bounding_boxes(image, target["boxes"].as_subclass(torch.Tensor).cpu().float(), labels=tags,
                                    colors=colors, width=2)
    return image


REFER_COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0)]


def draw_referring(image: torch.Tensor, target: Mapping, n: int = 3) -> torch.Tensor:
    """The image with ``n`` of its referring expressions: each one's target boxes in its own colour,
    and the texts in a band above (a no-target one, if any, last, marked so)."""
    from PIL import ImageDraw

    image = image.as_subclass(torch.Tensor).cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    records = target.get("referring", [])
    shown = [r for r in records if r["targets"]][:n] + [r for r in records if not r["targets"]][:1]
    boxes = target["boxes"].as_subclass(torch.Tensor).cpu().float()
    for k, r in enumerate(shown):
        if r["targets"]:
            color = REFER_COLORS[k % len(REFER_COLORS)]
            image = draw_bounding_boxes(image, boxes[r["targets"]], colors=[color] * len(r["targets"]),
                                        labels=[str(k + 1)] * len(r["targets"]), width=3)
    line = 14
    band = Image.new("RGB", (image.shape[-1], line * len(shown) + 6), "white")
    draw = ImageDraw.Draw(band)
    for k, r in enumerate(shown):
        color = REFER_COLORS[k % len(REFER_COLORS)] if r["targets"] else (0, 0, 0)
        prefix = f"{k + 1}. " if r["targets"] else "no target: "
        draw.text((4, 3 + k * line), f"{prefix}{r['text']}  [{r['kind']}]", fill=color)
    band_t = F.pil_to_tensor(band)
    return torch.cat([band_t, image], 1)


def save_grid(tiles: Sequence[torch.Tensor], out: str | Path, cols: int | None = None, tile: int = 384) -> Path:
    """Letterbox every (3, H, W) uint8 tile to ``tile`` px and save them as one PNG grid."""
    boxed = [_letterbox(t, tile) for t in tiles]
    cols = cols or math.ceil(math.sqrt(len(boxed)))
    grid = make_grid(torch.stack(boxed), nrow=cols, padding=4, pad_value=255)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out


def _letterbox(image: torch.Tensor, size: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    s = size / max(h, w)
    small = F.resize(image, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
    canvas = torch.full((3, size, size), 255, dtype=torch.uint8)
    canvas[:, : small.shape[1], : small.shape[2]] = small
    return canvas


def contact_sheet(bank, out: str | Path, n: int = 48, seed: int = 0, tile: int = 128) -> Path:
    """A grid of ``n`` random segments from a bank, on a checkerboard, captioned with their category."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(bank), generator=g)[:n].tolist()
    tiles = []
    for r in rows:
        seg = bank[r]
        rgb, a = seg.rgba[:3].float(), seg.rgba[3:].float() / 255
        h, w = a.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        checker = (((yy // 8 + xx // 8) % 2) * 60 + 170).float()[None].expand(3, h, w)
        img = (rgb * a + checker * (1 - a)).round().to(torch.uint8)
        box = _letterbox(img, tile)
        box = draw_bounding_boxes(box, torch.tensor([[0, 0, 1, 1]]), labels=[seg.category], colors="black", width=0)
        tiles.append(box)
    return save_grid(tiles, out, tile=tile)


def preview_coco(bank_path, ann_file, images_dir, out, n=8, seed=0, layout="sos", num=(4, 10), feather=0.0,
                 relight: str | None = None, weights: str | None = None, sampling: str = "uniform",
                 reference: str | None = None, t: float = 0.001, referring: bool = False,
                 progress: bool = True) -> Path:
    """Augment ``n`` images of a COCO set and save each beside its original; with ``relight``, the
    same augmented images are shown without and with relighting instead. ``sampling`` draws the
    bank's segments (``repeat_factor`` measures f_c on ``reference``, by default the COCO file itself)."""
    if sampling == "repeat_factor" and reference is None:
        reference = ann_file
    _say(f"preview: opening the bank {bank_path} and reading {ann_file} ...", progress)
    ds = CocoInstances(ann_file, images_dir)
    if len(ds) == 0:
        raise SystemExit(f"{ann_file}: no annotated image to preview")
    names = {c["id"]: c["name"] for c in ds.categories}
    cp = CopyPaste.from_names(bank=bank_path, label_map=ann_file, layout=layout, layout_file=ann_file, num_pastes=num,
                              feather_sigma=feather, sampling=sampling, t=t,
                              reference=reference if sampling == "repeat_factor" else None,
                              referring=Referring(vocabulary=sorted(names.values())) if referring else None)
    relit_cp = None
    if relight not in (None, "none"):
        _say(f"preview: loading the {relight} relighting ...", progress)
        relit_cp = copy.copy(cp)
        relit_cp.relight = make_relighter(relight, weights)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(ds), generator=g)[:n].tolist()
    tiles = []
    for i in tqdm(picks, desc="preview", unit="img", disable=not progress):
        image, target = ds[i]
        state = g.get_state()
        pasted, pasted_target = cp(image, target, generator=g)
        if referring:
            tiles.append(draw_referring(pasted, pasted_target))
        elif relit_cp is not None:
            g.set_state(state)  # the same draws, relit
            relit, _ = relit_cp(image, target, generator=g)
            tiles += [draw_instances(pasted, pasted_target, names, outlines=False),
                      draw_instances(relit, pasted_target, names, outlines=False)]
        else:
            tiles += [draw_instances(image, target, names), draw_instances(pasted, pasted_target, names)]
    return save_grid(tiles, out, cols=4)


def _say(text: str, enabled: bool) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)
