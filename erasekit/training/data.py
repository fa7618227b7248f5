"""Training data encoded once: prompts through the frozen text encoder, images through the
frozen VAE (``Split``), and the seeded generators and epoch orders every step draws from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from erasekit.errors import ErasekitError


@dataclass
class Split:
    """One side of the training data, encoded once: text conditions and (optional) latents."""

    prompts: list[str]
    cond: torch.Tensor | None  # (n, tokens, dim) text-encoder hidden states
    latents: torch.Tensor | None  # (n, c, h, w) scaled VAE latents; None for prompt-only sets
    anchor: torch.Tensor | None = None  # (n, tokens, dim) per-item surrogate conditions
    ids: torch.Tensor | None = None  # (n, tokens) token ids, for methods that encode per step

    def __len__(self) -> int:
        return len(self.prompts)


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(n, tokens) ids padded to the tokenizer's length: what the text encoder reads."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids  # fmt: skip


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """CLIP hidden states of ``prompts`` (what the U-Net cross-attends to). SDXL: both text
    encoders' penultimate hidden states, concatenated, as its pipeline conditions the U-Net,
    plus the pooled embedding as one more row (``models.pack_sdxl_conditions``)."""
    from erasekit.models import is_sdxl, pack_sdxl_conditions

    out = []
    if is_sdxl(pipe):
        for i in range(0, len(prompts), batch_size):
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts[i : i + batch_size], device=pipe.text_encoder.device,
                num_images_per_prompt=1, do_classifier_free_guidance=False)  # fmt: skip
            out.append(pack_sdxl_conditions(embeds, pooled))
        return torch.cat(out)
    for i in range(0, len(prompts), batch_size):
        ids = token_ids(pipe.tokenizer, prompts[i : i + batch_size])
        out.append(pipe.text_encoder(ids.to(pipe.text_encoder.device))[0])
    return torch.cat(out)


@torch.no_grad()
def encode_images(pipe, image_set, batch_size: int = 16) -> torch.Tensor:
    """Scaled VAE latents (posterior means) of an ImageSet at the model's native size."""
    from erasekit.data import load_images

    vae = pipe.vae
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = load_images(image_set, size)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def condition_width(pipe) -> int:
    """The width of the text conditions the U-Net cross-attends to."""
    return int(pipe.unet.config.cross_attention_dim)


def encode_prompt_list(pipe, prompts: list[str]) -> torch.Tensor:
    """Hidden states for every prompt of a list, each distinct prompt encoded once."""
    unique = sorted(set(prompts))
    table = encode_prompts(pipe, unique)
    return table[torch.tensor([unique.index(p) for p in prompts])]


def make_split(pipe, prompts: list[str], image_set=None) -> Split:
    """Encode a prompt list (prompt-only) or an ImageSet (images with their prompts)."""
    if image_set is not None:
        prompts = list(image_set.prompts)
    if not prompts:
        raise ErasekitError("a training set is empty")
    cond = encode_prompt_list(pipe, prompts)
    latents = encode_images(pipe, image_set) if image_set is not None else None
    return Split(prompts=prompts, cond=cond, latents=latents)


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded by (seed, *parts): randomness as a function of the step."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def epoch_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Items ``start .. start+count`` of an endless stream that visits all n items once per
    epoch, in a fresh seeded order each epoch (so every item is used, not the same first few)."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        order = torch.randperm(n, generator=step_generator(seed, 7919, epoch))
        take = min(count - len(out), n - offset)
        out.extend(order[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.long)
