"""Train ShapesWorld: VAE, world classifier, and text-to-image U-Nets (full + never-learned).

Recipe (chosen from timings on a 2-core CPU; see docs/world.md):
- 32x32 RGB renders -> AutoencoderKL with 4x downsampling -> 8x8x4 latents.
- CLIPTextModel (hidden 32, 2 layers) at a fixed random initialisation, frozen: a frozen random
  encoder learned colours sooner than a jointly trained one in our prototypes (notes).
- UNet2DConditionModel (32, 64 channels, cross-attention in both levels), epsilon prediction,
  SD's scaled-linear DDPM schedule, min-SNR-5 loss weights, 10% caption dropout, EMA.
- DDIM sampling. The never-learned references use the same recipe on data with no image and
  no caption of the held-out concept; the VAE and text encoder are shared (they encode, the
  U-Net is what learns to draw).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from erasekit.world.render import COLOURS, SHAPES, STYLES, caption, render, sample_scene

VARIANTS = {
    "full": {},
    "no-red": {"colours": tuple(c for c in COLOURS if c != "red")},
    "no-circle": {"shapes": tuple(s for s in SHAPES if s != "circle")},
}
HELD_OUT = {"full": None, "no-red": "red", "no-circle": "circle"}


@dataclass
class WorldRecipe:
    seed: int = 0
    n_images: int = 30000
    vae_steps: int = 1000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    classifier_steps: int = 800
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    sampler: dict = field(
        default_factory=lambda: {"steps": 25, "guidance": 4.0, "height": 32, "width": 32}
    )


def build_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.tokenizer import VOCAB_SIZE

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=32,
        mid_block_add_attention=False,
    )


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(recipe: WorldRecipe, progress: bool = True, device: str = "cpu"):
    """Reconstruction (L1 + MSE) with SD's tiny KL weight, on fresh renders."""
    from tqdm.auto import tqdm

    from erasekit.world.render import render_dataset

    vae = build_vae(recipe.seed).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.vae_lr, total_steps=recipe.vae_steps)
    for step in tqdm(range(recipe.vae_steps), desc="world vae", disable=not progress):
        images, _, _ = render_dataset(recipe.vae_batch, seed=20_000_000 + step)
        x = _images_to_tensor(images).to(device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vae.eval().requires_grad_(False)
    return vae


@dataclass
class LatentData:
    """Pre-encoded renders: posterior mean/std per image, and scenes to caption on the fly."""

    mean: torch.Tensor
    std: torch.Tensor
    scenes: list


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int, device: str = "cpu", **concepts) -> LatentData:
    """Render n scenes (over the given concept values) and keep their latent posteriors."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, **concepts) for _ in range(n)]
    means, stds = [], []
    for i in range(0, n, 256):
        chunk = np.stack([np.asarray(render(s)) for s in scenes[i : i + 256]])
        post = vae.encode(_images_to_tensor(chunk).to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return LatentData(torch.cat(means), torch.cat(stds), scenes)


def train_unet(
    recipe: WorldRecipe,
    data: LatentData,
    text_encoder,
    tokenizer,
    scaling_factor: float,
    seed: int,
    progress: bool = True,
    desc: str = "world unet",
    device: str = "cpu",
    callback=None,
    callback_every: int = 0,
):
    """Epsilon-prediction DDPM training with min-SNR weights, caption dropout and EMA.

    ``callback(step, ema_unet)`` runs every ``callback_every`` steps (e.g. to sample and measure).
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    unet = build_unet(seed).to(device)
    ema = build_unet(seed).requires_grad_(False).to(device)
    ema.load_state_dict(unet.state_dict())
    noise_sched = DDPMScheduler.from_config(build_scheduler().config)
    alphas = noise_sched.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=1e-2)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.unet_steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.scenes)
    log = []
    for step in tqdm(range(recipe.unet_steps), desc=desc, disable=not progress):
        idx = torch.randint(0, n, (recipe.unet_batch,), generator=gen)
        eps0 = torch.randn(data.mean[idx].shape, generator=gen)
        latents = (data.mean[idx] + data.std[idx] * eps0) * scaling_factor
        captions = [
            "" if rng.random() < recipe.caption_dropout else caption(data.scenes[i], rng)
            for i in idx.tolist()
        ]
        ids = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            cond = text_encoder(ids.to(device))[0]
        t = torch.randint(0, 1000, (recipe.unet_batch,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        noisy, noise, t = noisy.to(device), noise.to(device), t.to(device)
        pred = unet(noisy, t, cond).sample
        weight = torch.clamp(snr[t], max=recipe.min_snr_gamma) / snr[t]
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log.append({"step": step, "loss": round(loss.item(), 5)})
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            callback(step + 1, ema)
    return ema.eval(), log


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def declare_float32(model_dir: str | Path) -> None:
    """Weights are stored in fp16 to keep the package small; the text encoder's config asks
    loaders for fp32 (its training precision), so a bare ``from_pretrained(path)`` gives one
    dtype throughout (transformers otherwise keeps the stored fp16)."""
    config = Path(model_dir) / "text_encoder" / "config.json"
    data = json.loads(config.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in data:
            data[key] = "float32"
    config.write_text(json.dumps(data, indent=2) + "\n")


def build_world(
    out_dir: str | Path,
    recipe: WorldRecipe | None = None,
    variants: tuple[str, ...] = tuple(VARIANTS),
    progress: bool = True,
    fp16: bool = True,
    command: str | None = None,
    device: str = "cpu",
) -> dict:
    """Train everything into ``out_dir`` (written aside and renamed when complete)."""
    from erasekit.models import build_manifest, save_model
    from erasekit.outputs import atomic_output_dir, write_json
    from erasekit.tokenizer import build_clip_tokenizer
    from erasekit.world.classifier import heldout_accuracy, save_classifier, train_classifier

    recipe = recipe or WorldRecipe()
    timings: dict[str, float] = {}
    started = time.time()
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        tokenizer = build_clip_tokenizer()
        text_encoder = build_text_encoder(recipe.seed).to(device)
        t0 = time.time()
        vae = train_vae(recipe, progress, device)
        timings["vae_s"] = time.time() - t0
        t0 = time.time()
        classifier = train_classifier(vae.cpu(), recipe.classifier_steps, seed=recipe.seed,
                                      progress=progress)  # fmt: skip
        accuracy = {
            "renders": heldout_accuracy(classifier),
            "vae_round_trips": heldout_accuracy(classifier, vae=vae),
        }
        vae.to(device)
        timings["classifier_s"] = time.time() - t0
        save_classifier(classifier, tmp / "classifier",
                        {"heldout_accuracy": accuracy, "n_heldout": 2000})  # fmt: skip
        # Latent scale: unit variance of the full data set's latents, as SD's 0.18215.
        probe = encode_dataset(vae, 2048, seed=recipe.seed + 1, device=device)
        scaling = float(1.0 / probe.mean.std())
        vae.register_to_config(scaling_factor=scaling)
        logs = {}
        for i, variant in enumerate(variants):
            t0 = time.time()
            data = encode_dataset(vae, recipe.n_images, seed=recipe.seed + 100 + i,
                                  device=device, **VARIANTS[variant])  # fmt: skip
            unet, log = train_unet(recipe, data, text_encoder, tokenizer, scaling,
                                   seed=recipe.seed, progress=progress,
                                   desc=f"world unet ({variant})", device=device)  # fmt: skip
            logs[variant] = log
            timings[f"unet_{variant}_s"] = time.time() - t0
            pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer).to("cpu")
            if fp16:
                pipe = pipe.to(torch.float16)
            manifest = build_manifest(
                base_model=None,
                method="shapesworld-build",
                config=asdict(recipe),
                seeds=[recipe.seed],
                started=t0,
                extra={
                    "world": {
                        "variant": variant,
                        "held_out_concept": HELD_OUT[variant],
                        "shapes": list(VARIANTS[variant].get("shapes", SHAPES)),
                        "colours": list(VARIANTS[variant].get("colours", COLOURS)),
                        "styles": list(STYLES),
                        "weights_dtype": "float16" if fp16 else "float32",
                    },
                    "sampler": dict(recipe.sampler),
                    "training_log": log,
                },
            )
            save_model(pipe, tmp / variant, manifest)
            if fp16:
                declare_float32(tmp / variant)
            pipe.to(device, torch.float32)  # the VAE and text encoder serve the next variant
        timings["total_s"] = time.time() - started
        info = {
            "recipe": asdict(recipe),
            "variants": list(variants),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "classifier_heldout_accuracy": accuracy,
            "command": command,
            "device": device,
            "threads": torch.get_num_threads(),
        }
        write_json(tmp / "build.json", info)
    return info
