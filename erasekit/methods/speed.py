"""SPEED: a closed-form erasure edit confined to the null space of the retained concepts.

For every cross-attention value (``params: V``; ``K`` / ``KV`` also) matrix W (out × d), with
t_i the erased rows, a_i their anchors' rows, ``C_tt = mean t tᵀ`` and ``C_at = mean a tᵀ``:

- the unconstrained erase direction ``ΔW₀ = W(C_at − C_tt)(I + C_tt)⁻¹`` ranks the retained rows
  by how much it moves them; IPF (influence-based prior filtering) keeps the rows above the
  mean, DPA (directed prior augmentation) adds ``aug_num`` copies of each kept row moved along
  W's least-amplified input direction (the right singular vector of its smallest singular
  value) by a standard normal step, keeping those moved more than their mean;
- P projects onto the eigenvectors of ``R = mean r rᵀ`` (the refined retained rows) with
  eigenvalue below ``threshold`` (the approximate null space);
- IEC (invariant equality constraints): the start row of "" and three k-means centroids of
  its other rows (K₂) stay exactly where they are (``iec_lam`` 0) or nearly (> 0);
- ``ΔW = W(C_at − C_tt) P [I − M K₂(K₂ᵀ P M K₂ + λI)⁻¹ K₂ᵀ P] M`` with
  ``M = (C_tt P + αI)⁻¹`` (α = ``retain_scale``): the minimiser of
  ``mean ‖(W + ΔW)t − W a‖² + α‖ΔW‖²`` over updates with ``ΔW r = 0`` for every r with
  ``P r = 0`` and ``ΔW K₂ = 0``.

Rows (``tokens``): ``last`` = each text's last token before end-of-text (SPEED's choice);
``sequence`` = every position of the concept word's padded encoding beside the guide's
(SPEED's nudity mode, start row included); ``all`` / ``padded`` = UCE's aligned tokens of the
forget prompts. One solve per matrix erases every concept at once. Where this differs from
the public code (Ouxiang-Li/SPEED): the retained rows default to the concept's retain prompts,
not a name list, and the DPA step's scale (1 per unit singular vector) is stated here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from erasekit.config import one_per, split_list
from erasekit.errors import ErasekitError
from erasekit.methods import Method
from erasekit.methods.uce import (
    aligned_token_pairs,
    concept_embeddings,
    projection_parameters,
    sequence_pairs,
    token_embeddings,
)
from erasekit.training import TrainConfig, TrainContext

PARAMS = {"V": ("attn2.to_v",), "K": ("attn2.to_k",), "KV": ("attn2.to_k", "attn2.to_v")}
TOKENS = ("last", "sequence", "all", "padded")


@dataclass
class SPEEDConfig(TrainConfig):
    steps: int = 0  # closed form: the loop runs no optimizer step
    erase: str = ""  # comma-separated concepts to erase; "" = the concept's name(s)
    guide: str = ""  # the anchor each maps to: one text, or one per erased concept
    preserve: str = ""  # comma-separated retained texts; "" = the retain prompts
    max_preserve: int = 256  # at most this many retained texts (the first ones)
    params: str = "V"  # V, K or KV: which cross-attention projections are edited
    tokens: str = "last"  # last | sequence | all | padded (see the module docstring)
    retain_scale: float = 1.0  # α
    threshold: float = 0.1  # τ: eigenvalues of R below it span the null space
    iec_lam: float = 0.0  # λ of the invariant equality constraints (0: exact)
    aug_num: int = 10  # DPA: perturbed copies per kept retained row (0: no augmentation)
    prior_filter: bool = True  # IPF: keep the retained rows the edit moves most
    iec: bool = True  # keep the empty prompt's rows (K₂) invariant

    def validate(self) -> None:
        super().validate()
        if self.steps != 0:
            raise ErasekitError("speed is a closed-form edit: steps must be 0")
        if self.params not in PARAMS:
            raise ErasekitError(f"params must be one of {', '.join(PARAMS)}, got {self.params!r}")
        if self.tokens not in TOKENS:
            raise ErasekitError(f"tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}")
        if not self.retain_scale > 0:
            raise ErasekitError(f"retain_scale must be positive, got {self.retain_scale}")
        for key in ("threshold", "iec_lam", "aug_num", "max_preserve"):
            if getattr(self, key) < 0:
                raise ErasekitError(f"{key} must be non-negative, got {getattr(self, key)}")


def refine_prior(
    w: torch.Tensor, retained: torch.Tensor, delta0: torch.Tensor, *, prior_filter: bool,
    aug_num: int, generator: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    """IPF then DPA (module docstring): the retained rows the null space is built from."""
    kept = retained
    if prior_filter and len(retained) > 1:
        moved = (retained @ delta0.T).norm(dim=1)
        kept = retained[moved > moved.mean()]
    if not aug_num or not len(kept):
        return kept
    v_min = torch.linalg.svd(w, full_matrices=True).Vh[-1]  # W's least-amplified direction
    steps = torch.randn((len(kept), aug_num), generator=generator, dtype=torch.float64)
    moved_rows = (kept[:, None, :] + steps[..., None] * v_min).reshape(-1, w.shape[1])
    moved = (moved_rows @ delta0.T).norm(dim=1)
    return torch.cat([kept, moved_rows[moved > moved.mean()]])


def null_space_projector(rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """(d, d) projector onto the eigenvectors of mean r rᵀ with eigenvalue below threshold."""
    d = rows.shape[1]
    if not len(rows):
        return torch.eye(d, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(rows.T @ rows / len(rows))
    small = vectors[:, values < threshold]
    return small @ small.T


def speed_update(
    w: torch.Tensor, c_tt: torch.Tensor, c_at: torch.Tensor, p: torch.Tensor, k2: torch.Tensor,
    *, alpha: float, lam: float,
) -> torch.Tensor:  # fmt: skip
    """ΔW (float64) for one matrix: ``W(C_at − C_tt) P [I − M K₂(K₂ᵀPMK₂ + λI)⁻¹K₂ᵀP] M``,
    ``M = (C_tt P + αI)⁻¹``; K₂ columns P already annihilates need no constraint."""
    d = w.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    m = torch.linalg.inv(c_tt @ p + alpha * eye)
    residual = w.double() @ (c_at - c_tt) @ p
    if k2.shape[1]:
        k2 = k2[:, (p @ k2).norm(dim=0) > 1e-9 * k2.norm(dim=0).clamp_min(1e-30)]
    if not k2.shape[1]:
        return residual @ m
    g = k2.T @ p @ m @ k2 + lam * torch.eye(k2.shape[1], dtype=torch.float64)
    return residual @ (eye - m @ k2 @ torch.linalg.solve(g, k2.T @ p)) @ m


def kmeans_rows(rows: torch.Tensor, k: int, iterations: int = 25) -> torch.Tensor:
    """(k, d) centroids of ``rows`` by Lloyd's algorithm from evenly spaced rows."""
    k = min(k, len(rows))
    centres = rows[torch.linspace(0, len(rows) - 1, k).long()].clone()
    for _ in range(iterations):
        owner = torch.cdist(rows, centres).argmin(dim=1)
        for j in range(k):
            if (owner == j).any():
                centres[j] = rows[owner == j].mean(dim=0)
    return centres


