"""The referring generator's visibility defaults on real pictures (docs/grounding.md): coco-mini
val2017 instances whose visible area is near each of a ladder of shares of the image, each shown in
a 256x192 window of its image at native resolution with the status the generator gives it.

    python benchmarks/visibility_figure.py [--out docs/grounding_visibility.jpg]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini  # noqa: E402

from sos_aug import CocoInstances  # noqa: E402
from sos_aug.referring.scene import VISIBLE, Visibility, describe  # noqa: E402

SHARES = (0.0004, 0.001, 0.002, 0.003, 0.004, 0.006, 0.01, 0.03)  # visible area / image area
WINDOW = (256, 192)
STATUS_COLOUR = {"visible": (0, 200, 90), "unclear": (255, 170, 0), "ignored": (230, 40, 40)}


def candidates() -> list[tuple[float, int, int, str, str]]:
    """(share, image index, instance index, category, status) of every annotated instance."""
    root = coco_mini()
    ds = CocoInstances(root / "annotations" / "instances_val2017.json", root / "val2017")
    names = {c["id"]: c["name"] for c in ds.categories}
    out = []
    for k in range(len(ds)):
        image, target = ds[k]
        scene = describe(image, target, [names[int(c)] for c in target["labels"]])
        h, w = image.shape[-2:]
        out += [(x.area / (h * w), k, x.index, x.category, x.status) for x in scene.instances]
    return out


def window(ds: CocoInstances, k: int, i: int, caption: str, colour: tuple) -> Image.Image:
    """A WINDOW-sized crop of image k around instance i, its box drawn, the caption below."""
    image, target = ds[k]
    rgb = Image.fromarray(image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy())
    x0, y0, x1, y1 = target["boxes"][i].tolist()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(min(max(cx - WINDOW[0] / 2, 0), max(rgb.width - WINDOW[0], 0)))
    top = int(min(max(cy - WINDOW[1] / 2, 0), max(rgb.height - WINDOW[1], 0)))
    crop = rgb.crop((left, top, left + WINDOW[0], top + WINDOW[1]))
    tile = Image.new("RGB", (WINDOW[0], WINDOW[1] + 34), (24, 24, 24))
    tile.paste(crop, (0, 0))
    pen = ImageDraw.Draw(tile)
    pen.rectangle((x0 - left - 2, y0 - top - 2, x1 - left + 1, y1 - top + 1), outline=colour, width=2)
    font = ImageFont.load_default(12)
    for line, text in enumerate(caption.split("\n")):
        pen.text((4, WINDOW[1] + 3 + 15 * line), text, fill=colour if line else (235, 235, 235), font=font)
    return tile


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/grounding_visibility.jpg")
    args = p.parse_args(argv)
    root = coco_mini()
    ds = CocoInstances(root / "annotations" / "instances_val2017.json", root / "val2017")
    pool = [c for c in candidates() if c[3] != "person"]  # people are the commonest; show the others
    v = Visibility()
    tiles = []
    for share in SHARES:
        best = min(pool, key=lambda c: abs(c[0] / share - 1))
        pool.remove(best)
        s, k, i, category, status = best
        caption = f"{category}: {100 * s:.2f}% of the image\n{status}" + \
            (" (target, anchor, counted)" if status == VISIBLE else "")
        tiles.append(window(ds, k, i, caption, STATUS_COLOUR[status]))
    cols = 4
    sheet = Image.new("RGB", (cols * (WINDOW[0] + 6), 2 * (WINDOW[1] + 40)), (255, 255, 255))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, ((n % cols) * (WINDOW[0] + 6), (n // cols) * (WINDOW[1] + 40)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out} (min_area {v.min_area:.1%}, min_side {v.min_side:.0%} of the short side, "
          f"noticeable {v.noticeable:.2%})")
    return out


if __name__ == "__main__":
    main()
