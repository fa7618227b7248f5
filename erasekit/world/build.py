"""Train ShapesWorld: VAE, world classifier, text encoder, and a U-Net per variant.

Recipe (measured on a 2-core CPU; docs/world.md has the reasoning and docs/results/world.md the
bars it meets):
- 32x32 RGB renders -> AutoencoderKL with 4x downsampling -> 8x8x4 latents.
- CLIPTextModel (hidden 32, 2 layers), pre-trained on every concept's captions to name the
  colour, shape and style of a caption from its pooled output and its mean over positions
  (synonyms and indirect phrasings included), then frozen: the U-Net gets conditioning that
  already separates the concepts.
- UNet2DConditionModel, cross-attention in both levels, v-prediction on SD's scaled-linear
  betas rescaled to zero terminal SNR (with SD-1's schedule so much signal survives at t=T on
  8x8 latents that the starting noise, not the prompt, picks the colour), 10% caption dropout,
  EMA. One base U-Net is trained on data without any held-out concept; every variant continues
  from it on its own data, so a never-learned reference's U-Net has seen no image and no caption
  of its concept. The VAE and the text encoder are shared.
- DDIM sampling with trailing timesteps, guidance ``recipe.sampler["guidance"]``.

The build is resumable: every stage writes into a work folder beside the output, U-Net training
checkpoints every ``checkpoint_every`` steps, and the per-step randomness is a function of
(seed, step), so a resumed build gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from erasekit.errors import ErasekitError
from erasekit.world import WORLD_VERSION
from erasekit.world.render import COLOURS, SHAPES, STYLES, caption, render, sample_scene

VARIANTS = {
    "full": {},
    "no-red": {"colours": tuple(c for c in COLOURS if c != "red")},
    "no-circle": {"shapes": tuple(s for s in SHAPES if s != "circle")},
    "no-outlined": {"styles": tuple(s for s in STYLES if s != "outlined")},
}
HELD_OUT = {"full": None, "no-red": "red", "no-circle": "circle", "no-outlined": "outlined"}
# The shared starting point: data without any held-out concept (no red, no circle, no outlined),
# so every variant, never-learned references included, continues from a model that never saw
# what it must not know.
BASE = {
    "colours": tuple(c for c in COLOURS if c != "red"),
    "shapes": tuple(s for s in SHAPES if s != "circle"),
    "styles": tuple(s for s in STYLES if s != "outlined"),
}


@dataclass
class WorldRecipe:
    version: int = WORLD_VERSION
    seed: int = 0
    # The U-Nets' own seed (their data, initialisation and steps); None: ``seed``. Only the U-Net
    # stages depend on it, so replicates of a U-Net recipe can share one VAE, classifier and
    # text encoder (``--reuse-from``).
    unet_seed: int | None = None
    n_images: int = 30000
    vae_steps: int = 1000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    classifier_steps: int = 1500
    text_encoder_steps: int = 400
    text_encoder_batch: int = 128
    text_encoder_lr: float = 1e-3
    # Each never-learned variant's own text encoder, trained on its captions only (its concept's
    # word is never read, so its embedding row keeps its initial values); False: every model
    # shares the encoder trained on all captions. Its U-Net continues from the base U-Net
    # (trained with the shared encoder) under its own encoder.
    variant_text_encoders: bool = False
    base_steps: int = 2400
    unet_steps: int = 900
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_channels: tuple[int, int] = (32, 64)
    warmup: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    checkpoint_every: int = 250
    heldout_n: int = 2000  # fresh renders / captions for the classifier's and encoder's checks
    sampler: dict = field(
        default_factory=lambda: {"steps": 25, "guidance": 3.0, "height": 32, "width": 32}
    )

    def scheduler(self):
        return build_scheduler(self.beta_schedule, self.beta_start, self.beta_end,
                               self.prediction_type, self.zero_terminal_snr)  # fmt: skip


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


def variant_values(variant: str) -> dict[str, tuple[str, ...]]:
    """The concept values a variant's data covers, per dimension."""
    spec = VARIANTS[variant]
    return {
        "colour": spec.get("colours", COLOURS),
        "shape": spec.get("shapes", SHAPES),
        "style": spec.get("styles", STYLES),
    }


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