class SPEED(Method):
    name = "speed"
    summary = "closed-form edit of cross-attention values in the retained concepts' null space"
    source = (
        "Li et al., SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion"
        " Models, ICLR 2026"
    )
    Config = SPEEDConfig
    closed_form = True
    runs_on_sdxl = True

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        if concept.scale == "world":
            return cls.world_defaults(concept)
        return {"guide": "art"} if concept.kind == "style" else {}

    def prepare_data(self, pipe):
        from erasekit.training import encode_prompts

        cfg: SPEEDConfig = self.config
        erase = split_list(cfg.erase) or self.concept.words
        guides = one_per(split_list(cfg.guide) or [""], erase, owner="speed",
                         what="guide texts", per="erased concepts")  # fmt: skip
        preserve = split_list(cfg.preserve) or list(self.concept.retain.prompts)
        preserve = [p for p in preserve if p not in erase][: cfg.max_preserve]
        if cfg.tokens in ("all", "padded"):
            forget = list(self.concept.forget.prompts)
            rows, anchors = aligned_token_pairs(pipe, forget, erase, guides,
                                                padded=cfg.tokens == "padded")  # fmt: skip
        elif cfg.tokens == "sequence":
            rows, anchors = sequence_pairs(pipe, erase, guides)
        else:
            rows, anchors = concept_embeddings(pipe, erase), concept_embeddings(pipe, guides)
        kept = (concept_embeddings(pipe, preserve) if cfg.tokens == "last"
                else token_embeddings(pipe, preserve, padded=cfg.tokens != "all"))  # fmt: skip
        empty = encode_prompts(pipe, [""])[0].double().cpu()
        k2 = torch.cat([empty[:1], kmeans_rows(empty[1:], 3)]).T if cfg.iec else empty[:0].T
        self.rows = {"erase": rows, "anchor": anchors, "preserve": kept, "k2": k2}
        self.data_info = {"erase": erase, "guide": guides, "preserve": preserve,
                          "tokens": cfg.tokens, "n_erase_rows": len(rows),
                          "n_preserve_rows": len(kept)}  # fmt: skip
        return {}

    def trainable_parameters(self, unet):
        return projection_parameters(unet, PARAMS[self.config.params])

    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        """The edit itself, on every process alike (deterministic, DPA's draws seeded)."""
        cfg: SPEEDConfig = self.config
        started = time.perf_counter()
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        r = self.rows
        t, a = r["erase"], r["anchor"]
        c_tt, c_at = t.T @ t / len(t), a.T @ t / len(t)
        eye = torch.eye(t.shape[1], dtype=torch.float64)
        gen = torch.Generator().manual_seed(cfg.seed)
        edited, null_dims = 0, []
        for name, module in unet.named_modules():
            if not name.endswith(PARAMS[cfg.params]):
                continue
            w = module.weight.detach().cpu().double()
            delta0 = w @ (c_at - c_tt) @ torch.linalg.inv(eye + c_tt)
            prior = refine_prior(w, r["preserve"], delta0, prior_filter=cfg.prior_filter,
                                 aug_num=cfg.aug_num, generator=gen)  # fmt: skip
            p = null_space_projector(prior, cfg.threshold)
            delta = speed_update(w, c_tt, c_at, p, r["k2"], alpha=cfg.retain_scale,
                                 lam=cfg.iec_lam)  # fmt: skip
            module.weight.copy_((w + delta).to(module.weight))
            edited += 1
            null_dims.append(round(torch.trace(p).item()))
        if not edited:
            raise ErasekitError(f"speed: the U-Net has no {' / '.join(PARAMS[cfg.params])}")
        seconds = time.perf_counter() - started
        n = len(self.data_info["erase"])
        self.edit_info = {"projections_edited": edited, "edit_seconds": round(seconds, 4),
                          "seconds_per_concept": round(seconds / n, 4), "n_concepts": n,
                          "null_space_dims": null_dims}  # fmt: skip

    def write_outputs(self, folder) -> dict[str, Any]:
        return dict(self.edit_info)
