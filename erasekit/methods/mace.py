"""MACE: mass concept erasure by closed-form refinement, one attention LoRA per concept and a
closed-form fusion of the LoRAs.

1. **Closed-form refinement (CFR)** of every cross-attention ``to_k`` / ``to_v``: in each forget
   prompt of each concept, the tokens around the concept word (the words after it, end-of-text
   and padding; the word's own tokens left out) are mapped to the same positions of the prompt
   with the word replaced by its guide, with the retained texts' rows kept at their original
   projections (``preserve_scale``) and λ (``lam``) pulling towards the current weights.
2. **One LoRA per concept** (rank ``rank`` on ``attn2.to_k``, on top of the CFR weights) trained
   ``steps_per_concept`` AdamW steps to shrink the attention the concept's tokens (the word's
   tokens and every end-of-text / padding position) receive inside the concept's pixels:
   the loss is the sum over every cross-attention call of the Frobenius norm of the softmax
   attention restricted to (masked pixels) x (concept positions). No denoising loss. The
   masks (``mask``): ``shape`` = the ShapesWorld renderer's exact shape pixels (standing in for
   Grounded-SAM), ``image`` = every pixel (MACE's own fallback for concepts it does not
   segment). Images: the world renderer's (``image_source: world``) or the original model's.
3. **Closed-form fusion**: one least-squares solve per matrix over all concepts at once: every
   token row of concept i's prompts maps to its own LoRA-fused weights' output (no mutual
   interference), the retained rows to the original weights' (``fuse_preserve_scale``), λ
   towards the CFR weights.

The attention loss does not depend on ``to_v``, so a ``to_v`` LoRA (the code creates one) never
moves; it is left out. Where this differs from the public code (Shilin-LU/MACE): the preserved
prior is the concept's retain prompts (the code caches MS-COCO captions); stage 1's prior is
weighted by ``preserve_scale`` once (the code applies it twice); training images are in the
VAE's [-1, 1] range (the code normalises with ImageNet statistics).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from erasekit.config import one_per, split_list
from erasekit.errors import ErasekitError
from erasekit.methods import Method
from erasekit.methods.uce import (
    PROJECTIONS,
    aligned_token_pairs,
    least_squares_edit,
    projection_parameters,
    token_embeddings,
)
from erasekit.training import TrainConfig, TrainContext, step_generator

MASKS = ("shape", "image")
RIDGE = 1e-6  # added to λ: the solves stay defined when the rows do not span the text space
TIMESTEPS = ("importance", "uniform")
# prompts for a word no forget prompt holds (a concept named "nudity" whose prompts say "nude")
TEMPLATES = ("a photo of the {}", "an image of the {}", "a picture of the {}",
             "a painting of the {}", "{}")  # fmt: skip


@dataclass
class MACEConfig(TrainConfig):
    steps: int = 0  # the shared loop runs no step: MACE's stages run in on_train_start
    lr: float = 1e-5  # the LoRAs' AdamW learning rate
    erase: str = ""  # comma-separated words to erase; "" = the concept's name(s)
    guide: str = ""  # the mapping concept of each erased one: one text, or one per concept
    lam: float = 0.0  # λ of the refinement and the fusion (0 for celebrities, art, explicit)
    preserve_scale: float = 1e-4  # the retained rows' weight in both solves
    max_preserve: int = 256
    steps_per_concept: int = 50
    rank: int = 1
    mask: str = "shape"  # shape: the world renderer's shape pixels | image: every pixel
    timesteps: str = "importance"  # importance: mass on t≈200-400 (MACE) | uniform
    images_per_concept: int = 8
    cfr: bool = True  # stage 1 on (off: the LoRAs start from the original weights)

    def validate(self) -> None:
        super().validate()
        if self.steps != 0:
            raise ErasekitError("mace runs its own stages: steps must be 0 (steps_per_concept)")
        if self.mask not in MASKS or self.timesteps not in TIMESTEPS:
            raise ErasekitError(f"mask must be one of {', '.join(MASKS)} and timesteps one of"
                                f" {', '.join(TIMESTEPS)}")  # fmt: skip
        if self.lam < 0 or self.preserve_scale < 0:
            raise ErasekitError("lam and preserve_scale must be non-negative")
        if self.lam == 0 and self.preserve_scale == 0:
            raise ErasekitError("lam or preserve_scale must be positive (the solves need one)")
        if min(self.rank, self.images_per_concept) < 1 or self.steps_per_concept < 0:
            raise ErasekitError("rank and images_per_concept >= 1, steps_per_concept >= 0")


def word_prompts(word: str, pool: list[str]) -> list[str]:
    """The prompts of ``pool`` that hold ``word``, else MACE's templates filled with it."""
    found = [p for p in pool if re.search(rf"\b{re.escape(word)}\b", p, re.IGNORECASE)]
    return found or [t.format(word) for t in TEMPLATES]


