"""The world model's parts, built and trained: the VAE, the text encoder and the U-Net
(with its resumable checkpoints), the latent data set, and the assembled pipeline."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from erasekit.errors import ErasekitError
from erasekit.world.recipe import VARIANTS, WorldRecipe, variant_values
from erasekit.world.render import caption, render, sample_scene


def build_text_encoder(seed: int, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.tokenizer import VOCAB_SIZE

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
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


def build_unet(seed: int, channels: tuple[int, int] = (32, 64)):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_scheduler(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
):
    """DDIM with SD-1's settings by default; ShapesWorld v2 passes its recipe's schedule
    (v-prediction with zero terminal SNR and trailing timesteps, as SD-2.1-style models)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # ignored by trailing spacing; diffusers pipelines expect 1
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
        timestep_spacing="trailing" if zero_terminal_snr else "leading",
    )


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _step_seed(seed: int, stage: str, step: int) -> int:
    """Per-step randomness as a function of (seed, stage, step): resuming needs no RNG state."""
    salt = {"vae": 1, "text": 2, "unet": 3}[stage]
    return (seed * 1_000_003 + salt) * 10_000_019 + step


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


def _tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def train_text_encoder(
    recipe: WorldRecipe, tokenizer, variant: str = "full", progress: bool = True,
    device: str = "cpu",
) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """Pre-train the text encoder to name a caption's colour, shape and style (linear heads on
    the pooled output and on the mean over positions) over the variant's captions; returns it
    frozen, with its held-out caption accuracy. No weight decay: rows of the vocabulary no
    caption uses keep their initial values."""
    from tqdm.auto import tqdm

    values = variant_values(variant)
    spec = VARIANTS[variant]
    encoder = build_text_encoder(recipe.seed).requires_grad_(True).train().to(device)
    hidden = encoder.config.hidden_size
    heads = torch.nn.ModuleDict(
        {d: torch.nn.Linear(hidden, len(v)) for d, v in values.items() if len(v) > 1}
    ).to(device)
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.text_encoder_lr, weight_decay=0.0)
    steps = recipe.text_encoder_steps

    def batch(seed: int, n: int):
        rng = random.Random(seed)
        scenes = [sample_scene(rng, **spec) for _ in range(n)]
        captions = [caption(s, rng) for s in scenes]
        labels = {d: torch.tensor([values[d].index(s.labels[d]) for s in scenes]) for d in heads}
        return _tokens(tokenizer, captions).to(device), labels

    for step in tqdm(range(steps), desc=f"world text encoder ({variant})", disable=not progress):
        for g in opt.param_groups:  # linear warm-up, cosine decay
            g["lr"] = recipe.text_encoder_lr * _lr_factor(step, steps, recipe.warmup)
        ids, labels = batch(_step_seed(recipe.seed, "text", step), recipe.text_encoder_batch)
        out = encoder(ids)
        # The pooled (EOS) output and the mean over all 77 positions: the U-Net's
        # cross-attention starts out near-uniform over the positions, so the mean must already
        # carry the caption's concepts for the conditioning to be learned quickly.
        features = (out.pooler_output, out.last_hidden_state.mean(dim=1))
        loss = sum(
            F.cross_entropy(heads[d](f), labels[d].to(device)) for d in heads for f in features
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        ids, labels = batch(recipe.seed + 987_654, recipe.heldout_n)
        out = encoder(ids)
        features = {"pooled": out.pooler_output, "mean": out.last_hidden_state.mean(dim=1)}
        accuracy = {
            f"{d}_{name}": round(
                float((heads[d](f).argmax(-1).cpu() == labels[d]).float().mean()), 4
            )
            for d in heads
            for name, f in features.items()
        }
    return encoder, {"heldout_caption_accuracy": accuracy, "n_heldout": recipe.heldout_n}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + float(np.cos(np.pi * t)))


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


CHECKPOINT_FILES = ("unet.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")


