"""`concept-inversion`: textual inversion of one new token against the model under attack, on
images of the concept made by the ORIGINAL model; the attack's prompts are the concept's forget
prompts with the concept's word replaced by the token. Runs the shared textual-inversion job
(``erasekit.inversion``) on the shared loop. Reference settings: 5000 steps, batch 4 x 4
accumulation, lr 5e-3 scaled by the effective batch (0.08). The embedding is saved in the
format diffusers' ``load_textual_inversion`` reads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.attacks import Attack, Evaluate, RecoveryCurve
from erasekit.concepts import is_world_concept
from erasekit.errors import ErasekitError
from erasekit.inversion import (
    EMBEDDING_FILE,
    InversionConfig,
    TextualInversion,
    concept_words,
    install_token,
    substitute,
)

__all__ = ["EMBEDDING_FILE", "ConceptInversion", "ConceptInversionConfig", "substitute"]


@dataclass
class ConceptInversionConfig(InversionConfig):
    steps: int = 5000
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    images_per_prompt: int = 2
    eval_every: int = 500

    def validate(self) -> None:
        super().validate()
        if self.eval_every < 1:
            raise ErasekitError("concept-inversion: eval_every must be at least 1")


class _Inversion(TextualInversion):
    """The attack's job: the shared images, the recovery curve measured on the token prompts."""

    name = "concept-inversion"

    def __init__(self, config, concept, images, curve: RecoveryCurve, eval_set, **kw) -> None:
        super().__init__(config, concept, **kw)
        self.images = images
        self.curve = curve
        self.eval_set = eval_set

    def inversion_images(self, pipe):
        return self.images

    def _measure(self, ctx) -> None:
        vector = ctx.accelerator.unwrap_model(ctx.trained).vector
        install_token(ctx.pipe, self.config.token, vector)
        ctx.pipe.vae.to(ctx.device)
        self.curve.measure(ctx.pipe, ctx.step, prompts=self.eval_set)

    def on_train_start(self, ctx) -> None:
        if ctx.step == 0:
            self._measure(ctx)

    def on_step_end(self, ctx) -> None:
        if ctx.step % self.config.eval_every == 0 or ctx.step == ctx.total:
            self._measure(ctx)


class ConceptInversion(Attack):
    name = "concept-inversion"
    summary = (
        "learns a token embedding that makes the "
        "erased model draw the concept again (textual inversion)"
    )
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
                                       cache_dir=self.ctx.render_cache,
                                       progress=False)  # fmt: skip
        words = concept_words(cfg, concept)
        self.eval_set = prompt_set_from_list(
            [substitute(p, words, cfg.token) for p in concept.forget.prompts],
            name=f"{concept.name} forget prompts with {cfg.token}",
        )
        return {"images": self.images.describe(), "token": cfg.token, "words": words,
                "init_word": cfg.init_word or words[0],
                "eval_prompts": self.eval_set.describe()}  # fmt: skip

    def run(self, model: Path, out_dir: Path, evaluate: Evaluate) -> dict[str, Any]:
        from erasekit.models import load_pipeline
        from erasekit.training import TRAINING_LOG, train

        cfg = self.config
        curve = RecoveryCurve(evaluate)
        job = _Inversion(cfg, self.ctx.concept, self.images, curve, self.eval_set,
                         model_path=model, progress=self.ctx.progress)  # fmt: skip
        started = time.time()
        train(job, load_pipeline(model, device=self.ctx.device), model_path=model,
              out_dir=out_dir, progress=self.ctx.progress, overwrite=True)  # fmt: skip
        seconds = time.time() - started
        return {
            "artefact": str(out_dir / EMBEDDING_FILE),
            "cost": curve.cost(cfg, len(self.images), seconds),
            "curve": curve.points,
            "eval_prompts": self.eval_set.describe(),
            "log": str(out_dir / TRAINING_LOG),
        }
