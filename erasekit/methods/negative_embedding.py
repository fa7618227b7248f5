"""Concept-inversion negative embedding: a defence for (usually already erased) models whose
hand-written negative prompts stopped working because the model no longer responds to the
concept's words.

Textual inversion against the model it is given: one new token c*, every weight frozen,

    min_c*  E ||eps - eps_theta(z_t, t, enc(prompt with c*))||^2

over images of the concept (rendered by the ORIGINAL model, or a user folder), with the forget
prompts' concept words replaced by the token. Reference settings: Adam, lr 5e-3, batch 1, 3000
steps. The output is a defended model folder: the unchanged weights, c* in diffusers'
textual-inversion format (``learned_embeds.safetensors``) and ``guidance.json``, which makes the
one generate path use c* as the negative prompt or as SLD's safety concept.

The text encoder's weights and vocabulary are never changed: c* is spliced into its input
embeddings at the token's positions, so the saved folder holds exactly the weights it was given.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.attacks.concept_inversion import EMBEDDING_FILE, substitute
from erasekit.errors import ErasekitError
from erasekit.guidance import GUIDANCE_FILE, MODES, SLD_FIELDS, SLD_PRESETS, parse_guidance
from erasekit.methods import Method
from erasekit.training import Split, TrainConfig, TrainContext, encode_images

__all__ = ["EMBEDDING_FILE", "NegativeEmbedding", "TokenEmbedding", "load_embedding"]


@dataclass
class NegativeEmbeddingConfig(TrainConfig):
    steps: int = 3000
    lr: float = 5e-3
    max_grad_norm: float = 0.0  # textual inversion: no clipping
    token: str = "<negative-concept>"
    init_word: str = ""  # "": the concept's first word
    words: str = ""  # comma-separated words the token replaces ("": the concept's name)
    guidance: str = "negative-prompt"  # negative-prompt | sld
    sld: str = "medium"  # weak|medium|strong|max, or "warmup,edit_scale,threshold,momentum,beta"
    original: str = ""  # model that renders the concept images ("": the manifest's base model)
    embedding: str = ""  # start from this learned embedding (steps=0: transfer it as is)

    def validate(self) -> None:
        super().validate()
        if not re.fullmatch(r"<[\w-]+>", self.token):
            raise ErasekitError(f"token must look like <name>, got {self.token!r}")
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


class TokenEmbedding(torch.nn.Module):
    """The learned token vector c*; ``encode`` runs a frozen text encoder with c* spliced into
    its input embeddings wherever ``token_id`` occurs (the id itself is never looked up)."""

    def __init__(self, init: torch.Tensor, token_id: int, placeholder_id: int) -> None:
        super().__init__()
        self.vector = torch.nn.Parameter(init.detach().clone().float())
        self.token_id = token_id
        self.placeholder_id = placeholder_id

    def forward(self) -> torch.Tensor:
        return self.vector

    def encode(self, text_encoder, ids: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        mask = (ids == self.token_id).unsqueeze(-1)

        def splice(_module, _inputs, output):
            return torch.where(mask, vector.to(output.dtype), output)

        handle = text_encoder.get_input_embeddings().register_forward_hook(splice)
        try:
            return text_encoder(ids.masked_fill(mask.squeeze(-1), self.placeholder_id))[0]
        finally:
            handle.remove()


def load_embedding(path: str | Path) -> torch.Tensor:
    """The single vector of a diffusers textual-inversion ``.safetensors`` file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"embedding not found: {path}")
    if path.suffix != ".safetensors":
        raise ErasekitError(f"{path}: only .safetensors embeddings are read (no pickle)")
    try:
        data = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ErasekitError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None
    tensors = [t for t in data.values() if isinstance(t, torch.Tensor)]
    if len(tensors) != 1 or tensors[0].numel() == 0:
        raise ErasekitError(f"{path}: expected one embedding vector, found {len(tensors)} tensors")
    return tensors[0].reshape(-1, tensors[0].shape[-1])[0]


class NegativeEmbedding(Method):
    name = "negative-embedding"
    Config = NegativeEmbeddingConfig
    needs_images = True
    uses_text_encoder = True

    def prepare_data(self, pipe) -> dict[str, Split]:
        cfg = self.config
        if getattr(pipe, "erasekit_guidance", None) is not None:
            raise ErasekitError(f"{self.model_path} already carries {GUIDANCE_FILE}; learn the "
                                "embedding on the unguided model folder")  # fmt: skip
        images = self._concept_images(pipe)
        self.tokenizer = copy.deepcopy(pipe.tokenizer)
        if self.tokenizer.add_tokens(cfg.token) != 1:
            raise ErasekitError(f"token {cfg.token} is already in the vocabulary")
        self.token_id = self.tokenizer.convert_tokens_to_ids(cfg.token)
        words = [w.strip() for w in (cfg.words or self.concept.name).split(",") if w.strip()]
        self.init_word = cfg.init_word or re.split(r"[\s-]+", words[0])[0]
        prompts = [substitute(p, words, cfg.token) for p in images.prompts]
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        self.data_info = {
            "forget": images.describe(),
            "token": cfg.token,
            "words": words,
            "init_word": self.init_word,
            "embedding_init": cfg.embedding or f"mean of '{self.init_word}'",
            "prompts": "forget prompts with the words replaced by the token",
        }
        latents = encode_images(pipe, images)
        return {"forget": Split(prompts=prompts, cond=None, latents=latents, ids=ids)}

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

    def trained_module(self, pipe) -> TokenEmbedding:
        table = pipe.text_encoder.get_input_embeddings().weight
        if self.config.embedding:
            init = load_embedding(self.config.embedding)
            if init.shape[-1] != table.shape[1]:
                raise ErasekitError(f"{self.config.embedding}: a {init.shape[-1]}-d embedding; "
                                    f"this text encoder needs {table.shape[1]}")  # fmt: skip
        else:
            init_ids = pipe.tokenizer(self.init_word, add_special_tokens=False).input_ids
            init = table[init_ids].detach().mean(0)
        placeholder = pipe.tokenizer(self.init_word, add_special_tokens=False).input_ids[0]
        self.embedding = TokenEmbedding(init, self.token_id, placeholder)
        return self.embedding

    def loss(self, ctx: TrainContext, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = ctx.batch("forget", micro)
        latents = batch["latents"]
        x_t, t, noise = ctx.noisy(latents, ctx.generator(micro))
        vector = ctx.trained()
        cond = self.embedding.encode(ctx.pipe.text_encoder, batch["ids"], vector)
        pred = ctx.unet(x_t, t, cond.to(ctx.weight_dtype)).sample
        loss = F.mse_loss(pred.float(), ctx.denoising_target(latents, noise, t).float())
        return loss, {"embedding_norm": float(vector.detach().norm())}

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        from erasekit.outputs import write_json

        vector = self.embedding.vector.detach().float().cpu().clone()
        save_file({self.config.token: vector}, str(folder / EMBEDDING_FILE))
        guidance = guidance_config(self.config)
        write_json(folder / GUIDANCE_FILE, guidance)
        return {"embedding": EMBEDDING_FILE, "guidance": guidance,
                "embedding_norm": float(vector.norm())}  # fmt: skip
