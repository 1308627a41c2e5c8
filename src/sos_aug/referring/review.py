"""A review gallery for people who build grounding sets: randomly drawn expressions (seeded, spread
over kinds), each as a picture (the image, the targets' boxes bold and numbered, other instances
thin, pasted ones marked, the text on top) and one static ``review.html`` page that shows them with
a verdict column a reviewer fills in and saves as JSON (and loads back to go on)."""

from __future__ import annotations

import html
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..ops.files import atomic_write_bytes

TARGET_COLOURS = [(255, 60, 60), (60, 200, 255), (255, 200, 0), (160, 90, 255), (0, 220, 120)]
BANNER = 34  # pixels of text above the picture


@dataclass
class Drawn:
    """One expression to review: its record, and the image and target it was written for."""

    record: dict
    image: torch.Tensor  # (3, H, W) uint8
    target: dict
    file_name: str = ""


def draw(item: Drawn) -> Image.Image:
    """The picture of one expression: every instance thin (pasted ones dashed and tagged), the
    targets bold and numbered, the text and kind above."""
    rgb = item.image.as_subclass(torch.Tensor).permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    h, w = rgb.shape[:2]
    canvas = Image.new("RGB", (w, h + BANNER), (24, 24, 24))
    canvas.paste(Image.fromarray(rgb), (0, BANNER))
    pen = ImageDraw.Draw(canvas)
    font = _font(16)
    boxes = torch.as_tensor(item.target["boxes"]).as_subclass(torch.Tensor).float().tolist()
    pasted = item.target.get("is_pasted", torch.zeros(len(boxes), dtype=torch.bool)).tolist()
    targets = item.record["targets"]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if i in targets:
            continue
        box = (x0, y0 + BANNER, x1 - 1, y1 - 1 + BANNER)
        if pasted[i]:
            _dashed(pen, box, (0, 255, 255))
            pen.text((box[0] + 2, box[1] + 1), "P", fill=(0, 255, 255), font=_font(11))
        else:
            pen.rectangle(box, outline=(230, 230, 230), width=1)
    for k, i in enumerate(targets):
        x0, y0, x1, y1 = boxes[i]
        colour = TARGET_COLOURS[k % len(TARGET_COLOURS)]
        pen.rectangle((x0, y0 + BANNER, x1 - 1, y1 - 1 + BANNER), outline=colour, width=4)
        tag = f"{k + 1}" + (" P" if pasted[i] else "")
        tx, ty = x0 + 4, max(BANNER, y0 + BANNER - 20)
        pen.rectangle((tx - 2, ty, tx + 8 * len(tag) + 6, ty + 18), fill=colour)
        pen.text((tx + 1, ty + 1), tag, fill=(0, 0, 0), font=font)
    kind = item.record["kind"] + (" (no target)" if not targets else "")
    pen.text((8, 8), f"\u201c{item.record['text']}\u201d", fill=(255, 255, 255), font=font)
    pen.text((w - 8 * len(kind) - 8, 10), kind, fill=(170, 170, 170), font=_font(12))
    return canvas


def pick(records: Sequence[tuple[int, dict]], n: int, seed: int) -> list[tuple[int, dict]]:
    """``n`` of (sample, record) pairs drawn at random (``seed``), spread over kinds: one of each
    kind in turn, each kind in a random order."""
    rng = random.Random(seed)
    by_kind: dict[str, list[tuple[int, dict]]] = {}
    for item in records:
        by_kind.setdefault(item[1]["kind"], []).append(item)
    for items in by_kind.values():
        rng.shuffle(items)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    out: list[tuple[int, dict]] = []
    while len(out) < n and any(by_kind.values()):
        for kind in kinds:
            if by_kind[kind] and len(out) < n:
                out.append(by_kind[kind].pop())
    return out


