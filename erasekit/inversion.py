"""Textual inversion on the shared loop: one new token c*, every weight frozen,

    min_c*  E ||target - pred_theta(z_t, t, enc(prompt with c*))||^2

over images of a concept, with the prompts' concept words replaced by the token. Used by the
concept-inversion attack (c* learned against the model under attack) and by the
negative-embedding defence (c* learned as a negative prompt).

One rule for each choice, both users alike:
- the token replaces every listed word of a prompt (longest first; a prompt without one gets
  the token prefixed);
- c* starts as the mean input embedding of the sub-word tokens of the first listed word, whole
  (``van gogh`` → mean of ``van`` and ``gogh``), unless ``init_word`` names another;
- the learning rate is ``lr`` x batch x accumulation x processes when ``scale_lr`` is on (the
  public textual-inversion scripts' rule; with batch 1 it is ``lr`` itself);
- the text encoder's weights and vocabulary are never changed: c* is spliced into its input
  embeddings at the token's positions.
The learned vector is saved in diffusers' textual-inversion format (``load_textual_inversion``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError
from erasekit.training import (
    Split,
    TrainConfig,
    TrainContext,
    TrainingJob,
    encode_images,
    token_ids,
)

EMBEDDING_FILE = "learned_embeds.safetensors"


@dataclass
class InversionConfig(TrainConfig):
    """Loop settings plus the token and its words."""

    lr: float = 5e-3
    scale_lr: bool = True  # lr x batch x accumulation x processes
    max_grad_norm: float = 0.0  # textual inversion: no clipping
    optimizer: str = "adamw"
    token: str = "<concept>"
    init_word: str = ""  # "": the first listed word, whole
    words: str = ""  # comma-separated words the token replaces ("": the concept's name)

    def validate(self) -> None:
        super().validate()
        if not re.fullmatch(r"<[\w-]+>", self.token):
            raise ErasekitError(f"token must look like <name>, got {self.token!r}")


def concept_words(config: InversionConfig, concept) -> list[str]:
    """The words the token replaces: ``words``, else the concept's name."""
    words = [w.strip() for w in (config.words or concept.name).split(",") if w.strip()]
    if not words:
        raise ErasekitError("textual inversion: no word for the token to replace")
    return words


def substitute(prompt: str, words: list[str], token: str) -> str:
    """``prompt`` with every listed word replaced by ``token`` (or the token prefixed)."""
    out = prompt
    for w in sorted(words, key=len, reverse=True):
        out = re.sub(rf"\b{re.escape(w)}\b", token, out, flags=re.I)
    return out if out != prompt else f"{token}, {prompt}"


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


def save_embedding(folder: Path, token: str, vector: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / EMBEDDING_FILE
    save_file({token: vector.detach().float().cpu().clone()}, str(path))
    return path


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


def install_token(pipe, token: str, vector: torch.Tensor) -> None:
    """Make ``pipe`` render prompts holding ``token`` with ``vector`` (adds the token once,
    then only updates its row): for evaluating a learned embedding while it trains."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    if token not in tok.get_vocab():
        tok.add_tokens(token)
        te.resize_token_embeddings(len(tok))
    with torch.no_grad():
        table = te.get_input_embeddings().weight
        table[tok.convert_tokens_to_ids(token)] = vector.detach().to(table)


class TextualInversion(TrainingJob):
    """The shared job: a subclass supplies the concept images (``inversion_images``) and,
    optionally, a starting vector (``initial_embedding``); the trained module is the token."""

    name = "textual-inversion"
    Config = InversionConfig
    needs_images = True
    uses_text_encoder = True
    saves_model = False

    def inversion_images(self, pipe):
        """The ImageSet of the concept to invert."""
        raise NotImplementedError

    def initial_embedding(self, width: int) -> torch.Tensor | None:
        """A starting vector instead of the init word's embedding (None: the init word)."""
        return None

    def learning_rate(self, num_processes: int) -> float:
        cfg = self.config
        if not cfg.scale_lr:
            return cfg.lr
        return cfg.lr * cfg.batch_size * cfg.gradient_accumulation_steps * num_processes

    def prepare_data(self, pipe) -> dict[str, Split]:
        cfg = self.config
        images = self.inversion_images(pipe)
        self.tokenizer = copy.deepcopy(pipe.tokenizer)
        if self.tokenizer.add_tokens(cfg.token) != 1:
            raise ErasekitError(f"token {cfg.token} is already in the vocabulary")
        self.token_id = self.tokenizer.convert_tokens_to_ids(cfg.token)
        self.words = concept_words(cfg, self.concept)
        self.init_word = cfg.init_word or self.words[0]
        prompts = [substitute(p, self.words, cfg.token) for p in images.prompts]
        ids = token_ids(self.tokenizer, prompts)
        self.data_info = {
            "forget": images.describe(),
            "token": cfg.token,
            "words": self.words,
            "init_word": self.init_word,
            "prompts": "the concept's prompts with the words replaced by the token",
        }
        self.n_images = len(images)
        latents = encode_images(pipe, images)
        return {"forget": Split(prompts=prompts, cond=None, latents=latents, ids=ids)}

    def trained_module(self, pipe) -> TokenEmbedding:
        table = pipe.text_encoder.get_input_embeddings().weight
        init_ids = pipe.tokenizer(self.init_word, add_special_tokens=False).input_ids
        if not init_ids:
            raise ErasekitError(f"init word {self.init_word!r} has no tokens")
        init = self.initial_embedding(table.shape[1])
        if init is None:
            init = table[init_ids].detach().mean(0)
        self.data_info["embedding_init"] = self.data_info.get("embedding_init") or (
            f"mean input embedding of '{self.init_word}'"
        )
        self.embedding = TokenEmbedding(init, self.token_id, init_ids[0])
        return self.embedding

    def loss(self, ctx: TrainContext, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = ctx.batch("forget", micro)
        latents = batch["latents"]
        x_t, t, noise = ctx.noisy(latents, ctx.item_generators(micro))
        vector = ctx.trained()
        cond = self.embedding.encode(ctx.pipe.text_encoder, batch["ids"], vector)
        pred = ctx.unet(x_t, t, cond.to(ctx.weight_dtype)).sample
        loss = F.mse_loss(pred.float(), ctx.denoising_target(latents, noise, t).float())
        return loss, {"embedding_norm": float(vector.detach().norm())}

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        vector = self.embedding.vector
        save_embedding(folder, self.config.token, vector)
        return {"embedding": EMBEDDING_FILE, "embedding_norm": float(vector.detach().norm())}
