"""What a ShapesWorld build makes: the variants and the concepts each never saw, the
base U-Net's data, and the recipe (every setting of every stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from erasekit.world import WORLD_VERSION
from erasekit.world.render import COLOURS, SHAPES, STYLES

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
        from erasekit.world.parts import build_scheduler

        return build_scheduler(self.beta_schedule, self.beta_start, self.beta_end,
                               self.prediction_type, self.zero_terminal_snr)  # fmt: skip


def variant_values(variant: str) -> dict[str, tuple[str, ...]]:
    """The concept values a variant's data covers, per dimension."""
    spec = VARIANTS[variant]
    return {
        "colour": spec.get("colours", COLOURS),
        "shape": spec.get("shapes", SHAPES),
        "style": spec.get("styles", STYLES),
    }
