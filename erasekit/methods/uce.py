"""UCE: unified concept editing, a closed-form edit of the cross-attention projections.

For every cross-attention ``to_k`` / ``to_v`` matrix W (text width d -> out):

    W' = (λW + s_e Σ_i v*_i c_iᵀ + s_p Σ_j (W c_j) c_jᵀ)
         · (λI + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹

with c_i the text embeddings of the concepts to erase, v*_i = W g_i the projection of the guide
concept each maps to, and c_j the embeddings of concepts to preserve. An embedding is the text
encoder's hidden state at the text's last token before end-of-text (the UCE code's choice; for
the empty guide "" that is the start token): ``tokens: last``. With ``tokens: all`` the erased
embeddings are every token of the concept's forget prompts from the concept word on (a causal
text encoder carries the word into every later token), each mapped to the aligned token of the
same prompt with the word replaced by its guide, and every token of the preserved texts is
kept. ``tokens: padded`` does the same over every position the U-Net attends to: the padding
after end-of-text too, which a causal encoder fills with states that still carry the word.
``tokens: sequence`` maps every position of each erased word's padded encoding to the same
position of its guide's (the RECE and SPEED code's choice for nudity).
Solved in float64 and written as a normal erased folder through the shared loop, which
runs no optimizer step (``steps`` is 0).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from erasekit.config import one_per, split_list
from erasekit.errors import ErasekitError
from erasekit.methods import Method
from erasekit.training import TrainConfig, TrainContext

PROJECTIONS = ("attn2.to_k", "attn2.to_v")
TOKENS = ("last", "all", "padded", "sequence")


@dataclass
class UCEConfig(TrainConfig):
    steps: int = 0  # closed form: the loop runs no optimizer step
    erase: str = ""  # comma-separated concepts to erase; "" = the concept's name
    guide: str = ""  # what erased concepts map to: one text, or one per erased concept
    preserve: str = ""  # comma-separated concepts kept as they are; "" = the retain prompts
    lam: float = 0.5  # λ: weight of the current W
    erase_scale: float = 1.0  # s_e
    preserve_scale: float = 1.0  # s_p
    max_preserve: int = 256  # at most this many preserved texts (the first ones)
    tokens: str = "last"  # last: each text's last token (UCE); all / padded / sequence: above

    def validate(self) -> None:
        super().validate()
        if self.steps != 0:
            raise ErasekitError("uce is a closed-form edit: steps must be 0")
        if not self.lam > 0:
            raise ErasekitError(
                f"lam must be positive (it keeps the edit invertible), got {self.lam}"
            )
        for key in ("erase_scale", "preserve_scale"):
            if getattr(self, key) < 0:
                raise ErasekitError(f"{key} must be non-negative, got {getattr(self, key)}")
        if self.max_preserve < 0:
            raise ErasekitError("max_preserve must be non-negative")
        if self.tokens not in TOKENS:
            raise ErasekitError(f"tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}")


@torch.no_grad()
def concept_embeddings(pipe, texts: list[str]) -> torch.Tensor:
    """(n, d) float64: each text's hidden state at its last token before end-of-text."""
    from erasekit.training import condition_width, encode_prompts

    if not texts:
        return torch.zeros((0, condition_width(pipe)), dtype=torch.float64)
    hidden = encode_prompts(pipe, texts)
    lengths = [len(pipe.tokenizer(t, truncation=True).input_ids) for t in texts]
    index = torch.tensor([max(0, n - 2) for n in lengths])
    return hidden[torch.arange(len(texts)), index].double().cpu()


@torch.no_grad()
def token_embeddings(pipe, texts: list[str], padded: bool = False) -> torch.Tensor:
    """(n, d) float64: the hidden states of every token (start to end-of-text; ``padded``: the
    padding too) of every text."""
    from erasekit.training import condition_width, encode_prompts

    if not texts:
        return torch.zeros((0, condition_width(pipe)), dtype=torch.float64)
    hidden = encode_prompts(pipe, texts).double().cpu()  # one batched pass
    if padded:
        return hidden.flatten(0, 1)
    lengths = [len(ids) for ids in pipe.tokenizer(texts, truncation=True).input_ids]
    return torch.cat([h[:n] for h, n in zip(hidden, lengths, strict=True)])