# The recipe fields the shared stages (VAE, classifier, text encoder) depend on: a build may take
# those stages from an earlier build whose recipe agrees on every one of them.
SHARED_STAGE_FIELDS = ("seed", "vae_steps", "vae_batch", "vae_lr", "classifier_steps",
                       "text_encoder_steps", "text_encoder_batch", "text_encoder_lr", "warmup",
                       "heldout_n")  # fmt: skip
SHARED_STAGES = ("vae", "classifier", "text_encoder")
TEXT_ENCODER_NOTE = {True: "shared", False: "its own (trained on its captions only)"}


def _seed_shared_stages(work: Path, source: Path, recipe: WorldRecipe) -> dict:
    """Copy an earlier build's VAE, classifier and text encoder into ``work`` as finished
    stages, so that only the U-Nets are trained (the detector and the latent space stay those of
    ``source``). Weights stored in fp16 are loaded back as fp32. Returns what was reused."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from erasekit.outputs import write_json

    info_file = source / "build.json"
    if not info_file.is_file():
        raise ErasekitError(f"--reuse-from {source}: not a world build (no build.json)")
    built = json.loads(info_file.read_text())
    ours = _recipe_record(recipe)
    differ = [k for k in SHARED_STAGE_FIELDS if built.get("recipe", {}).get(k) != ours[k]]
    if differ:
        raise ErasekitError(
            f"--reuse-from {source}: its recipe differs in {', '.join(differ)}, which its VAE, "
            "classifier or text encoder depend on"
        )
    try:
        names = built["variants"]
        if built.get("recipe", {}).get("variant_text_encoders"):
            names = [v for v in names if HELD_OUT.get(v) is None]  # the shared encoder's models
        model = source / names[0]
        vae = AutoencoderKL.from_pretrained(str(model / "vae"), torch_dtype=torch.float32)
        encoder = CLIPTextModel.from_pretrained(str(model / "text_encoder"),
                                                torch_dtype=torch.float32)  # fmt: skip
        shutil.copytree(source / "classifier", work / "classifier")
    except (KeyError, IndexError, OSError, ValueError) as e:
        raise ErasekitError(f"--reuse-from {source}: an incomplete world build ({e})") from None
    vae.save_pretrained(str(work / "vae"))
    config_file = work / "classifier" / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("world_version") != WORLD_VERSION:  # the detector of this world now
        config["trained_for_world_version"] = config.get("world_version", 1)
        config["world_version"] = WORLD_VERSION
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    encoder.save_pretrained(str(work / "text_encoder"))
    write_json(work / "text_encoder" / "training.json", built.get("text_encoder", {}))
    for name in SHARED_STAGES:
        (work / name / ".done").write_text("")
    timings = built.get("timings_s", {})
    return {"from": str(source), "stages": list(SHARED_STAGES),
            "source_timings_s": {k: timings[f"{k}_s"] for k in SHARED_STAGES
                                 if f"{k}_s" in timings}}  # fmt: skip


def work_dir(out_dir: str | Path) -> Path:
    """Where a build keeps its finished stages and checkpoints until the output is complete."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.build"


def _recipe_record(recipe: WorldRecipe) -> dict:
    return json.loads(json.dumps(asdict(recipe)))  # tuples -> lists, as stored


