"""Segment generation end to end with a tiny randomly initialised Stable Diffusion pipeline built here
(its output is noise; the plumbing is real): prompts per category, cut-outs, filters, resume, and
a bank holding exactly the kept segments with their prompt and category as text."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[diffusers]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[diffusers]')")
pytest.importorskip("scipy", reason="scipy is not installed (pip install -e '.[diffusers]')")

from sos_aug.bank import SegmentBank, build_bank, rgba_tree_source  # noqa: E402
from sos_aug.generate import CutoutRules, cut_out, generate_segments, load_pipeline, prompts_for  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A Stable Diffusion pipeline small enough to run on the CPU in a second, saved as a local
    directory the way a user would have a real one."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-sd")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{c}</w>": i + 2 for i, c in enumerate("abcdefgh")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


class EveryOther:
    """A user's cut-out step (say, a local matting model): keeps every other image whole, and
    records what it saw and kept."""

    def __init__(self):
        self.seen, self.kept = 0, []

    def __call__(self, image: np.ndarray, rules: CutoutRules):
        self.seen += 1
        if self.seen % 2:
            return None, "matting"
        rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
        self.kept.append(rgba)
        return rgba, None


def test_generated_segments_reach_the_bank_exactly_with_their_prompts(tmp_path, tiny_pipeline):
    pipe = load_pipeline(tiny_pipeline)
    cutter = EveryOther()
    tree = tmp_path / "tree"
    report = generate_segments(pipe, ["cup", "dog"], per_category=2, out=tree, size=32, steps=2, cutout=cutter,
                               progress=False)
    assert report["kept"] == 4 and report["rejected"] == {"matting": 4} and cutter.seen == 8
    build_bank(tmp_path / "bank", rgba_tree_source(tree, metadata=tree / "metadata.json"), progress=False)
    bank = SegmentBank(tmp_path / "bank")
    assert len(bank) == 4 and {c["name"] for c in bank.categories.values()} == {"cup", "dog"}
    got = sorted(bank[i].rgba.permute(1, 2, 0).numpy().tobytes() for i in range(len(bank)))
    assert got == sorted(k.tobytes() for k in cutter.kept)  # exactly the kept cut-outs, pixel for pixel
    for i in range(len(bank)):
        seg = bank[i]
        assert seg.text["short_phrase"] == seg.category
        assert seg.text["description"] in prompts_for([seg.category])[seg.category]

    again = EveryOther()  # a rerun resumes: nothing kept or rejected is generated again
    generate_segments(pipe, ["cup", "dog"], per_category=2, out=tree, size=32, steps=2, cutout=again,
                      progress=False)
    assert again.seen == 0


def test_cut_out_keeps_one_object_and_rejects_by_rule():
    rules = CutoutRules()
    canvas = np.full((64, 64, 3), 250, np.uint8)
    canvas[20:40, 10:30] = (200, 30, 30)
    rgba, reason = cut_out(canvas, rules)
    assert reason is None and rgba.shape == (20, 20, 4) and (rgba[..., 3] == 255).all()
    assert cut_out(np.full((64, 64, 3), 250, np.uint8), rules) == (None, "empty")
    edge = canvas.copy()
    edge[:, 0:3] = (0, 0, 0)  # a second piece, touching the border
    edge[20:40, 3:10] = (200, 30, 30)  # joined to the object: one piece now, on the border
    assert cut_out(edge, rules)[1] == "border"
    two = canvas.copy()
    two[45:60, 40:60] = (30, 30, 200)  # two objects of similar size
    assert cut_out(two, rules)[1] == "fragmented"
    tiny = np.full((64, 64, 3), 250, np.uint8)
    tiny[30:32, 30:32] = 0
    assert cut_out(tiny, rules)[1] == "area"


@pytest.mark.slow
def test_generate_command_builds_the_bank_and_refuses_a_missing_model(tmp_path, tiny_pipeline):
    cats = tmp_path / "categories.txt"
    cats.write_text("cup\n")
    proc = subprocess.run([sys.executable, "-m", "sos_aug.cli", "generate", "--model", str(tmp_path / "nowhere"),
                           "--categories", str(cats), "--per-category", "1", "--out", str(tmp_path / "bank")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "model_index.json" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sos_aug.cli", "generate", "--model", str(tiny_pipeline),
                           "--categories", str(cats), "--per-category", "1", "--out", str(tmp_path / "bank"),
                           "--size", "32", "--steps", "2", "--threshold", "0", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "kept 0 segments" in proc.stdout or "added 1 segments" in proc.stdout
