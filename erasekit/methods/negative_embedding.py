"""Concept-inversion negative embedding: a defence for (usually already erased) models whose
hand-written negative prompts stopped working because the model no longer responds to the
concept's words.

Textual inversion (``erasekit.inversion``: its token, init-word and learning-rate rules) against
the model it is given: one new token c*, every weight frozen, over images of the concept
(rendered by the ORIGINAL model, or a user folder), with the forget prompts' concept words
replaced by the token. Reference settings: Adam, lr 5e-3, batch 1, 3000 steps. The output is a
defended model folder: the unchanged weights, c* in diffusers' textual-inversion format
(``learned_embeds.safetensors``) and ``guidance.json``, which makes the one generate path use c*
as the negative prompt or as SLD's safety concept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.guidance import GUIDANCE_FILE, MODES, SLD_FIELDS, SLD_PRESETS, parse_guidance
from erasekit.inversion import EMBEDDING_FILE, InversionConfig, TextualInversion, load_embedding
from erasekit.methods import Method

__all__ = ["EMBEDDING_FILE", "NegativeEmbedding", "load_embedding"]


@dataclass
class NegativeEmbeddingConfig(InversionConfig):
    steps: int = 3000
    optimizer: str = "adam"
    token: str = "<negative-concept>"
    guidance: str = "negative-prompt"  # negative-prompt | sld
    sld: str = "medium"  # weak|medium|strong|max, or "warmup,edit_scale,threshold,momentum,beta"
    original: str = ""  # model that renders the concept images ("": the manifest's base model)
    embedding: str = ""  # start from this learned embedding (steps=0: transfer it as is)

    def validate(self) -> None:
        super().validate()
        guidance_config(self)  # raises on a bad mode or SLD setting
        if self.embedding:
            load_embedding(self.embedding)  # before any rendering


def guidance_config(config: NegativeEmbeddingConfig) -> dict[str, Any]:
    """The ``guidance.json`` this config writes (validated)."""
    data: dict[str, Any] = {"mode": config.guidance, "concept": config.token,
                            "embedding": EMBEDDING_FILE}  # fmt: skip
    if config.guidance == "sld":
        if config.sld in SLD_PRESETS:
            data["sld"] = config.sld
        else:
            values = [v.strip() for v in config.sld.split(",")]
            if len(values) != len(SLD_FIELDS):
                raise ErasekitError(f"sld: a preset ({', '.join(SLD_PRESETS)}) or five numbers "
                                    f"{','.join(SLD_FIELDS)}, got {config.sld!r}")  # fmt: skip
            data["sld"] = dict(zip(SLD_FIELDS, values, strict=True))
    if config.guidance not in MODES:
        raise ErasekitError(f"guidance must be one of {', '.join(MODES)}, got {config.guidance!r}")
    parsed = parse_guidance(data, source="guidance")
    if parsed.sld is not None and isinstance(data.get("sld"), dict):
        data["sld"] = {k: getattr(parsed.sld, k) for k in SLD_FIELDS}
    return data


class NegativeEmbedding(TextualInversion, Method):
    name = "negative-embedding"
    summary = ("learns the concept's embedding c* on an erased model and guides away from it "
               "(a defence at generation)")  # fmt: skip
    source = "Prompt-based safety guidance is ineffective for unlearned T2I models"
    Config = NegativeEmbeddingConfig
    saves_model = True  # the defended folder: the unchanged weights beside c*
    one_concept = "one learned embedding stands for one concept"

    def prepare_data(self, pipe):
        if getattr(pipe, "erasekit_guidance", None) is not None:
            raise ErasekitError(f"{self.model_path} already carries {GUIDANCE_FILE}; learn the "
                                "embedding on the unguided model folder")  # fmt: skip
        data = super().prepare_data(pipe)
        self.data_info["embedding_init"] = self.config.embedding or None
        return data

    def inversion_images(self, pipe):
        return self._concept_images(pipe)

    def initial_embedding(self, width: int) -> torch.Tensor | None:
        if not self.config.embedding:
            return None
        init = load_embedding(self.config.embedding)
        if init.shape[-1] != width:
            raise ErasekitError(f"{self.config.embedding}: a {init.shape[-1]}-d embedding; "
                                f"this text encoder needs {width}")  # fmt: skip
        return init

    def _concept_images(self, pipe):
        """The user's folder, else images rendered by the original model."""
        from erasekit.data import read_image_folder, render_image_set
        from erasekit.models import load_pipeline, read_manifest

        if self.forget_images is not None:
            return read_image_folder(self.forget_images, name="concept images")
        original = self.config.original
        if not original:
            base = (read_manifest(self.model_path) or {}).get("base_model") or {}
            original = base.get("path") or ""
        if not original:
            raise ErasekitError("negative-embedding needs images of the concept: pass "
                                "--forget-images DIR or --set original=PATH (the model before "
                                "erasure; default: the manifest's base model)")  # fmt: skip
        if not Path(original).exists():
            raise ErasekitError(f"original model not found: {original} (pass --set "
                                "original=PATH or --forget-images DIR)")  # fmt: skip
        self.original_path = Path(original)
        renderer = load_pipeline(original, device=str(pipe.device))
        return render_image_set(renderer, original, self.concept.forget,
                                n_per_prompt=self.config.images_per_prompt,
                                seed=self.config.seed, cache_dir=self.cache_dir,
                                progress=self.progress)  # fmt: skip

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        from erasekit.outputs import write_json

        outputs = super().write_outputs(folder)
        guidance = guidance_config(self.config)
        write_json(folder / GUIDANCE_FILE, guidance)
        return {**outputs, "guidance": guidance}
