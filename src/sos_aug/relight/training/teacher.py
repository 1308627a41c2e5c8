"""A heavier teacher for distillation: IC-Light (foreground-conditioned SD 1.5) through diffusers.

IC-Light's UNet takes 8 latent channels: the noisy latent and the VAE latent of the foreground on a
grey background. The teacher runs img2img from the composite's latent, conditioned on that
foreground latent, and returns the relit composite. Nothing is downloaded: every component is
loaded from a local directory in diffusers layout (``unet/``, ``vae/``, ``scheduler/``, and either
``text_encoder/`` + ``tokenizer/`` or a ``prompt_embeds.pt`` tensor). :func:`assemble_iclight` makes
that directory from Stable Diffusion 1.5 and IC-Light's released offsets. Distillation fits the
student's transform family to each teacher output inside the mask (:func:`.family.fit_family`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as nnf

REQUIRED = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


def missing_components(path: Path) -> list[str]:
    """What ``path`` lacks of a local IC-Light directory: checked before diffusers is asked, which
    would otherwise take a missing folder for a model id on the Hub."""
    if not path.is_dir():
        return ["the directory itself"]
    missing = [part for part in REQUIRED if not (path / part).is_file()]
    text = (path / "text_encoder" / "config.json").is_file() and (path / "tokenizer").is_dir()
    if not (path / "prompt_embeds.pt").is_file() and not text:
        missing.append("prompt_embeds.pt (or text_encoder/ + tokenizer/)")
    return missing


class ICLightTeacher:
    """``teacher(composite, alpha) -> relit`` on (S, 3, h, w) RGB in [0, 1] and (S, 1, h, w) alpha."""

    def __init__(self, unet, vae, scheduler, prompt_embeds: torch.Tensor, steps: int = 20,
                 strength: float = 0.7, seed: int = 0):
        if unet.config.in_channels != 2 * vae.config.latent_channels:
            raise ValueError(f"IC-Light's UNet takes {2 * vae.config.latent_channels} input channels "
                             f"(noisy + foreground latents); this one takes {unet.config.in_channels}")
        self.unet, self.vae, self.scheduler = unet.eval(), vae.eval(), scheduler
        self.prompt_embeds, self.steps, self.strength, self.seed = prompt_embeds, steps, strength, seed
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> ICLightTeacher:
        """Run on ``device`` in ``dtype`` (default: float16 on CUDA, as IC-Light runs, else float32);
        inputs are moved there and results come back where the inputs were, in float32."""
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.unet.to(self.device, self.dtype)
        self.vae.to(self.device, self.dtype)
        self.prompt_embeds = self.prompt_embeds.to(self.device, self.dtype)
        return self

    @classmethod
    def from_local(cls, path: str | Path, prompt: str = "natural lighting", **kwargs) -> ICLightTeacher:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        path = Path(path)
        missing = missing_components(path)
        if missing:
            raise FileNotFoundError(f"{path}: not an IC-Light directory in diffusers layout (local only): "
                                    f"missing {', '.join(missing)}")
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
        if (path / "prompt_embeds.pt").is_file():
            embeds = torch.load(path / "prompt_embeds.pt", map_location="cpu", weights_only=True)
        else:
            from transformers import CLIPTextModel, CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
            encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids
            with torch.no_grad():
                embeds = encoder(ids)[0]
        return cls(unet, vae, scheduler, embeds, **kwargs)

    def _encode(self, rgb: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(rgb * 2 - 1).latent_dist.mode()
        return latent * self.vae.config.scaling_factor

    @torch.no_grad()
    def __call__(self, composite: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        h, w = composite.shape[-2:]
        f = self.factor * 8
        size = (max(f, round(h / f) * f), max(f, round(w / f) * f))
        x = nnf.interpolate(composite.to(self.device, self.dtype), size=size, mode="bilinear", align_corners=False)
        a = nnf.interpolate(alpha.to(self.device, self.dtype), size=size, mode="bilinear", align_corners=False)
        foreground = self._encode(x * a + 0.5 * (1 - a))
        latent = self._encode(x)
        self.scheduler.set_timesteps(self.steps)
        start = int(self.steps * (1 - self.strength))
        timesteps = self.scheduler.timesteps[start:]
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(latent.shape, generator=g).to(latent)  # drawn on the CPU: the same on any device
        latent = self.scheduler.add_noise(latent, noise, timesteps[:1])
        embeds = self.prompt_embeds.expand(len(x), -1, -1).to(latent.dtype)
        for t in timesteps:
            eps = self.unet(torch.cat([latent, foreground], 1), t, encoder_hidden_states=embeds).sample
            latent = self.scheduler.step(eps, t, latent).prev_sample
        out = self.vae.decode(latent / self.vae.config.scaling_factor).sample
        out = ((out.float() + 1) / 2).clamp(0, 1)
        return nnf.interpolate(out, size=(h, w), mode="bilinear", align_corners=False).to(composite.device)


SHARED = ("vae", "scheduler", "text_encoder", "tokenizer", "prompt_embeds.pt")  # taken from SD 1.5 as they are


def assemble_iclight(sd15: str | Path, offsets: str | Path, out: str | Path) -> Path:
    """Make the directory :meth:`ICLightTeacher.from_local` reads from a local Stable Diffusion 1.5
    directory in diffusers layout and IC-Light's offsets file (``iclight_sd15_fc.safetensors``), as
    IC-Light's own demo builds its UNet: ``conv_in`` widened to twice its input channels (the new
    ones zero), then every weight plus its offset. Nothing is downloaded. Written beside ``out`` and
    renamed when complete; an existing ``out`` is never touched."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    sd15, offsets, out = Path(sd15), Path(offsets), Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new directory")
    missing = [part for part in REQUIRED if not (sd15 / part).is_file()]
    if missing:
        raise FileNotFoundError(f"{sd15}: not a Stable Diffusion 1.5 directory in diffusers layout: "
                                f"missing {', '.join(missing)}")
    if not offsets.is_file():
        raise FileNotFoundError(f"{offsets}: IC-Light offsets file not found")
    unet = UNet2DConditionModel.from_pretrained(sd15 / "unet", local_files_only=True)
    _widen_conv_in(unet)
    unet.load_state_dict(_merged(unet.state_dict(), load_file(offsets), offsets), strict=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted run left
    unet.save_pretrained(partial / "unet")
    for part in SHARED:
        if (sd15 / part).is_dir():
            shutil.copytree(sd15 / part, partial / part, copy_function=_link_or_copy)
        elif (sd15 / part).is_file():
            _link_or_copy(sd15 / part, partial / part)
    partial.rename(out)
    return out


def _widen_conv_in(unet) -> None:
    """Give the UNet's first convolution as many new input channels as it had (the foreground
    latent's), with zero weights, so that before the offsets it computes what it did."""
    old = unet.conv_in
    wide = torch.nn.Conv2d(2 * old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, : old.in_channels].copy_(old.weight)
        wide.bias.copy_(old.bias)
    unet.conv_in = wide
    unet.register_to_config(in_channels=wide.in_channels)


def _merged(weights: dict, offsets: dict, where: Path) -> dict:
    """Each weight plus its offset; the offsets must name exactly the UNet's weights, shape for shape."""
    missing, extra = sorted(set(weights) - set(offsets)), sorted(set(offsets) - set(weights))
    if missing or extra:
        raise ValueError(f"{where}: offsets do not match the widened SD 1.5 UNet "
                         f"(missing {len(missing)}, e.g. {missing[:3]}; unexpected {len(extra)}, e.g. {extra[:3]})")
    wrong = [k for k in weights if weights[k].shape != offsets[k].shape]
    if wrong:
        raise ValueError(f"{where}: {len(wrong)} offsets have another shape than their weight, e.g. {wrong[0]} "
                         f"{tuple(offsets[wrong[0]].shape)} vs {tuple(weights[wrong[0]].shape)}")
    return {k: weights[k] + offsets[k].to(weights[k].dtype) for k in weights}


def _link_or_copy(src, dst) -> None:
    """A hard link where the file system allows it (SD 1.5's VAE and text encoder are large), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
