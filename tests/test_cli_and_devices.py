"""The README's main job (demo on embedded data), the preview command, and the CUDA path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sos_aug import CopyPaste, SOSLayout
from sos_aug.ops.masks import tight_boxes


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sos_aug.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_demo_on_embedded_data_builds_a_bank_and_a_preview(tmp_path):
    proc = cli("demo", "--out", tmp_path / "demo", "--images-n", "8", "--n", "4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(cli("bank", "info", tmp_path / "demo" / "bank", "--json").stdout)
    data = json.loads((tmp_path / "demo" / "data" / "annotations.json").read_text())
    assert info["num_segments"] == len(data["annotations"]) > 0  # every drawn shape is in the bank
    assert {c["name"] for c in info["categories"]} == {c["name"] for c in data["categories"]}
    assert f"+{info['num_segments']} segments" in proc.stdout
    # the preview: 4 images, each original beside its copy; the copies show pasted instances in magenta
    grid = np.asarray(Image.open(tmp_path / "demo" / "preview.png").convert("RGB"))
    tiles = [grid[:, c * grid.shape[1] // 4:(c + 1) * grid.shape[1] // 4] for c in range(4)]
    magenta = [int(((t == (255, 0, 255)).all(-1)).sum()) for t in tiles]
    assert magenta[0] == magenta[2] == 0 and magenta[1] > 50 and magenta[3] > 50, magenta


def test_preview_on_real_coco(tmp_path, train_bank, val_ann, coco_mini):
    out = tmp_path / "grid.png"
    proc = cli("preview", "--bank", train_bank.root, "--coco", val_ann, "--images", coco_mini / "val2017",
               "--out", out, "--n", "2", "--layout", "sos", "--sampling", "repeat_factor", "--t", "0.3")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size[0] > 500
    # every phase says what it is doing: loading, opening and reading, then a bar image by image
    said = proc.stderr
    assert said.index("preview: loading torch") < said.index("preview: opening the bank") < said.index(" 1/2 ")


def test_cli_errors_are_clear(tmp_path):
    proc = cli("bank", "info", tmp_path)
    assert proc.returncode == 2 and "without meta.json, so no bank" in proc.stderr
    proc = cli("bank", "info", tmp_path / "banks" / "missing")
    assert proc.returncode == 2 and "missing: no such folder" in proc.stderr and "bank build" in proc.stderr
    proc = cli("bank", "build", "--out", tmp_path / "b", "--coco", tmp_path / "none.json", "--images", tmp_path)
    assert proc.returncode == 2 and "none.json" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_matches_cpu(train_bank, val_set):
    cp = CopyPaste(train_bank, layout=SOSLayout(), num_pastes=(5, 10))
    images, targets = zip(*[val_set[i] for i in range(4)])
    segments = cp.fetch(4, torch.Generator().manual_seed(0))
    sizes = [tuple(im.shape[-2:]) for im in images]
    params = cp.draw_placements(sizes, targets, segments, torch.Generator().manual_seed(1))
    cpu_images, cpu_targets = cp.paste(images, targets, segments, params)
    gpu_targets_in = [{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    gpu_images, gpu_targets = cp.paste([im.cuda() for im in images], gpu_targets_in, segments.to("cuda"), params)
    for a, b, ta, tb in zip(cpu_images, gpu_images, cpu_targets, gpu_targets):
        assert (a.int() - b.cpu().int()).abs().float().mean() < 1.0
        assert ta["labels"].tolist() == tb["labels"].cpu().tolist()
        assert ta["is_pasted"].tolist() == tb["is_pasted"].cpu().tolist()
        # masks differ only on a few border pixels (float warp on the GPU, uint8 on the CPU); every
        # box is its own mask's tight box on both, so boxes agree to a pixel
        masks_cpu, masks_gpu = ta["masks"], tb["masks"].cpu()
        assert ((masks_cpu ^ masks_gpu).flatten(1).sum(1) <= 0.01 * masks_cpu.flatten(1).sum(1) + 8).all()
        assert torch.equal(tb["boxes"].cpu(), tight_boxes(masks_gpu))
        assert (ta["boxes"] - tb["boxes"].cpu()).abs().max() <= 1
    # the same seed draws the same layout from GPU targets as from CPU ones
    gpu_params = cp.draw_placements(sizes, gpu_targets_in, segments, torch.Generator().manual_seed(1))
    assert all(torch.equal(p.boxes, q.boxes) for p, q in zip(params, gpu_params))


def test_every_option_of_every_command_says_what_it_is():
    import argparse

    from sos_aug.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not action.help and action.dest != "help":
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")

    walk(build_parser(), ["sos-aug"])
    assert not missing, missing
    proc = cli("preview", "--help")
    assert "(default: 8)" in proc.stdout  # defaults are shown
