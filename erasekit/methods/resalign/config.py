"""ResAlign's settings."""

from __future__ import annotations

from dataclasses import dataclass

from erasekit.errors import ErasekitError
from erasekit.methods.esd import VARIANTS as ESD_VARIANTS
from erasekit.training import TrainConfig

BASES = ("ga", "esd", "salun")
TRAINABLE = ("lora", "full", "mask", *ESD_VARIANTS)


@dataclass
class ResAlignConfig(TrainConfig):
    steps: int = 160  # outer steps
    lr: float = 0.0  # 0: 2e-4 for a LoRA (released), 1e-5 for weights; x5 / x10 on ShapesWorld
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    base: str = "ga"  # the harmful loss L_h: ga | esd | salun
    lam: float = 0.8  # λ, the weight of L_h after simulated fine-tuning
    retain_weight: float = 1.6  # w_r in the first half of training
    retain_weight_late: float = 2.0  # w_r from the second half on
    trainable: str = "lora"  # lora | full | mask (SalUn saliency) | an ESD variant
    rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    meta_distribution: str = ""  # YAML file; "" = the shipped default (world scale for ShapesWorld)
    configs_per_step: int = 3  # k configurations sampled per outer step
    gamma: float = 1.0  # γ of the proximal (Moreau-envelope) model of fine-tuning
    fixed_point_iterations: int = 5  # K
    alpha: float = 1.0  # first step size α of the fixed-point iteration
    max_retries: int = 5
    max_resilience_norm: float = 0.2
    # base methods' own settings
    negative_guidance: float = 1.0  # esd: η
    esd_target: str = "paper"  # esd: target convention, paper | diffusers-code
    ddim_steps: int = 50  # esd: partial-sample schedule
    sample_guidance: float = 3.0  # esd: CFG of the partial sample
    surrogate: str = ""  # salun: "" = the concept's surrogate prompt
    # salun: fixed (one surrogate prompt) | replace (per image, its prompt with the concept
    # word replaced, as SalUn's option); other bases ignore the three
    surrogate_mode: str = "fixed"
    surrogate_word: str = ""  # "" = the concept's words
    surrogate_replacement: str = ""  # "" on ShapesWorld = SalUn's world relabel (red -> blue)
    mask_fraction: float = 0.5  # trainable=mask: share of weights trained
    mask_guidance: float = 7.5
    mask_batch_size: int = 8
    mask_source: str = "saliency"  # trainable=mask: saliency | lcodec
    lcodec_samples: int = 128
    world_scale: bool = False  # lr=0 resolves to 10x (weights) / 5x (LoRA) the SD values

    def validate(self) -> None:
        if self.lr == 0.0:
            lora = self.trainable == "lora"
            self.lr = (1e-3 if lora else 1e-4) if self.world_scale else (2e-4 if lora else 1e-5)
        super().validate()
        if self.base not in BASES:
            raise ErasekitError(f"base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.trainable not in TRAINABLE:
            raise ErasekitError(f"trainable must be one of {', '.join(TRAINABLE)}")
        if not 0.0 <= self.lam <= 1.0:
            raise ErasekitError(f"lam must be in [0, 1], got {self.lam}")
        for key in ("retain_weight", "retain_weight_late", "gamma", "max_resilience_norm"):
            if not getattr(self, key) >= 0:
                raise ErasekitError(f"{key} must be non-negative")
        for key in ("rank", "configs_per_step", "fixed_point_iterations", "mask_batch_size"):
            if getattr(self, key) < 1:
                raise ErasekitError(f"{key} must be at least 1")
        if self.mixed_precision == "fp16":
            raise ErasekitError(
                "resalign: mixed_precision must be no or bf16 (fp16 needs loss scaling, which "
                "the hand-built hypergradient bypasses)"
            )
        if not 0.0 < self.alpha <= 1.0:
            raise ErasekitError("alpha must be in (0, 1]")
        if self.max_retries < 0:
            raise ErasekitError("max_retries must be non-negative")
        if not 0.0 < self.mask_fraction <= 1.0:
            raise ErasekitError("mask_fraction must be in (0, 1]")
        if self.surrogate_mode not in ("fixed", "replace"):
            raise ErasekitError("surrogate_mode must be fixed or replace")
        if self.base != "salun":  # SalUn's surrogate only: another base records the default
            self.surrogate_mode = "fixed"
        from erasekit.methods.salun import check_mask_source

        check_mask_source(self.mask_source, self.lcodec_samples)
        if self.trainable in ("mask", *ESD_VARIANTS) and self.weight_decay != 0:
            raise ErasekitError(f"trainable={self.trainable}: weight_decay must be 0 (decay "
                                "would move weights outside the trainable set)")  # fmt: skip

    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