@torch.no_grad()
def sequence_pairs(pipe, words: list[str], guides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(erase, guide) rows for ``tokens: sequence``: every position of each word's padded
    encoding beside the same position of its guide's."""
    from erasekit.training import encode_prompts

    hidden = encode_prompts(pipe, [*words, *guides]).double().cpu()
    return hidden[: len(words)].flatten(0, 1), hidden[len(words) :].flatten(0, 1)


@torch.no_grad()
def aligned_token_pairs(
    pipe,
    prompts: list[str],
    words: list[str],
    guides: list[str],
    padded: bool = False,
    skip_word: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(erase, guide) rows for ``tokens: all``: in each prompt, every token from the first erased
    word on, and the aligned token of the prompt with every erased word it holds replaced by
    its guide (tokens after the word align from the prompt's end; the word's extra tokens map
    to the guide's first token, or to the token before the word when the guide is empty);
    ``padded``: through the padding positions too; ``skip_word``: the word's own tokens left
    out (MACE's surrounding words)."""
    from erasekit.training import encode_prompts

    erase, guide = [], []
    for prompt in prompts:
        held = [(w, g) for w, g in zip(words, guides, strict=True)
                if re.search(rf"\b{re.escape(w)}\b", prompt, re.IGNORECASE)]  # fmt: skip
        if not held:
            continue
        replaced, target = prompt, held[0][1]
        for word, guide_text in held:  # every erased word the prompt holds
            replaced = re.sub(rf"\b{re.escape(word)}\b", guide_text, replaced, flags=re.IGNORECASE)
        replaced = " ".join(replaced.split())
        ids_p = pipe.tokenizer(prompt, truncation=True).input_ids
        ids_g = pipe.tokenizer(replaced, truncation=True).input_ids
        if ids_p == ids_g:
            continue
        h_p, h_g = encode_prompts(pipe, [prompt, replaced]).double().cpu()
        pairs = zip(ids_p, ids_g, strict=False)
        start = next(i for i, (a, b) in enumerate(pairs) if a != b)
        shift = len(ids_p) - len(ids_g)  # the word's tokens minus the guide's
        end = len(h_p) if padded else len(ids_p)
        last = len(h_g) - 1 if padded else len(ids_g) - 1
        suffix = 0  # tokens shared at the end (the words after the replaced one, EOT)
        while (
            suffix < min(len(ids_p), len(ids_g)) - start
            and ids_p[-1 - suffix] == ids_g[-1 - suffix]
        ):
            suffix += 1
        for j in range(start, end):
            if skip_word and j < len(ids_p) - suffix:  # the word's own tokens
                continue
            k = j - shift
            if k < start:  # the word's own tokens
                k = start - 1 if shift > 0 and not target else start
            erase.append(h_p[j])
            guide.append(h_g[min(max(k, 0), last)])
    if not erase:
        raise ErasekitError(f"uce tokens=all/padded: no forget prompt contains {', '.join(words)}")
    return torch.stack(erase), torch.stack(guide)


def projection_parameters(unet, suffixes: tuple[str, ...] = PROJECTIONS):
    """(name, weight) of every cross-attention projection ending in ``suffixes``: what the
    closed-form editors (UCE, RECE, SPEED, MACE) change."""
    return [(n, p) for n, p in unet.named_parameters()
            if n.removesuffix(".weight").endswith(suffixes)]  # fmt: skip


def least_squares_edit(
    anchor: torch.Tensor,
    lam: float,
    terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor:
    """The closed-form W' (float64) minimising λ‖W' − anchor‖² + Σ s‖W' k − W_t g‖² over each
    term (W_t, keys K, sources G, s): rows of K map to ``W_t`` applied to the rows of G, i.e.
    ``W' = (λ·anchor + Σ s W_t GᵀK)(λI + Σ s KᵀK)⁻¹`` (UCE, RECE, MACE)."""
    anchor = anchor.double()
    lhs = lam * anchor
    gram = lam * torch.eye(anchor.shape[1], dtype=torch.float64)
    for w_t, keys, sources, scale in terms:
        lhs = lhs + scale * (sources @ w_t.double().T).T @ keys
        gram = gram + scale * keys.T @ keys
    # W' = lhs · gram⁻¹, and gram is symmetric: solve gram · W'ᵀ = lhsᵀ.
    return torch.linalg.solve(gram, lhs.T).T


def uce_edit(
    w: torch.Tensor,
    erase: torch.Tensor,
    guide: torch.Tensor,
    preserve: torch.Tensor,
    *,
    lam: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """The closed-form W' (float64) for one projection ``w`` (out, d); rows of ``erase`` map to
    ``w @ guide`` rows, rows of ``preserve`` keep ``w @ c``."""
    terms = [(w, erase, guide, erase_scale), (w, preserve, preserve, preserve_scale)]
    return least_squares_edit(w, lam, terms)


class UCE(Method):
    name = "uce"
    summary = (
        "closed-form edit of the cross-attention keys and values that map the concept elsewhere"
    )
    source = "Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024"
    Config = UCEConfig
    closed_form = True
    runs_on_sdxl = True  # a closed-form edit of to_k/to_v on the concatenated conditions

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        if concept.scale == "world":
            return cls.world_preset()
        return {"guide": "art"} if concept.kind == "style" else {}

    def texts(self) -> tuple[list[str], list[str], list[str]]:
        """(erase, guide, preserve) texts from the settings and the concept."""
        cfg: UCEConfig = self.config
        erase = split_list(cfg.erase) or self.concept.words
        guides = one_per(split_list(cfg.guide) or [""], erase, owner="uce",
                         what="guide texts", per="erased concepts")  # fmt: skip
        preserve = split_list(cfg.preserve) or list(self.concept.retain.prompts)
        overlap = sorted(set(preserve) & set(erase))
        if overlap:
            raise ErasekitError(f"uce: {overlap[0]!r} is both erased and preserved")
        return erase, guides, preserve[: cfg.max_preserve]

    def prepare_data(self, pipe):
        erase, guides, preserve = self.texts()
        if self.config.tokens == "sequence":
            rows, targets = sequence_pairs(pipe, erase, guides)
            kept = token_embeddings(pipe, preserve, padded=True)
        elif self.config.tokens in ("all", "padded"):
            forget, padded = list(self.concept.forget.prompts), self.config.tokens == "padded"
            rows, targets = aligned_token_pairs(pipe, forget, erase, guides, padded=padded)
            kept = token_embeddings(pipe, preserve, padded=padded)
        else:
            rows, targets = concept_embeddings(pipe, erase), concept_embeddings(pipe, guides)
            kept = concept_embeddings(pipe, preserve)
        self.embeddings = {"erase": rows, "guide": targets, "preserve": kept}
        self.data_info = {"erase": erase, "guide": guides, "preserve": preserve,
                          "tokens": self.config.tokens, "n_erase_rows": len(rows),
                          "n_preserve_rows": len(kept)}  # fmt: skip
        return {}

    def trainable_parameters(self, unet):
        return projection_parameters(unet)

    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        """The edit itself, on every process alike (it is deterministic)."""
        cfg: UCEConfig = self.config
        started = time.perf_counter()
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        edited = 0
        for name, module in unet.named_modules():
            if not name.endswith(PROJECTIONS):
                continue
            e = self.embeddings
            new = uce_edit(module.weight.detach().cpu(), e["erase"], e["guide"], e["preserve"],
                           lam=cfg.lam, erase_scale=cfg.erase_scale,
                           preserve_scale=cfg.preserve_scale)  # fmt: skip
            module.weight.copy_(new.to(module.weight))
            edited += 1
        if not edited:
            raise ErasekitError("uce: the U-Net has no cross-attention to_k/to_v projections")
        self.edit_info = {"projections_edited": edited,
                          "edit_seconds": round(time.perf_counter() - started, 3)}  # fmt: skip

    def write_outputs(self, folder) -> dict[str, Any]:
        return dict(self.edit_info)