class _Stages:
    """Finished stages of a build in its work folder, with their cumulative wall times."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.timings_file = work / "timings.json"
        self.timings = (
            json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}
        )

    def done(self, name: str) -> bool:
        return (self.work / name / ".done").is_file()

    def finish(self, name: str, seconds: float) -> None:
        (self.work / name / ".done").write_text("")
        self.timings[f"{name}_s"] = round(seconds, 1)
        tmp = self.timings_file.with_suffix(".partial")
        tmp.write_text(json.dumps(self.timings, indent=2) + "\n")
        os.replace(tmp, self.timings_file)


def build_world(out_dir: str | Path, *args: Any, **kwargs: Any) -> dict:
    """Train everything into ``out_dir``: stages and checkpoints go to ``work_dir(out_dir)``
    (``resume=True`` continues from them), the output is assembled aside and renamed when
    complete, then the work folder is removed. The output's lock is held throughout (a second
    build into the same folder stops at once). Arguments: see ``_build_world``."""
    from erasekit.outputs import output_lock

    with output_lock(out_dir):
        return _build_world(out_dir, *args, **kwargs)


def _build_world(
    out_dir: str | Path,
    recipe: WorldRecipe | None = None,
    variants: tuple[str, ...] = tuple(VARIANTS),
    progress: bool = True,
    fp16: bool = True,
    command: str | None = None,
    device: str = "cpu",
    resume: bool = False,
    reuse_from: str | Path | None = None,
) -> dict:
    """The build's stages (see ``build_world``). With ``reuse_from`` (an earlier build), its
    VAE, classifier and text encoder are taken as they are and only the U-Nets are trained."""
    from erasekit.outputs import atomic_output_dir, write_json

    recipe = recipe or WorldRecipe()
    work, record = _open_work(work_dir(out_dir), recipe, variants, resume, reuse_from)
    started = time.time()
    build = _Build(recipe, work, _Stages(work), progress, device)
    build.shared_stages()
    unet_seed = recipe.seed if recipe.unet_seed is None else recipe.unet_seed
    build.unet_stage("unet-base", BASE, unet_seed + 100, recipe.base_steps)
    for variant in variants:
        index = list(VARIANTS).index(variant)
        build.unet_stage(f"unet-{variant}", VARIANTS[variant], unet_seed + 101 + index,
                         recipe.unet_steps, init=work / "unet-base",
                         text_encoder=build.load_encoder(build.encoder_stage(variant)))  # fmt: skip
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        shutil.copytree(work / "classifier", tmp / "classifier",
                        ignore=shutil.ignore_patterns(".done"))  # fmt: skip
        build.encoder = build.encoder.cpu()
        for variant in variants:
            build.save_variant(variant, tmp / variant, fp16)
        info = build.info(variants, record, command, started)
        write_json(tmp / "build.json", info)
    shutil.rmtree(work, ignore_errors=True)
    return info


def _open_work(work: Path, recipe: WorldRecipe, variants, resume: bool, reuse_from):
    """The build's work folder and its recipe record: a new one (seeded with an earlier
    build's shared stages with ``reuse_from``), or the unfinished one ``resume`` continues."""
    from erasekit.outputs import write_json

    record = {"recipe": _recipe_record(recipe), "variants": list(variants)}
    if reuse_from is not None:
        reuse_from = Path(reuse_from).resolve()
        record["reuse_from"] = str(reuse_from)
    if work.exists():
        if not resume:
            raise ErasekitError(
                f"an unfinished world build is in {work}: pass --resume to continue it, or "
                "remove that folder to start over"
            )
        stored = json.loads((work / "recipe.json").read_text())
        if {k: v for k, v in stored.items() if k != "reused"} != record:
            raise ErasekitError(
                f"the unfinished build in {work} used another recipe or variant list; remove "
                "that folder to start over"
            )
        return work, stored
    work.mkdir(parents=True)
    if reuse_from is not None:
        try:
            record["reused"] = _seed_shared_stages(work, reuse_from, recipe)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    write_json(work / "recipe.json", record)
    return work, record


