"""The review gallery (``sos-aug refer --review N``): the pictures it draws, and its page in a real
headless Chromium: it opens, shows every picture, and a verdict file saved from it loads back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sos_aug.refer import refer_coco
from sos_aug.referring.review import pick


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, val_ann, coco_mini, train_bank):
    out = tmp_path_factory.mktemp("review")
    result = refer_coco(val_ann, coco_mini / "val2017", out, train_bank.root, paste=True, limit=10, seed=4,
                        progress=False, review=8)
    return out, result


def rows_of(page_path) -> list[dict]:
    text = page_path.read_text()
    start = text.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    return json.loads(text[start : text.index("</script>", start)])


def test_the_gallery_draws_expressions_spread_over_kinds(gallery):
    out, result = gallery
    page = out / "review" / "review.html"
    assert result["files"]["review"] == str(page)
    rows = rows_of(page)
    written = [k for k, n in result["expressions"].items() if n]
    assert len(rows) == 8 and len({r["kind"] for r in rows}) == min(8, len(written)) >= 3  # every kind written
    grefs = {g["sentences"][0]["sent"] for g in json.loads((out / "grefs.json").read_text())}
    for r in rows:
        assert r["text"] in grefs
        picture = Image.open(out / "review" / r["picture"])
        source = Image.open(out / r["image"])
        assert picture.size == (source.size[0], source.size[1] + 34)  # the image below a banner of text
        banner = torch.from_numpy(np.array(picture.convert("L")))[:34]
        assert (banner > 128).any()  # the text is written on it


def test_pick_is_seeded_and_takes_each_kind_in_turn():
    records = [(i, {"kind": k, "text": f"{k}{i}"}) for i in range(10) for k in ("a", "b", "c")]
    first = pick(records, 6, seed=1)
    assert first == pick(records, 6, seed=1) and first != pick(records, 6, seed=2)
    assert sorted(r["kind"] for _, r in first) == ["a", "a", "b", "b", "c", "c"]


def test_the_page_opens_in_chromium_and_verdicts_round_trip(gallery, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                   "sos-aug[test])")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    out, _ = gallery
    url = (out / "review" / "review.html").as_uri()
    rows = rows_of(out / "review" / "review.html")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto(url)
        assert page.evaluate("document.images.length") == len(rows)
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        for k, r in enumerate(rows):
            row = page.locator(f"#r{r['id']}")
            row.locator('[name="true"]').select_option("yes")
            row.locator('[name="unique"]').select_option("no" if k % 2 else "yes")
            row.locator('[name="natural"]').select_option("yes")
            row.locator('[name="reason"]').fill(f"reason {k}")
        with page.expect_download() as download:
            page.click("#save")
        saved = tmp_path / "verdicts.json"
        download.value.save_as(saved)
        verdicts = json.loads(saved.read_text())["verdicts"]
        assert [v["id"] for v in verdicts] == [r["id"] for r in rows]
        assert [v["unique"] for v in verdicts] == ["no" if k % 2 else "yes" for k in range(len(rows))]
        assert all(v["true"] == "yes" and v["text"] == r["text"] for v, r in zip(verdicts, rows))
        fresh = browser.new_page()
        fresh.goto(url)
        fresh.set_input_files("#load", str(saved))
        fresh.wait_for_function("document.getElementById('status').textContent.startsWith('loaded')")
        assert fresh.inner_text("#status") == f"loaded {len(rows)} verdicts"
        for k, r in enumerate(rows):
            row = fresh.locator(f"#r{r['id']}")
            assert row.locator('[name="unique"]').input_value() == ("no" if k % 2 else "yes")
            assert row.locator('[name="reason"]').input_value() == f"reason {k}"
        browser.close()
