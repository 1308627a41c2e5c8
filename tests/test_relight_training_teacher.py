"""The teacher (relight/teacher.py): IC-Light assembled from SD 1.5 and its offsets, run in any dtype
and device, and distillation plumbing with a tiny random teacher (no download)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sos_aug.relight import RelightNet


def _tiny_iclight(path, in_channels: int = 8):
    """A tiny random IC-Light directory (or, with ``in_channels=4``, a tiny "SD 1.5" one)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install '.[diffusers]')")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    diffusers.DDIMScheduler(num_train_timesteps=100).save_pretrained(path / "scheduler")
    torch.save(torch.zeros(1, 77, 32), path / "prompt_embeds.pt")
    return path


@pytest.mark.slow
def test_distillation_plumbing_with_a_tiny_random_teacher(tmp_path, train_ann, coco_mini):
    from sos_aug.relight.training.teacher import ICLightTeacher
    from sos_aug.relight.training.train import train_relight_net, training_targets

    teacher = ICLightTeacher.from_local(_tiny_iclight(tmp_path / "iclight"), steps=3)
    images = torch.rand(2, 3, 32, 32)
    alpha = torch.zeros(2, 1, 32, 32)
    alpha[:, :, 8:24, 8:24] = 1
    refs = torch.tensor([[50.0, 10, 10, 20, 10, 10]] * 2)
    composite, a, target = training_targets(images, alpha, refs, torch.Generator().manual_seed(0), teacher)
    assert torch.equal(target[:, :, alpha[0, 0] == 0], composite[:, :, alpha[0, 0] == 0])
    assert not torch.allclose(target, composite)  # the teacher's fitted relighting, not the identity
    out = tmp_path / "student.pt"
    ticking = itertools.count(step=0.001).__next__  # the budget in readings, not this machine's wall time
    report = train_relight_net(train_ann, coco_mini / "train2017", out, minutes=5, teacher=teacher, batch=2,
                               size=32, max_steps=2, progress=False, clock=ticking)
    assert report.steps == 2 and out.is_file() and out.with_suffix(".png").is_file()
    assert isinstance(RelightNet.load(out), RelightNet)


def test_an_incomplete_teacher_directory_is_named_before_diffusers_looks_online(tmp_path):
    from sos_aug.relight.training.teacher import ICLightTeacher

    path = _tiny_iclight(tmp_path / "iclight")
    assert ICLightTeacher.from_local(path, steps=1).steps == 1
    (path / "prompt_embeds.pt").unlink()
    for config in path.glob("vae/*.json"):
        config.unlink()
    with pytest.raises(FileNotFoundError, match=r"missing vae/config\.json, prompt_embeds\.pt"):
        ICLightTeacher.from_local(path)
    with pytest.raises(FileNotFoundError, match="missing the directory itself"):
        ICLightTeacher.from_local(tmp_path / "nowhere")


def test_iclight_directory_assembled_from_sd15_and_offsets(tmp_path):
    """What `sos-aug relight iclight` makes: SD 1.5's UNet with conv_in widened (new channels zero)
    plus IC-Light's offsets, every weight; the rest of SD 1.5 as it is; loadable as a teacher."""
    from safetensors.torch import save_file

    from sos_aug.cli import main
    from sos_aug.relight.training.teacher import ICLightTeacher

    sd15 = _tiny_iclight(tmp_path / "sd15", in_channels=4)
    import diffusers

    base = diffusers.UNet2DConditionModel.from_pretrained(sd15 / "unet").state_dict()
    shapes = {k: v.shape for k, v in base.items()}
    shapes["conv_in.weight"] = (shapes["conv_in.weight"][0], 8, *shapes["conv_in.weight"][2:])
    g = torch.Generator().manual_seed(1)
    offsets = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in shapes.items()}
    save_file(offsets, tmp_path / "iclight_sd15_fc.safetensors")
    out = tmp_path / "iclight"
    assert main(["relight", "iclight", "--sd15", str(sd15), "--offsets", str(tmp_path / "iclight_sd15_fc.safetensors"),
                 "--out", str(out)]) == 0
    merged = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    widened = torch.cat([base["conv_in.weight"], torch.zeros_like(base["conv_in.weight"])], 1)
    assert torch.allclose(merged["conv_in.weight"], widened + offsets["conv_in.weight"])
    assert all(torch.allclose(merged[k], base[k] + offsets[k]) for k in base if k != "conv_in.weight")
    assert (out / "prompt_embeds.pt").read_bytes() == (sd15 / "prompt_embeds.pt").read_bytes()
    teacher = ICLightTeacher.from_local(out, steps=1)
    relit = teacher(torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32))
    assert relit.shape == (1, 3, 32, 32) and torch.isfinite(relit).all()


def test_iclight_assembly_refuses_mismatched_offsets_and_leaves_nothing(tmp_path, capsys):
    from safetensors.torch import save_file

    from sos_aug.cli import main

    sd15 = _tiny_iclight(tmp_path / "sd15", in_channels=4)
    save_file({"conv_in.weight": torch.zeros(32, 8, 3, 3)}, tmp_path / "partial.safetensors")
    out = tmp_path / "iclight"
    args = ["relight", "iclight", "--sd15", str(sd15), "--offsets", str(tmp_path / "partial.safetensors"),
            "--out", str(out)]
    assert main(args) == 2
    assert "partial.safetensors: offsets do not match" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


def test_teacher_runs_in_the_dtype_and_device_it_is_moved_to(tmp_path):
    from sos_aug.relight.training.teacher import ICLightTeacher

    teacher = ICLightTeacher.from_local(_tiny_iclight(tmp_path / "iclight"), steps=2)
    composite, alpha = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    single = teacher(composite, alpha)
    double = teacher.to("cpu", torch.float64)(composite, alpha)
    assert teacher.unet.dtype == torch.float64 and double.dtype == torch.float32
    assert (single - double).abs().max() < 1e-4  # the same relighting, computed in another precision