def importance_timesteps(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """MACE's timestep sampling: p(t) ∝ σ(0.05(t − 200)) − σ(0.05(t − 400))."""
    t = torch.arange(n, dtype=torch.float64)
    p = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
    return torch.multinomial(p.clamp_min(0), count, replacement=True, generator=gen)


def world_images_and_masks(prompts: list[str], n: int, seed: int):
    """(images, masks): n renderer scenes of the prompts (cycled) and each shape's pixels."""
    from dataclasses import replace

    from erasekit.world.render import prompt_scene, render

    rng = random.Random(seed)
    images, masks = [], []
    for i in range(n):
        scene = prompt_scene(prompts[i % len(prompts)], rng)
        images.append(np.asarray(render(scene), dtype=np.float32) / 127.5 - 1)
        ink = replace(scene, rgb=(255, 255, 255), background=(0, 0, 0))
        masks.append(np.asarray(render(ink).convert("L"), dtype=np.float32) > 127)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(masks))


class AttentionProbe:
    """Cross-attention processor that adds the concept LoRA to ``to_k`` and records MACE's
    loss: the Frobenius norm of the attention of masked pixels to the concept positions."""

    def __init__(self, lora: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.lora, self.state = lora, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):  # fmt: skip
        context = encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.to_k(context) + context @ self.lora["A"].T @ self.lora["B"].T
        k, v = attn.head_to_batch_dim(k), attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # (batch x heads, pixels, tokens)
        s = self.state
        if s.get("mask") is not None:
            heads, side = attn.heads, int(round(probs.shape[1] ** 0.5))
            mask = torch.nn.functional.interpolate(s["mask"], size=(side, side), mode="nearest")
            mask = mask.flatten(1).repeat_interleave(heads, dim=0) > 0.5  # (b x heads, pixels)
            picked = probs * mask[..., None] * s["positions"].repeat_interleave(heads, 0)[:, None]
            # a mask with no pixel at this resolution (an outline on a coarse layer) adds
            # nothing; the clamp keeps the norm's gradient finite at zero
            s["loss"] = s["loss"] + picked.square().sum().clamp_min(1e-12).sqrt()
        h = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](h))


