"""A tiny, randomly initialised Stable Diffusion pipeline built offline (tests, demos, benches).

Same classes as SD-1.x — UNet2DConditionModel, AutoencoderKL, CLIPTextModel, SD's CLIP
tokenizer, DDIM — at a size that runs a step in milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from erasekit.models import build_manifest, save_model
from erasekit.tokenizer import build_clip_tokenizer

TINY_SAMPLER = {"steps": 4, "guidance": 5.0, "height": 32, "width": 32}


def build_tiny_pipeline(seed: int = 0, tokenizer=None):
    """A 32x32-pixel SD pipeline (8x8 latents) with random weights fixed by ``seed``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from erasekit.world.build import build_scheduler, build_text_encoder

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = build_text_encoder(seed)  # ShapesWorld's: hidden 32, 2 layers, SD's vocab
    scheduler = build_scheduler()  # SD's scaled-linear DDIM
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer if tokenizer is not None else build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder with an erasekit manifest."""
    pipe = build_tiny_pipeline(seed)
    manifest = build_manifest(
        base_model=None, method="tiny-random-init", config={"seed": seed}, seeds=[seed]
    )
    manifest["sampler"] = dict(TINY_SAMPLER)
    return save_model(pipe, out_dir, manifest, overwrite=overwrite)
