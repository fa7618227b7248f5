"""`memora`: memory self-regeneration (MemoRa). Seed images of the concept from the ORIGINAL
model are partially DDIM-inverted through the model under attack, interpolated (slerp) and
denoised by it again; a LoRA trained on the regenerated images (all captioned with the concept
prompt) is the attack. Defaults from the reference: 3 seed pairs, 11 interpolation points,
inversion 15 of 50 steps (a 0.3 fraction of the model's sampler steps), guidance 7.5, LoRA rank
4, lr 1e-4 cosine, batch 1 x 4 accumulation, 500 steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from erasekit.attacks import Attack, Evaluate
from erasekit.attacks.finetune import FinetuneConfig, tune
from erasekit.concepts import is_world_concept
from erasekit.distributed import my_share, process_state
from erasekit.errors import ErasekitError


@dataclass
class MemoRaConfig(FinetuneConfig):
    mode: str = "lora"
    steps: int = 500
    lr: float = 1e-4
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    eval_every: int = 100
    prompt: str = ""  # "": the concept's first forget prompt
    n_pairs: int = 3
    n_interpolation: int = 11
    inversion_fraction: float = 0.3  # 15 of 50 steps
    guidance: float = 7.5

    def validate(self) -> None:
        super().validate()
        if self.n_pairs < 1 or self.n_interpolation < 2:
            raise ErasekitError("memora needs n_pairs >= 1 and n_interpolation >= 2")
        if not 0 < self.inversion_fraction < 1:
            raise ErasekitError("inversion_fraction must be within (0, 1)")


def slerp(v0: torch.Tensor, v1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two latents (linear when they are nearly parallel)."""
    a, b = v0.flatten().double(), v1.flatten().double()
    cos = torch.clamp((a @ b) / (a.norm() * b.norm()), -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-4:
        out = (1 - alpha) * a + alpha * b
    else:
        out = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)
    return out.reshape(v0.shape).to(v0.dtype)


@torch.no_grad()
def _eps(pipe, x, t, cond, uncond, guidance: float) -> torch.Tensor:
    """The guided U-Net output (ε, or v for a v-prediction model)."""
    both = pipe.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
    e_u, e_c = both.chunk(2)
    return e_u + guidance * (e_c - e_u)


@torch.no_grad()
def invert_and_regenerate(
    pipe, latents: torch.Tensor, prompt: str, steps: int, depth: int, guidance: float, pairs
) -> list[torch.Tensor]:
    """DDIM-invert each clean latent ``depth`` of ``steps`` steps through ``pipe``'s U-Net,
    slerp each pair at the given points, and denoise the rest of the way with the same U-Net."""
    from erasekit.training import encode_prompts

    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    desc = sched.timesteps
    asc = desc.flip(0)
    acp = sched.alphas_cumprod
    cond = encode_prompts(pipe, [prompt]).to(pipe.device)
    uncond = encode_prompts(pipe, [""]).to(pipe.device)
    inverted = {}
    for k in sorted({i for ij, _ in pairs for i in ij}):  # the latents the pairs use
        x = latents[k][None].to(pipe.device)
        a_prev = torch.tensor(1.0)
        for t in asc[:depth]:
            eps = _eps(pipe, x, t, cond, uncond, guidance)
            if sched.config.prediction_type == "v_prediction":  # v -> ε at the model's (x, t)
                a_t = acp[int(t)]
                eps = a_t.sqrt() * eps + (1 - a_t).sqrt() * x
            x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            a_prev = acp[int(t)]
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        inverted[k] = x
    start = len(desc) - depth  # index of the inversion's last timestep in the descending list
    out = []
    for (i, j), alphas in pairs:
        for alpha in alphas:
            x = slerp(inverted[i], inverted[j], alpha)
            for t in desc[start:]:
                x = sched.step(_eps(pipe, x, t, cond, uncond, guidance), t, x).prev_sample
            out.append(x)
    return out


class MemoRa(Attack):
    """Regenerated images are made per attacked model (the attack is the model's own memory);
    the seed images of the ORIGINAL model are shared."""

    name = "memora"
    Config = MemoRaConfig

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        return {"steps": 200, "lr": 1e-3, "eval_every": 50} if is_world_concept(concept) else {}

    def prepare(self) -> dict[str, Any]:
        from erasekit.concepts import prompt_set_from_list
        from erasekit.data import render_image_set
        from erasekit.models import load_pipeline

        cfg = self.config
        cfg.validate()
        if self.ctx.original is None:
            raise ErasekitError("memora needs the original model (--reference)")
        self.prompt = cfg.prompt or self.ctx.concept.forget.prompts[0]
        prompts = prompt_set_from_list([self.prompt], name="memora seed prompt")
        pipe = load_pipeline(self.ctx.original, device=self.ctx.device)
        self.seeds = render_image_set(pipe, self.ctx.original, prompts,
                                      n_per_prompt=2 * cfg.n_pairs, seed=cfg.seed,
                                      cache_dir=self.ctx.render_cache,
                                      progress=False)  # fmt: skip
        return {"prompt": self.prompt, "seed_images": self.seeds.describe()}

    def regenerate(self, model: Path, out_dir: Path):
        from erasekit.data import ImageSet
        from erasekit.models import load_pipeline
        from erasekit.sampling import SamplerSettings
        from erasekit.training import encode_images

        cfg = self.config
        pipe = load_pipeline(model, device=self.ctx.device)
        steps = SamplerSettings.for_model(model).steps
        depth = max(1, round(cfg.inversion_fraction * steps))
        latents = encode_images(pipe, self.seeds)
        points = [k / (cfg.n_interpolation - 1) for k in range(cfg.n_interpolation)]
        folder = out_dir.parent / f"{out_dir.name}-regenerated"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{k:03d}.png" for k in range(cfg.n_pairs * len(points))]
        for p in my_share(cfg.n_pairs):  # several processes regenerate their own pairs
            pair = [((2 * p, 2 * p + 1), points)]
            regenerated = invert_and_regenerate(pipe, latents, self.prompt, steps, depth,
                                                cfg.guidance, pair)  # fmt: skip
            for a, x in enumerate(regenerated):
                image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample[0]
                array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
                Image.fromarray(array.numpy()).save(paths[p * len(points) + a])
        process_state().wait_for_everyone()
        source = {"origin": f"memora regeneration by {model}", "inversion_depth": depth,
                  "sampler_steps": steps, "folder": str(folder)}  # fmt: skip
        return ImageSet("memora regenerated", paths, [self.prompt] * len(paths), source)

    def run(self, model: Path, out_dir: Path, evaluate: Evaluate) -> dict[str, Any]:
        images = self.regenerate(model, out_dir)
        result = tune(model, images, self.config, out_dir, evaluate, self.ctx.device,
                      self.ctx.progress)  # fmt: skip
        result["cost"]["regenerated_images"] = len(images)
        result["cost"]["seed_images"] = len(self.seeds)
        result["regenerated"] = images.source
        return result


__all__ = ["MemoRa", "MemoRaConfig", "invert_and_regenerate", "slerp"]