class MACE(Method):
    name = "mace"
    summary = "closed-form refinement, one attention LoRA per concept, closed-form fusion"
    source = "Lu et al., MACE: Mass Concept Erasure in Diffusion Models, CVPR 2024"
    Config = MACEConfig
    closed_form = True  # no step of the shared loop: its stages run in on_train_start

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        if concept.scale == "world":
            return cls.world_defaults(concept)
        return {"mask": "image", "guide": "art" if concept.kind == "style" else ""}

    def parts(self) -> list:
        return list(self.concept.parts) or [self.concept]

    def prepare_data(self, pipe):
        cfg: MACEConfig = self.config
        parts = self.parts()
        words = split_list(cfg.erase) or [p.name for p in parts]
        pools = {p.name: list(p.forget.prompts) for p in parts}
        guides = one_per(split_list(cfg.guide) or [""], words, owner="mace",
                         what="guide texts", per="erased concepts")  # fmt: skip
        if cfg.mask == "shape" and any(p.scale != "world" for p in parts):
            raise ErasekitError("mace mask=shape needs ShapesWorld concepts (the renderer's"
                                " masks); use mask=image")  # fmt: skip
        preserve = list(self.concept.retain.prompts)[: cfg.max_preserve]
        self.rows = {"preserve": token_embeddings(pipe, preserve, padded=True), "concepts": []}
        for word, guide in zip(words, guides, strict=True):
            forget = word_prompts(word, pools.get(word, list(self.concept.forget.prompts)))
            around = aligned_token_pairs(pipe, forget, [word], [guide], padded=True,
                                         skip_word=True)  # fmt: skip
            keys = token_embeddings(pipe, forget, padded=True)
            self.rows["concepts"].append({"word": word, "prompts": forget, "around": around,
                                          "keys": keys})  # fmt: skip
        self.data_info = {"erase": words, "guide": guides, "preserve": preserve,
                          "mask": cfg.mask}  # fmt: skip
        return {}

    def trainable_parameters(self, unet):
        return projection_parameters(unet)

    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        """The three stages, on every process alike (deterministic, seeded)."""
        cfg: MACEConfig = self.config
        started = time.perf_counter()
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        modules = {n: m for n, m in unet.named_modules() if n.endswith(PROJECTIONS)}
        if not modules:
            raise ErasekitError("mace: the U-Net has no cross-attention to_k/to_v projections")
        original = {n: m.weight.detach().cpu().double().clone() for n, m in modules.items()}
        prior = self.rows["preserve"]
        if cfg.cfr:
            for name, m in modules.items():
                w = original[name]
                terms = [(w, *c["around"], 1.0) for c in self.rows["concepts"]]
                terms.append((w, prior, prior, cfg.preserve_scale))
                m.weight.copy_(least_squares_edit(w, cfg.lam + RIDGE, terms).to(m.weight))
        cfr = {n: m.weight.detach().cpu().double().clone() for n, m in modules.items()}
        cfr_seconds = time.perf_counter() - started
        deltas, losses = [], []
        for i, c in enumerate(self.rows["concepts"]):
            delta, curve = self.train_lora(ctx, unet, c, i)
            deltas.append(delta)
            losses.append(curve)
        fuse_start = time.perf_counter()
        for name, m in modules.items():
            terms = [(cfr[name] + d.get(name, 0), c["keys"], c["keys"], 1.0)
                     for c, d in zip(self.rows["concepts"], deltas, strict=True)]  # fmt: skip
            terms.append((original[name], prior, prior, cfg.preserve_scale))
            m.weight.copy_(least_squares_edit(cfr[name], cfg.lam + RIDGE, terms).to(m.weight))
        self.edit_info = {
            "projections_edited": len(modules), "n_concepts": len(deltas),
            "cfr_seconds": round(cfr_seconds, 3),
            "fusion_seconds": round(time.perf_counter() - fuse_start, 3),
            "seconds": round(time.perf_counter() - started, 3),
            "lora_loss": [{"concept": c["word"], "first": curve[0] if curve else None,
                           "last": curve[-1] if curve else None}
                          for c, curve in zip(self.rows["concepts"], losses, strict=True)],
        }  # fmt: skip

    def concept_batch(self, ctx: TrainContext, pipe, concept: dict, index: int):
        """(latents, masks, prompts, concept positions) of one concept's training images."""
        from erasekit.training import token_ids

        cfg: MACEConfig = self.config
        n = cfg.images_per_concept
        prompts = [concept["prompts"][j % len(concept["prompts"])] for j in range(n)]
        if cfg.image_source == "world" or cfg.mask == "shape":
            images, masks = world_images_and_masks(prompts, n, cfg.seed + index)
        else:
            from erasekit.concepts import prompt_set_from_list
            from erasekit.data import load_images, render_image_set

            made = render_image_set(pipe, self.model_path, prompt_set_from_list(prompts),
                                    n_per_prompt=1, seed=cfg.seed + index,
                                    cache_dir=self.cache_dir, progress=False)  # fmt: skip
            images = load_images(made, pipe.unet.config.sample_size * pipe.vae_scale_factor)
            masks = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool)
        if cfg.mask == "image":
            masks = torch.ones_like(masks)
        vae = pipe.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
        latents = latents * vae.config.scaling_factor
        ids = token_ids(pipe.tokenizer, prompts)
        word = set(pipe.tokenizer(concept["word"], add_special_tokens=False).input_ids)
        positions = torch.tensor([[t in word or t == pipe.tokenizer.eos_token_id for t in row]
                                  for row in ids.tolist()], dtype=torch.float32)  # fmt: skip
        positions[:, 0] = 0  # never the start token
        masks = masks.float()[:, None].to(ctx.device)
        return latents.to(ctx.device), masks, prompts, positions.to(ctx.device)

    def train_lora(self, ctx: TrainContext, unet, concept: dict, index: int):
        """Stage 2 for one concept: {to_k name: ΔW} (float64) and the loss before each step."""
        from erasekit.training import encode_prompts

        cfg: MACEConfig = self.config
        pipe = ctx.pipe
        latents, masks, prompts, positions = self.concept_batch(ctx, pipe, concept, index)
        cond = encode_prompts(pipe, prompts).to(ctx.device)
        gen = step_generator(cfg.seed, 4099, index)
        keys = {n: m for n, m in unet.attn_processors.items() if ".attn2." in n}
        saved = dict(unet.attn_processors)
        state: dict[str, Any] = {}
        loras, params = {}, []
        for name in keys:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            d, out = attn.to_k.in_features, attn.to_k.out_features
            a = (torch.randn((cfg.rank, d), generator=gen) / cfg.rank).to(ctx.device)
            b = torch.zeros((out, cfg.rank), device=ctx.device)
            lora = {"A": a.requires_grad_(True), "B": b.requires_grad_(True)}
            loras[name] = lora
            params += [lora["A"], lora["B"]]
        unet.set_attn_processor({n: AttentionProbe(loras[n], state) if n in loras else p
                                 for n, p in saved.items()})  # fmt: skip
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.01)
        curve = []
        frozen = {p: p.requires_grad for p in unet.parameters()}
        unet.requires_grad_(False)  # only the LoRA learns here
        try:
            with torch.enable_grad():
                for _ in range(cfg.steps_per_concept):
                    j = int(torch.randint(0, len(latents), (1,), generator=gen))
                    n_t = ctx.noise_scheduler.config.num_train_timesteps
                    t = (importance_timesteps(n_t, 1, gen) if cfg.timesteps == "importance"
                         else torch.randint(0, n_t, (1,), generator=gen))  # fmt: skip
                    noise = torch.randn(latents[j : j + 1].shape, generator=gen).to(latents)
                    x_t = ctx.noise_scheduler.add_noise(latents[j : j + 1], noise, t.to(ctx.device))
                    state.update(loss=torch.zeros((), device=ctx.device), mask=masks[j : j + 1],
                                 positions=positions[j : j + 1])  # fmt: skip
                    unet(x_t, t.to(ctx.device), cond[j : j + 1])
                    loss = state["loss"]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    curve.append(round(float(loss.detach()), 5))
        finally:
            unet.set_attn_processor(saved)
            for p, flag in frozen.items():
                p.requires_grad_(flag)
        deltas = {}
        for name, lora in loras.items():
            module = name.removesuffix(".processor") + ".to_k"
            deltas[module] = (lora["B"] @ lora["A"]).detach().cpu().double()
        return deltas, curve

    def write_outputs(self, folder) -> dict[str, Any]:
        return dict(self.edit_info)
