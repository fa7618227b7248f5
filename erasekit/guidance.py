"""Inference-time guidance a model folder carries in ``guidance.json``: negative-prompt guidance
or Safe Latent Diffusion (SLD), applied by the one generate path, so a guided model is rendered,
audited and attacked exactly as it will be used.

``guidance.json``::

    {"mode": "negative-prompt", "concept": "nudity"}
    {"mode": "sld", "concept": "<nudity-neg>", "embedding": "learned_embeds.safetensors",
     "sld": "medium"}                      # or {"warmup": 10, "edit_scale": 1000, ...}

``concept`` is the negative prompt / SLD safety concept; it may use a token whose embedding the
folder ships in diffusers' textual-inversion format (``embedding``), loaded on load.

SLD (Schramowski et al.), per denoising step i with e_u, e_t, e_S the unconditional, prompt and
safety-concept predictions::

    scale = clamp(|e_t - e_S| * edit_scale, max=1)
    mu    = 0 where (e_t - e_S) >= threshold, else scale
    gamma = mu * (e_S - e_u) + momentum * nu
    nu    = momentum_beta * nu + (1 - momentum_beta) * gamma
    e     = e_u + s_g * ((e_t - e_u) - gamma)   from step ``warmup`` on (before: plain CFG)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError

GUIDANCE_FILE = "guidance.json"
MODES = ("negative-prompt", "sld")
SLD_FIELDS = ("warmup", "edit_scale", "threshold", "momentum", "momentum_beta")


@dataclass(frozen=True)
class SLDParams:
    warmup: int  # steps of plain CFG before the safety term applies
    edit_scale: float  # s_S
    threshold: float  # lambda
    momentum: float  # s_m
    momentum_beta: float  # beta_m


# (warm-up, s_S, lambda, s_m, beta_m), the SLD paper's configurations
SLD_PRESETS = {
    "weak": SLDParams(15, 200.0, 0.0, 0.0, 0.0),
    "medium": SLDParams(10, 1000.0, 0.01, 0.3, 0.4),
    "strong": SLDParams(7, 2000.0, 0.025, 0.5, 0.7),
    "max": SLDParams(0, 5000.0, 1.0, 0.5, 0.7),
}


@dataclass(frozen=True)
class Guidance:
    mode: str  # negative-prompt | sld
    concept: str  # the negative prompt or SLD safety concept
    sld: SLDParams | None = None
    embedding: str | None = None  # a textual-inversion file inside the model folder

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "concept": self.concept, "embedding": self.embedding,
                "sld": asdict(self.sld) if self.sld else None}  # fmt: skip


def parse_guidance(data: Any, source: str = GUIDANCE_FILE) -> Guidance:
    """A validated guidance config (one-line errors naming ``source``)."""
    if not isinstance(data, dict):
        raise ErasekitError(f"{source}: guidance must be a JSON object")
    unknown = sorted(set(data) - {"mode", "concept", "sld", "embedding"})
    if unknown:
        raise ErasekitError(f"{source}: unknown guidance keys: {', '.join(unknown)}")
    mode = data.get("mode")
    if mode not in MODES:
        raise ErasekitError(f"{source}: guidance mode must be one of {', '.join(MODES)}, "
                            f"got {mode!r}")  # fmt: skip
    concept = data.get("concept")
    if not isinstance(concept, str) or not concept.strip():
        raise ErasekitError(f"{source}: guidance needs a non-empty 'concept' prompt")
    embedding = data.get("embedding")
    if embedding is not None and (not isinstance(embedding, str) or not embedding.strip()):
        raise ErasekitError(f"{source}: 'embedding' must be a file name")
    sld = None
    if mode == "sld":
        sld = _sld_params(data.get("sld", "medium"), source)
    elif "sld" in data:
        raise ErasekitError(f"{source}: 'sld' settings given for mode {mode!r}")
    return Guidance(mode, concept.strip(), sld, embedding)


def _sld_params(value: Any, source: str) -> SLDParams:
    if isinstance(value, str):
        if value not in SLD_PRESETS:
            raise ErasekitError(
                f"{source}: unknown SLD preset {value!r} (choose from "
                f"{', '.join(SLD_PRESETS)}, or give {', '.join(SLD_FIELDS)})"
            )
        return SLD_PRESETS[value]
    if not isinstance(value, dict) or set(value) != set(SLD_FIELDS):
        raise ErasekitError(f"{source}: custom SLD settings need exactly {', '.join(SLD_FIELDS)}")
    try:
        params = SLDParams(int(value["warmup"]), *(float(value[k]) for k in SLD_FIELDS[1:]))
    except (TypeError, ValueError):
        raise ErasekitError(f"{source}: SLD settings must be numbers") from None
    if params.warmup < 0 or params.edit_scale < 0 or params.momentum < 0:
        raise ErasekitError(f"{source}: SLD warmup, edit_scale and momentum must be >= 0")
    if not 0 <= params.momentum_beta < 1:
        raise ErasekitError(f"{source}: SLD momentum_beta must be within [0, 1)")
    return params


def read_guidance(folder: str | Path) -> Guidance | None:
    """The guidance config of a model folder, or None when it has none."""
    file = Path(folder) / GUIDANCE_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ErasekitError(f"{file}: not valid JSON ({e})") from None
    guidance = parse_guidance(data, str(file))
    if guidance.embedding and not (Path(folder) / guidance.embedding).is_file():
        raise ErasekitError(f"{file}: embedding file not found: {guidance.embedding}")
    return guidance


def write_guided_model(
    model: str | Path,
    out: str | Path,
    guidance: dict[str, Any],
    embedding: str | Path | None = None,
) -> Path:
    """A model folder that renders ``model``'s weights with ``guidance`` (a ``guidance.json``
    mapping; with ``embedding``, the textual-inversion file its ``concept`` token needs, copied
    in as ``guidance['embedding']``). The weights are linked (relative links), not copied;
    written atomically."""
    import os
    import shutil

    from erasekit.outputs import atomic_output_dir, write_json

    model = Path(model)
    parsed = parse_guidance(guidance, source="guidance")
    if (embedding is None) != (parsed.embedding is None):
        raise ErasekitError("guidance: an 'embedding' file name and an embedding to copy go "
                            "together")  # fmt: skip
    if embedding is not None and not Path(embedding).is_file():
        raise ErasekitError(f"embedding file not found: {embedding}")
    if read_guidance(model) is not None:
        raise ErasekitError(f"{model} already carries {GUIDANCE_FILE}; guide its unguided folder")
    here = Path(out).resolve()
    with atomic_output_dir(out, overwrite=True) as tmp:  # a sibling of out: same relative links
        for item in model.iterdir():
            if item.name != "README.md":  # relative links: a study folder can move whole
                (tmp / item.name).symlink_to(os.path.relpath(item.resolve(), here))
        write_json(tmp / GUIDANCE_FILE, guidance)
        if embedding is not None:
            shutil.copyfile(embedding, tmp / str(parsed.embedding))
    return Path(out)


def sld_step(
    eps_uncond: torch.Tensor,
    eps_text: torch.Tensor,
    eps_safety: torch.Tensor,
    momentum: torch.Tensor,
    params: SLDParams,
    step: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SLD combination: (guided prediction, updated momentum). The momentum accumulates
    from the first step; the safety term applies from step ``warmup`` on."""
    diff = eps_text - eps_safety
    edit = torch.clamp(diff.abs() * params.edit_scale, max=1.0)
    mu = torch.where(diff >= params.threshold, torch.zeros_like(edit), edit)
    gamma = mu * (eps_safety - eps_uncond) + params.momentum * momentum
    momentum = params.momentum_beta * momentum + (1 - params.momentum_beta) * gamma
    guided = eps_text - eps_uncond
    if step >= params.warmup:
        guided = guided - gamma
    return eps_uncond + scale * guided, momentum


@torch.no_grad()
def sld_images(pipe, guidance: Guidance, prompts: list[str], negatives: list[str],
               generators: list[torch.Generator], steps: int, scale: float, height: int,
               width: int, eta: float):  # fmt: skip
    """Render a batch with SLD: the pipeline's own encoder, scheduler and decoder, three U-Net
    predictions per step (unconditional / negative, prompt, safety concept). Returns images as
    float arrays in [0, 1], like ``pipe(..., output_type="np")``."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    n = len(prompts)
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negatives)
    safety, _ = pipe.encode_prompt([guidance.concept] * n, device, 1, False)
    latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, height, width, dtype,
                                   device, generators)  # fmt: skip
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    extra = pipe.prepare_extra_step_kwargs(generators, eta)
    momentum = torch.zeros_like(latents)
    embeds = torch.cat([uncond, cond, safety])
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(torch.cat([latents] * 3), t)
        e_u, e_t, e_s = pipe.unet(x, t, encoder_hidden_states=embeds).sample.chunk(3)
        eps, momentum = sld_step(e_u, e_t, e_s, momentum, guidance.sld, i, scale)
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")
