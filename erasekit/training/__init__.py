"""The one training loop every gradient-based erasure method runs on.

Patterned on diffusers' accelerate examples: an ``Accelerator`` with mixed precision, gradient
accumulation (a step is counted when gradients sync), clipping, an optimizer with an LR
schedule, optional gradient checkpointing, ``save_state`` checkpoints with diffusers-native model
hooks, a total limit and ``--resume latest``, a progress bar with the loss, a JSON-lines training
log, and a stop with the last good checkpoint kept when the loss turns NaN/inf.

A method (``erasekit.methods``) supplies its config dataclass (a ``TrainConfig``), the
parameters it trains (of the U-Net, or of another module it names, e.g. a token embedding), and
its loss on a ``{"forget": ..., "retain": ...}`` batch. Frozen parts (VAE, text encoder) are
used once, up front, to encode the data, unless the method runs the text encoder itself; a
frozen teacher U-Net, when a method needs one, stays out of ``prepare`` and is held in the
weight dtype.

Randomness (batch order, noise, timesteps) is a pure function of (seed, step, micro-step,
process), so a resumed run continues exactly as an uninterrupted one would.
Modules: ``config`` (settings), ``data`` (encoded once), ``job`` (what the loop runs),
``loop`` (``train``), ``checkpoints`` (written atomically, found for ``--resume``)."""

from __future__ import annotations

from erasekit.training.config import (
    ADAPTED_UNET,
    CHECKPOINTS,
    COMPILE_MODES,
    IMAGE_SOURCES,
    LR_SCHEDULES,
    MIXED_PRECISION,
    OPTIMIZERS,
    STATE_FILE,
    TRAINING_LOG,
    WEIGHT_DTYPES,
    DenoisingConfig,
    TrainConfig,
)
from erasekit.training.data import (
    Split,
    condition_width,
    encode_images,
    encode_prompt_list,
    encode_prompts,
    epoch_indices,
    make_split,
    step_generator,
    token_ids,
)
from erasekit.training.job import (
    DenoisingJob,
    NonFiniteLoss,
    TrainContext,
    TrainingJob,
    compile_unet,
    make_optimizer,
)
from erasekit.training.loop import (
    train,
)

__all__ = [
    "ADAPTED_UNET",
    "CHECKPOINTS",
    "COMPILE_MODES",
    "DenoisingConfig",
    "DenoisingJob",
    "IMAGE_SOURCES",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "NonFiniteLoss",
    "OPTIMIZERS",
    "STATE_FILE",
    "Split",
    "TRAINING_LOG",
    "TrainConfig",
    "TrainContext",
    "TrainingJob",
    "WEIGHT_DTYPES",
    "compile_unet",
    "condition_width",
    "encode_images",
    "encode_prompt_list",
    "encode_prompts",
    "epoch_indices",
    "make_optimizer",
    "make_split",
    "step_generator",
    "token_ids",
    "train",
]
