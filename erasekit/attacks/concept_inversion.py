"""`concept-inversion`: textual inversion of one new token against the model under attack, on
images of the concept made by the ORIGINAL model; the attack's prompts are the concept's forget
prompts with the concept's word replaced by the token. Reference settings: 5000 steps, batch 4
x 4 accumulation, lr 5e-3 scaled by the effective batch (0.08). The embedding is saved in the
format diffusers' ``load_textual_inversion`` reads."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.attacks import Attack, Evaluate
from erasekit.concepts import is_world_concept
from erasekit.errors import ErasekitError

EMBEDDING_FILE = "learned_embeds.safetensors"


@dataclass
class ConceptInversionConfig:
    steps: int = 5000
    lr: float = 5e-3
    scale_lr: bool = True  # lr x batch x accumulation, as the public code does
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    token: str = "<concept>"
    init_word: str = ""  # "": the concept's name
    words: str = ""  # comma-separated words the token replaces ("": the concept's name)
    images_per_prompt: int = 2
    eval_every: int = 500
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ErasekitError("concept-inversion: steps, batch and accumulation must be >= 1")
        if not re.fullmatch(r"<[\w-]+>", self.token):
            raise ErasekitError(
                f"concept-inversion token must look like <name>, got {self.token!r}"
            )


def substitute(prompt: str, words: list[str], token: str) -> str:
    """``prompt`` with every listed word replaced by ``token`` (or the token prefixed)."""
    out = prompt
    for w in sorted(words, key=len, reverse=True):
        out = re.sub(rf"\b{re.escape(w)}\b", token, out, flags=re.I)
    return out if out != prompt else f"{token}, {prompt}"


class ConceptInversion(Attack):
    name = "concept-inversion"
    Config = ConceptInversionConfig

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        if not is_world_concept(concept):
            return {}
        return {"steps": 300, "gradient_accumulation_steps": 1, "eval_every": 75}

    def prepare(self) -> dict[str, Any]:
        from erasekit.concepts import prompt_set_from_list
        from erasekit.data import render_image_set
        from erasekit.models import load_pipeline

        cfg, concept = self.config, self.ctx.concept
        cfg.validate()
        if self.ctx.original is None:
            raise ErasekitError("concept-inversion needs the original model (--reference)")
        pipe = load_pipeline(self.ctx.original, device=self.ctx.device)
        self.images = render_image_set(pipe, self.ctx.original, concept.forget,
                                       n_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
                                       cache_dir=self.ctx.work_dir / "cache",
                                       progress=False)  # fmt: skip
        words = [w.strip() for w in (cfg.words or concept.name).split(",") if w.strip()]
        self.train_prompts = [substitute(p, words, cfg.token) for p in self.images.prompts]
        self.eval_set = prompt_set_from_list(
            [substitute(p, words, cfg.token) for p in concept.forget.prompts],
            name=f"{concept.name} forget prompts with {cfg.token}",
        )
        self.init_word = cfg.init_word or words[0]
        return {"images": self.images.describe(), "token": cfg.token, "words": words,
                "init_word": self.init_word, "eval_prompts": self.eval_set.describe()}  # fmt: skip

    def run(self, model: Path, out_dir: Path, evaluate: Evaluate) -> dict[str, Any]:
        from diffusers import DDPMScheduler
        from safetensors.torch import save_file

        from erasekit.models import load_pipeline
        from erasekit.outputs import write_json
        from erasekit.training import encode_images, step_generator

        cfg = self.config
        pipe = load_pipeline(model, device=self.ctx.device)
        tok, te = pipe.tokenizer, pipe.text_encoder
        if tok.add_tokens(cfg.token) != 1:
            raise ErasekitError(f"token {cfg.token} is already in the vocabulary")
        te.resize_token_embeddings(len(tok))
        token_id = tok.convert_tokens_to_ids(cfg.token)
        init_ids = tok(self.init_word, add_special_tokens=False).input_ids
        table = te.get_input_embeddings().weight
        with torch.no_grad():
            table[token_id] = table[init_ids].mean(0)
        original_table = table.detach().clone()
        pipe.unet.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        te.requires_grad_(False)
        table.requires_grad_(True)
        keep = torch.ones(len(tok), 1, dtype=torch.bool, device=table.device)
        keep[token_id] = False
        latents = encode_images(pipe, self.images)
        ids = tok(self.train_prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        lr = cfg.lr * (cfg.batch_size * cfg.gradient_accumulation_steps if cfg.scale_lr else 1)
        opt = torch.optim.AdamW([table], lr=lr, weight_decay=0.0)
        curve, eval_seconds, started = [], 0.0, time.time()

        def measure(step: int) -> None:
            nonlocal eval_seconds
            t0 = time.time()
            curve.append({"step": step, "metric": evaluate(pipe, step, prompts=self.eval_set)})
            eval_seconds += time.time() - t0

        measure(0)
        n = len(latents)
        for step in range(cfg.steps):
            for micro in range(cfg.gradient_accumulation_steps):
                g = step_generator(cfg.seed, step, micro)
                idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
                x0 = latents[idx]
                noise = torch.randn(x0.shape, generator=g).to(x0)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),),
                                  generator=g).to(x0.device)  # fmt: skip
                cond = te(ids[idx].to(te.device))[0]
                pred = pipe.unet(noise_sched.add_noise(x0, noise, t), t, cond).sample
                target = noise
                if noise_sched.config.prediction_type == "v_prediction":
                    target = noise_sched.get_velocity(x0, noise, t)
                loss = F.mse_loss(pred.float(), target.float()) / cfg.gradient_accumulation_steps
                if not torch.isfinite(loss):
                    raise ErasekitError(f"concept-inversion: loss became {loss.item()} at "
                                        f"step {step + 1}")  # fmt: skip
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # only the new token's row may move
                table.copy_(torch.where(keep, original_table, table))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                measure(step + 1)
        seconds = time.time() - started - eval_seconds
        out_dir.mkdir(parents=True, exist_ok=True)
        embedding = table[token_id].detach().float().cpu().clone()
        save_file({cfg.token: embedding}, str(out_dir / EMBEDDING_FILE))
        write_json(out_dir / "concept_inversion.json", {"token": cfg.token, "lr": lr,
                   "steps": cfg.steps, "init_word": self.init_word})  # fmt: skip
        return {
            "artefact": str(out_dir / EMBEDDING_FILE),
            "cost": {
                "steps": cfg.steps,
                "effective_batch": cfg.batch_size * cfg.gradient_accumulation_steps,
                "images": len(self.images),
                "image_passes": cfg.steps * cfg.batch_size * cfg.gradient_accumulation_steps,
                "seconds": round(seconds, 2),
                "evaluation_seconds": round(eval_seconds, 2),
            },
            "curve": curve,
            "eval_prompts": self.eval_set.describe(),
        }
