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


TINY_VARIANTS = ("sd1", "sd2", "sdxl")


def build_tiny_pipeline(seed: int = 0, tokenizer=None, variant: str = "sd1"):
    """A 32x32-pixel SD pipeline (8x8 latents) with random weights fixed by ``seed``.

    ``variant="sd1"``: ε-prediction, 32-wide text embeddings (SD-1.x style); ``"sd2"``:
    v-prediction and 64-wide text embeddings (SD-2.x style); ``"sdxl"``: SDXL's layout — two
    text encoders (32- and 32-wide, the second with a projection: pooled embedding), their
    hidden states concatenated (64-wide cross-attention) and the added time/text conditioning.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from erasekit.world.build import build_scheduler, build_text_encoder

    if variant not in TINY_VARIANTS:
        raise ValueError(f"variant must be one of {TINY_VARIANTS}")
    if variant == "sdxl":
        return _tiny_sdxl(seed, tokenizer)
    width = 64 if variant == "sd2" else 32
    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=width, attention_head_dim=8)
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
    text_encoder = build_text_encoder(seed, width)  # ShapesWorld's layout, SD's vocab
    # SD's scaled-linear DDIM, predicting ε (SD-1) or v (SD-2)
    scheduler = build_scheduler(prediction_type="v_prediction" if variant == "sd2" else "epsilon")
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


def _tiny_unet(**settings):
    """The tiny U-Net: 8x8 latents, two levels of 32 and 64 channels."""
    from diffusers import UNet2DConditionModel

    layout = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
              "block_out_channels": (32, 64), "norm_num_groups": 8,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}  # fmt: skip
    return UNet2DConditionModel(**{**layout, **settings})


def _tiny_sdxl(seed: int, tokenizer=None):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from erasekit.tokenizer import VOCAB_SIZE
    from erasekit.world.build import build_scheduler, build_text_encoder, build_vae

    torch.manual_seed(seed)
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32), concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + the pooled embedding
    )
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407)).eval().requires_grad_(False)  # fmt: skip
    tok = tokenizer if tokenizer is not None else build_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=build_vae(seed),
        text_encoder=build_text_encoder(seed, 32),
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=build_scheduler(prediction_type="epsilon"),
        add_watermarker=False,
    )


def save_tiny_pipeline(
    out_dir: str | Path, seed: int = 0, overwrite: bool = False, variant: str = "sd1"
) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder with an erasekit manifest."""
    pipe = build_tiny_pipeline(seed, variant=variant)
    manifest = build_manifest(base_model=None, method="tiny-random-init",
                              config={"seed": seed, "variant": variant}, seeds=[seed])  # fmt: skip
    manifest["sampler"] = dict(TINY_SAMPLER)
    return save_model(pipe, out_dir, manifest, overwrite=overwrite)


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """The FID Inception-v3 architecture with random weights, as a .safetensors file (tests
    run the FID path offline; its numbers mean nothing)."""
    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the architecture only
            return None

    path = Path(path)
    empty = path.with_name(path.name + ".empty.pt")
    torch.save({}, empty)
    torch.manual_seed(seed)
    try:
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        empty.unlink()
    for module in net.modules():  # He init keeps activations alive through the depth
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path