def _save_checkpoint(folder: Path, step: int, unet, ema, opt, state: dict) -> None:
    """Write checkpoint ``step`` aside and rename it into place; then drop older ones."""
    from safetensors.torch import save_file

    final = folder / f"step-{step:07d}"
    tmp = folder / f".step-{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(unet.state_dict(), str(tmp / "unet.safetensors"))
    save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
    flat = {
        f"{i}.{k}": v.detach().cpu().reshape(v.shape)
        for i, s in opt.state_dict()["state"].items()
        for k, v in s.items()
    }
    save_file(flat, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}) + "\n")
    os.replace(tmp, final)
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (half-written ones are hidden ``.partial`` folders)."""
    done = [p for p in folder.glob("step-*") if all((p / f).is_file() for f in CHECKPOINT_FILES)]
    return max(done, key=lambda p: p.name) if done else None


def _load_checkpoint(path: Path, unet, ema, opt) -> dict:
    from safetensors.torch import load_file

    device = next(unet.parameters()).device
    unet.load_state_dict(load_file(str(path / "unet.safetensors"), device=str(device)))
    ema.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(device)))
    flat = load_file(str(path / "optimizer.safetensors"), device=str(device))
    state: dict[int, dict] = {}
    for key, value in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value.cpu() if name == "step" else value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return json.loads((path / "state.json").read_text())


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
    checkpoint_dir: str | Path | None = None,
    init_dir: str | Path | None = None,
    steps: int | None = None,
    callback=None,
    callback_every: int = 0,
):
    """Diffusion training (the recipe's prediction type and schedule), caption dropout and EMA.

    Starts from ``init_dir`` (a finished stage's ``unet``/``ema`` safetensors) when given.
    With ``checkpoint_dir``, resumes from its newest complete checkpoint and writes one every
    ``recipe.checkpoint_every`` steps. ``callback(step, ema_unet)`` runs every
    ``callback_every`` steps (e.g. to sample and measure). Returns (U-Net, EMA U-Net, loss log,
    training seconds).
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    unet = build_unet(seed, recipe.unet_channels).to(device)
    ema = build_unet(seed, recipe.unet_channels).requires_grad_(False).to(device)
    ema.load_state_dict(unet.state_dict())
    if init_dir is not None:
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(str(Path(init_dir) / "unet.safetensors")))
        ema.load_state_dict(load_file(str(Path(init_dir) / "ema.safetensors")))
    total = steps or recipe.unet_steps
    if recipe.zero_terminal_snr and recipe.prediction_type != "v_prediction":
        raise ErasekitError("zero_terminal_snr needs prediction_type v_prediction (ε at SNR 0)")
    noise_sched = DDPMScheduler.from_config(recipe.scheduler().config)
    alphas = noise_sched.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=1e-2)
    start, log, elapsed = 0, [], 0.0
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder is not None and (latest := latest_checkpoint(folder)) is not None:
        state = _load_checkpoint(latest, unet, ema, opt)
        start, log, elapsed = state["step"], state["log"], state["elapsed_s"]
    cond_cache: dict[str, torch.Tensor] = {}  # the text encoder is frozen: encode each caption once
    n = len(data.scenes)
    t0 = time.time()
    bar = tqdm(range(start, total), desc=desc, disable=not progress, initial=start, total=total)
    for step in bar:
        gen = torch.Generator().manual_seed(_step_seed(seed, "unet", step))
        rng = random.Random(_step_seed(seed, "unet", step))
        for g in opt.param_groups:
            g["lr"] = recipe.unet_lr * _lr_factor(step, total, recipe.warmup)
        idx = torch.randint(0, n, (recipe.unet_batch,), generator=gen)
        eps0 = torch.randn(data.mean[idx].shape, generator=gen)
        latents = (data.mean[idx] + data.std[idx] * eps0) * scaling_factor
        captions = [
            "" if rng.random() < recipe.caption_dropout else caption(data.scenes[i], rng)
            for i in idx.tolist()
        ]
        for text in sorted({c for c in captions if c not in cond_cache}):
            with torch.no_grad():  # one at a time: the result cannot depend on the batch
                cond_cache[text] = text_encoder(_tokens(tokenizer, [text]).to(device))[0][0]
        cond = torch.stack([cond_cache[c] for c in captions])
        t = torch.randint(0, 1000, (recipe.unet_batch,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        noisy, noise, t = noisy.to(device), noise.to(device), t.to(device)
        pred = unet(noisy, t, cond).sample
        if recipe.prediction_type == "v_prediction":
            # v-loss = ε-loss + x0-loss: the high-noise steps, where the prompt decides the
            # image, keep their weight (min-SNR's v form would zero them at SNR 0)
            target = noise_sched.get_velocity(latents.to(device), noise, t)
            weight = torch.ones_like(snr[t])
        else:
            target = noise
            weight = torch.clamp(snr[t], max=recipe.min_snr_gamma) / snr[t]
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log.append({"step": step, "loss": round(loss.item(), 5)})
        done = step + 1
        if folder is not None and done % recipe.checkpoint_every == 0 and done < total:
            state = {"log": log, "elapsed_s": elapsed + time.time() - t0}
            _save_checkpoint(folder, done, unet, ema, opt, state)
        if callback is not None and callback_every and done % callback_every == 0:
            callback(done, ema)
    return unet, ema.eval(), log, elapsed + time.time() - t0


def assemble_pipeline(unet, vae, text_encoder, tokenizer, recipe: WorldRecipe | None = None):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=(recipe or WorldRecipe()).scheduler(),
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