class _Build:
    """One world build's stages in its work folder: each trained once (resumable), then
    loaded for the stages after it."""

    def __init__(self, recipe: WorldRecipe, work: Path, stages, progress: bool, device: str):
        from erasekit.tokenizer import build_clip_tokenizer

        self.recipe, self.work, self.stages = recipe, work, stages
        self.progress, self.device = progress, device
        self.tokenizer = build_clip_tokenizer()

    def _stage(self, name: str, train) -> None:
        """Run ``train()`` (which writes the stage's folder) unless the stage is done."""
        if not self.stages.done(name):
            t0 = time.time()
            train()
            self.stages.finish(name, time.time() - t0)

    def shared_stages(self) -> None:
        """The VAE, the classifier, the latent scale and the text encoder every U-Net shares."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        from erasekit.world.classifier import load_classifier

        recipe, work, device = self.recipe, self.work, self.device
        self._stage("vae", lambda: train_vae(recipe, self.progress, device).save_pretrained(
            str(work / "vae")))  # fmt: skip
        vae = AutoencoderKL.from_pretrained(str(work / "vae")).eval().requires_grad_(False)
        self.vae = vae.to(device)
        self._stage("classifier", self._train_classifier)
        self.classifier_info = json.loads((work / "classifier" / "config.json").read_text())
        load_classifier(work / "classifier")  # fail early on a damaged stage
        # Latent scale: unit variance of the full data set's latents, as SD's 0.18215.
        probe = encode_dataset(self.vae, min(2048, recipe.n_images), seed=recipe.seed + 1,
                               device=device)  # fmt: skip
        self.scaling = float(1.0 / probe.mean.std())
        self.vae.register_to_config(scaling_factor=self.scaling)
        self._stage("text_encoder", lambda: self._train_encoder("full", "text_encoder"))
        self.text_info = json.loads((work / "text_encoder" / "training.json").read_text())
        encoder = CLIPTextModel.from_pretrained(str(work / "text_encoder"))
        self.encoder = encoder.eval().requires_grad_(False).to(device)

    def _train_classifier(self) -> None:
        from erasekit.world.classifier import (
            abstention_rates,
            heldout_accuracy,
            save_classifier,
            train_classifier,
        )

        recipe, vae = self.recipe, self.vae
        classifier = train_classifier(vae.cpu(), recipe.classifier_steps, seed=recipe.seed,
                                      progress=self.progress)  # fmt: skip
        n = recipe.heldout_n
        accuracy = {
            "renders": heldout_accuracy(classifier, n),
            "vae_round_trips": heldout_accuracy(classifier, n, vae=vae),
        }
        abstention = {
            "renders": abstention_rates(classifier, n // 2),
            "vae_round_trips": abstention_rates(classifier, n // 2, vae=vae),
        }
        save_classifier(classifier, self.work / "classifier",
                        {"heldout_accuracy": accuracy, "n_heldout": n,
                         "off_world_false_positives": abstention})  # fmt: skip
        vae.to(self.device)

    def _train_encoder(self, variant: str, name: str) -> None:
        from erasekit.outputs import write_json

        encoder, info = train_text_encoder(self.recipe, self.tokenizer, variant, self.progress,
                                           self.device)  # fmt: skip
        encoder.save_pretrained(str(self.work / name))
        write_json(self.work / name / "training.json", info)

    def encoder_stage(self, variant: str) -> str:
        """The text encoder's stage ``variant``'s U-Net is trained and shipped with."""
        if not self.recipe.variant_text_encoders or HELD_OUT[variant] is None:
            return "text_encoder"
        name = f"text_encoder-{variant}"
        self._stage(name, lambda: self._train_encoder(variant, name))
        return name

    def load_encoder(self, name: str):
        from transformers import CLIPTextModel

        if name == "text_encoder":
            return self.encoder
        own = CLIPTextModel.from_pretrained(str(self.work / name))
        return own.eval().requires_grad_(False).to(self.encoder.device)

    def unet_stage(self, name: str, concepts: dict, data_seed: int, steps: int, init=None,
                   text_encoder=None) -> None:  # fmt: skip
        """A U-Net trained on the world's images of ``concepts`` (from ``init``'s weights)."""
        if self.stages.done(name):
            return
        from safetensors.torch import save_file

        from erasekit.outputs import write_json

        work = self.work
        data = encode_dataset(self.vae, self.recipe.n_images, seed=data_seed, device=self.device,
                              **concepts)  # fmt: skip
        unet, ema, log, seconds = train_unet(
            self.recipe, data, text_encoder or self.encoder, self.tokenizer, self.scaling,
            seed=data_seed, progress=self.progress, desc=f"world unet ({name})",
            device=self.device, steps=steps, init_dir=init,
            checkpoint_dir=work / name / "checkpoints",
        )  # fmt: skip
        (work / name).mkdir(parents=True, exist_ok=True)
        save_file(unet.state_dict(), str(work / name / "unet.safetensors"))
        save_file(ema.state_dict(), str(work / name / "ema.safetensors"))
        write_json(work / name / "training.json", {"training_log": log})
        self.stages.finish(name, seconds)
        shutil.rmtree(work / name / "checkpoints", ignore_errors=True)

    def save_variant(self, variant: str, folder: Path, fp16: bool) -> None:
        """One world model: its U-Net's EMA weights with the shared VAE and its encoder."""
        from safetensors.torch import load_file

        from erasekit.models import build_manifest, save_model

        recipe, work = self.recipe, self.work
        base_log = json.loads((work / "unet-base" / "training.json").read_text())
        unet = build_unet(recipe.seed, recipe.unet_channels)
        unet.load_state_dict(load_file(str(work / f"unet-{variant}" / "ema.safetensors")))
        log = json.loads((work / f"unet-{variant}" / "training.json").read_text())
        encoder_name = self.encoder_stage(variant)
        own_encoder = self.load_encoder(encoder_name).cpu()
        pipe = assemble_pipeline(unet, self.vae.cpu(), own_encoder, self.tokenizer, recipe)
        if fp16:
            pipe = pipe.to(torch.float16)
        values = variant_values(variant)
        world = {"version": WORLD_VERSION, "variant": variant,
                 "held_out_concept": HELD_OUT[variant], "shapes": list(values["shape"]),
                 "colours": list(values["colour"]), "styles": list(values["style"]),
                 "weights_dtype": "float16" if fp16 else "float32",
                 "text_encoder": TEXT_ENCODER_NOTE[encoder_name == "text_encoder"]}  # fmt: skip
        manifest = build_manifest(
            base_model=None, method="shapesworld-build", config=asdict(recipe),
            seeds=[recipe.seed],
            extra={"world": world, "sampler": dict(recipe.sampler),
                   "training_log": {"base": base_log["training_log"],
                                    variant: log["training_log"]}},
        )  # fmt: skip
        save_model(pipe, folder, manifest)
        if fp16:
            declare_float32(folder)
        self.vae.float()
        self.encoder.float()

    def info(self, variants, record: dict, command: str | None, started: float) -> dict:
        """build.json: the recipe, stage timings, the classifier's and encoders' figures."""
        timings = dict(self.stages.timings)  # this build's stages only
        timings["total_s"] = round(sum(timings.values()) + 0.0, 1)
        info = {
            "world_version": WORLD_VERSION,
            "recipe": _recipe_record(self.recipe),
            "variants": list(variants),
            "timings_s": timings,
            "timings_note": "training wall seconds per stage, summed over resumed runs; "
            f"this run's assembly took {time.time() - started:.0f} s",
            "classifier_heldout_accuracy": self.classifier_info.get("heldout_accuracy"),
            "classifier": {
                k: v for k, v in self.classifier_info.items() if k != "heldout_accuracy"
            },  # fmt: skip
            "text_encoder": self.text_info,
            "command": command,
            "device": self.device,
            "threads": torch.get_num_threads(),
        }
        own = {v: self.encoder_stage(v) for v in variants
               if self.encoder_stage(v) != "text_encoder"}  # fmt: skip
        if own:  # the never-learned models' own encoders
            info["variant_text_encoders"] = {
                v: json.loads((self.work / name / "training.json").read_text())
                for v, name in own.items()
            }
        if "reused" in record:  # stages taken from an earlier build, with what they cost there
            info["reused_stages"] = record["reused"]
        return info
