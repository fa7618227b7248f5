"""`finetune`: benign downstream fine-tuning of the U-Net (full or LoRA), on image-caption data
with no instance of the concept. Defaults: ResAlign's evaluation attack for full fine-tuning
(200 steps, lr 1e-5, effective batch 4, AdamW) and the common LoRA settings (rank 4, lr 1e-4)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.attacks import Attack, Evaluate, RecoveryCurve
from erasekit.concepts import is_world_concept
from erasekit.errors import ErasekitError
from erasekit.lora import LORA_FILE
from erasekit.training import DenoisingConfig, DenoisingJob, TrainContext


@dataclass
class FinetuneConfig(DenoisingConfig):
    steps: int = 200
    lr: float = 0.0  # 0: 1e-5 for full, 1e-4 for LoRA
    batch_size: int = 1
    gradient_accumulation_steps: int = 4
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    eval_every: int = 50  # recovery-curve spacing in optimizer steps
    images: str | None = None  # an imagefolder of benign image-caption pairs
    images_per_prompt: int = 1  # when rendering benign data from the retain prompts

    def validate(self) -> None:
        if self.mode not in ("full", "lora"):  # before lr resolves from it
            raise ErasekitError(f"finetune mode must be full or lora, got {self.mode!r}")
        if self.eval_every < 1:
            raise ErasekitError("eval_every must be at least 1")
        if self.lr == 0.0:
            self.lr = 1e-4 if self.mode == "lora" else 1e-5
        super().validate()


class Tuning(DenoisingJob):
    """The fine-tuning attack: the plain denoising job with its recovery curve measured every
    ``eval_every`` steps."""

    name = "finetune"

    def __init__(self, config: FinetuneConfig, image_set, curve: RecoveryCurve, **kw) -> None:
        super().__init__(config, image_set, **kw)
        self.curve = curve

    def _measure(self, ctx: TrainContext) -> None:
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        unet.eval()
        ctx.pipe.unet = unet
        ctx.pipe.vae.to(ctx.device)
        ctx.pipe.text_encoder.to(ctx.device)
        self.curve.measure(ctx.pipe, ctx.step)
        unet.train()

    def on_train_start(self, ctx: TrainContext) -> None:
        if ctx.step == 0:
            self._measure(ctx)

    def on_step_end(self, ctx: TrainContext) -> None:
        if ctx.step % self.config.eval_every == 0 or ctx.step == self.config.steps:
            self._measure(ctx)


def tune(model: Path, image_set, config: FinetuneConfig, out_dir: Path, evaluate: Evaluate,
         device: str, progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Fine-tune ``model`` on ``image_set`` with the shared loop; the result of an attack."""
    from erasekit.models import load_pipeline
    from erasekit.training import TRAINING_LOG, train

    config.validate()
    curve = RecoveryCurve(evaluate)
    job = Tuning(config, image_set, curve, model_path=model, progress=progress)
    started = time.time()
    train(job, load_pipeline(model, device=device), model_path=model, out_dir=out_dir,
          progress=progress, overwrite=True)  # fmt: skip
    seconds = time.time() - started
    artefact = out_dir / LORA_FILE if config.mode == "lora" else out_dir
    return {
        "artefact": str(artefact),
        "model_folder": str(out_dir),
        "cost": curve.cost(config, len(image_set), seconds),
        "curve": curve.points,
        "log": str(out_dir / TRAINING_LOG),
    }


class Finetune(Attack):
    """Benign fine-tuning: images of the concept's retain prompts rendered by the audited model
    (or a user imagefolder), the same set for the audited model and every control."""

    name = "finetune"
    summary = (
        "benign fine-tuning of the U-Net (full or LoRA) "
        "on data without the concept; rate every few steps"
    )
    Config = FinetuneConfig
    needs_original = False

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        # lr 1e-5 barely moves a model trained at 1e-3; full fine-tuning at 1e-4 (LoRA 1e-3).
        # Batch 4 in one pass: the same training as 1 x 4 accumulation (noise and timesteps
        # are drawn per item of the step's global batch), 2.4x faster a step on a CPU thread.
        if is_world_concept(concept):
            return {"lr": 1e-4, "batch_size": 4, "gradient_accumulation_steps": 1}
        return {}

    def prepare(self) -> dict[str, Any]:
        from erasekit.data import read_image_folder, render_image_set
        from erasekit.models import load_pipeline

        cfg = self.config
        if cfg.images:
            self.images = read_image_folder(cfg.images, name="benign images")
        else:
            pipe = load_pipeline(self.ctx.audited, device=self.ctx.device)
            self.images = render_image_set(pipe, self.ctx.audited, self.ctx.concept.retain,
                                           n_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
                                           cache_dir=self.ctx.render_cache,
                                           progress=False)  # fmt: skip
            self.images.source["origin"] = "rendered by the audited model from retain prompts"
        return self.images.describe()

    def run(self, model: Path, out_dir: Path, evaluate: Evaluate) -> dict[str, Any]:
        return tune(model, self.images, self.config, out_dir, evaluate, self.ctx.device,
                    self.ctx.progress)  # fmt: skip