def write_review(out: str | Path, items: Sequence[Drawn]) -> Path:
    """The pictures (``NNN.png``) and ``review.html`` in ``out``; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, item in enumerate(items):
        name = f"{k + 1:03d}.png"
        draw(item).save(out / name)
        rows.append({"id": f"{k + 1:03d}", "picture": name, "text": item.record["text"], "kind": item.record["kind"],
                     "targets": len(item.record["targets"]), "image": item.file_name})
    page = out / "review.html"
    atomic_write_bytes(page, _page(rows).encode())
    return page


def _page(rows: list[dict]) -> str:
    data = json.dumps(rows).replace("</", "<\\/")
    body = "\n".join(
        f'<tr id="r{r["id"]}"><td>{r["id"]}</td><td><img src="{html.escape(r["picture"])}" alt="{r["id"]}"></td>'
        f'<td class="text">{html.escape(r["text"])}<div class="kind">{html.escape(r["kind"])}, '
        f'{r["targets"]} target(s)<br>{html.escape(r["image"])}</div></td>'
        + "".join(f'<td><select name="{q}"><option value=""></option><option>yes</option><option>no</option>'
                  f"</select></td>" for q in QUESTIONS)
        + '<td><input name="reason" size="24"></td></tr>' for r in rows)
    heads = "".join(f"<th>{q}</th>" for q in QUESTIONS)
    return _TEMPLATE.replace("%ROWS%", body).replace("%DATA%", data).replace("%HEADS%", heads)


QUESTIONS = ("true", "unique", "natural")

_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sos_aug referring review</title>
<style>
body { font-family: sans-serif; margin: 1em; background: #f4f4f4; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px; vertical-align: top; }
img { max-width: 520px; display: block; } .text { max-width: 18em; font-size: 1.1em; }
.kind { color: #666; font-size: 0.8em; margin-top: 0.5em; } #bar { position: sticky; top: 0; background: #f4f4f4;
padding: 0.5em 0; }
</style></head><body>
<div id="bar"><b>Is the expression true of the numbered boxes, does it pick out exactly them, would a person
say it?</b> <button id="save">Save verdicts</button> <label>Load verdicts <input type="file" id="load"
accept=".json"></label> <span id="status"></span></div>
<table><thead><tr><th>#</th><th>picture</th><th>expression</th>%HEADS%<th>reason</th></tr></thead>
<tbody>
%ROWS%
</tbody></table>
<script id="data" type="application/json">%DATA%</script>
<script>
const rows = JSON.parse(document.getElementById("data").textContent);
const fields = ["true", "unique", "natural", "reason"];
function verdicts() {
  return {verdicts: rows.map(r => {
    const tr = document.getElementById("r" + r.id), v = {id: r.id, text: r.text, kind: r.kind};
    for (const f of fields) v[f] = tr.querySelector(`[name="${f}"]`).value;
    return v;
  })};
}
function fill(saved) {
  let n = 0;
  for (const v of saved.verdicts || []) {
    const tr = document.getElementById("r" + v.id);
    if (!tr) continue;
    for (const f of fields) if (v[f] !== undefined) tr.querySelector(`[name="${f}"]`).value = v[f];
    n++;
  }
  document.getElementById("status").textContent = `loaded ${n} verdicts`;
}
document.getElementById("save").onclick = () => {
  const blob = new Blob([JSON.stringify(verdicts(), null, 1)], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "verdicts.json";
  document.body.appendChild(a); a.click(); a.remove();
};
document.getElementById("load").onchange = e => {
  const file = e.target.files[0];
  if (file) file.text().then(t => fill(JSON.parse(t)));
};
</script></body></html>
"""


def _dashed(pen: ImageDraw.ImageDraw, box: tuple, colour: tuple, dash: int = 6) -> None:
    x0, y0, x1, y1 = box
    for a, b, horizontal, at in ((x0, x1, True, y0), (x0, x1, True, y1), (y0, y1, False, x0), (y0, y1, False, x1)):
        s = a
        while s < b:
            e = min(s + dash, b)
            pen.line((s, at, e, at) if horizontal else (at, s, at, e), fill=colour, width=2)
            s += 2 * dash


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)
