"""The settings every training job shares (``TrainConfig``; ``DenoisingConfig`` for plain
denoising fine-tuning) and the names of the files a run writes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from erasekit.concepts import check_seed
from erasekit.errors import ErasekitError

TRAINING_LOG = "training_log.jsonl"


CHECKPOINTS = "checkpoints"


STATE_FILE = "erasekit_state.json"  # a checkpoint's step and config; written last


ADAPTED_UNET = "adapted.safetensors"  # a checkpoint's U-Net with adapters injected


MIXED_PRECISION = ("no", "fp16", "bf16")


OPTIMIZERS = ("adam", "adamw", "sgd")


IMAGE_SOURCES = ("original", "world")


COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")


LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Loop settings every method shares; a method's config subclasses this."""

    steps: int = 100  # optimizer steps (counted when gradients sync)
    lr: float = 1e-5
    batch_size: int = 1  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 0  # 0: no intermediate checkpoints
    checkpoints_total_limit: int = 2
    keep_checkpoints: bool = False  # keep checkpoints/ in the output folder
    seed: int = 0
    images_per_prompt: int = 8  # rendered forget/retain data: images per prompt
    # forget/retain images: "original" (rendered by the original model) or "world" (ShapesWorld
    # concepts: ground-truth renders of each prompt by the world's renderer)
    image_source: str = "original"
    save_dtype: str = "fp32"
    # faster steps, off by default (not yet measured on a GPU; on a CPU see docs/methods/index.md):
    channels_last: bool = False  # the U-Net (and frozen teachers) in channels-last memory
    fused_optimizer: bool = False  # torch's fused Adam / AdamW / SGD kernel
    compile: str = "no"  # torch.compile mode of the U-Net(s): no | default | max-autotune ...

    def validate(self) -> None:
        """Raise ErasekitError on values no run could use."""
        choices = {
            "optimizer": OPTIMIZERS,
            "lr_scheduler": LR_SCHEDULES,
            "mixed_precision": MIXED_PRECISION,
            "save_dtype": ("fp32", "fp16", "bf16"),
            "image_source": IMAGE_SOURCES,
            "compile": COMPILE_MODES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ErasekitError(f"{key} must be one of {', '.join(allowed)}")
        for key in ("steps", "batch_size", "gradient_accumulation_steps", "images_per_prompt"):
            if getattr(self, key) < (0 if key == "steps" else 1):
                raise ErasekitError(f"{key} must be positive, got {getattr(self, key)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ErasekitError(f"lr must be a positive number, got {self.lr}")
        if self.checkpoints_total_limit < 1:
            raise ErasekitError("checkpoints_total_limit must be at least 1")
        if self.checkpointing_steps < 0:
            raise ErasekitError(f"checkpointing_steps must be 0 (none) or positive, got"
                                f" {self.checkpointing_steps}")  # fmt: skip
        if self.max_grad_norm < 0:
            raise ErasekitError(f"max_grad_norm must be 0 (no clipping) or positive, got"
                                f" {self.max_grad_norm}")  # fmt: skip
        check_seed(self.seed, "seed")


@dataclass
class DenoisingConfig(TrainConfig):
    """Plain fine-tuning: the full U-Net or a LoRA on the attention projections."""

    mode: str = "full"  # full | lora
    rank: int = 4
    lora_alpha: float = 4.0

    def validate(self) -> None:
        if self.mode not in ("full", "lora"):
            raise ErasekitError(f"mode must be full or lora, got {self.mode!r}")
        super().validate()
