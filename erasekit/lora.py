"""LoRA adapters on the U-Net's attention projections (peft), fused on save and exported in
diffusers' format (``pytorch_lora_weights.safetensors``, loadable with ``load_lora_weights``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(
    unet, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS
) -> list[tuple[str, torch.nn.Parameter]]:
    """Add a rank-``rank`` adapter (B = 0, so the model is unchanged) and return its parameters."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(targets)))  # fmt: skip
    return [(n, p) for n, p in unet.named_parameters() if "lora_" in n]


def fuse_lora(unet) -> dict[str, torch.Tensor]:
    """Fuse the adapter into the weights, remove it, and return its state in diffusers' keys."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    unet.fuse_lora()
    unet.unload_lora()
    return state


def save_lora(folder: str | Path, state: dict[str, torch.Tensor], rank: int,
              targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, Any]:  # fmt: skip
    """Write ``state`` as ``pytorch_lora_weights.safetensors``; return its description."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state,
                                              safe_serialization=True)  # fmt: skip
    return {"lora": LORA_FILE, "lora_rank": rank, "targets": list(targets)}
