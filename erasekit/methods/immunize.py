"""Condition-number immunization: make fine-tuning toward the concept ill-conditioned while
benign fine-tuning stays well-conditioned, on top of an erasure loss.

For a linear layer trained with a squared loss the Hessian is the covariance of its inputs, so
gradient descent on it converges at a rate set by that covariance's condition number κ. In a
text-to-image U-Net every cross-attention to_k / to_v projection reads the text encoder's
hidden states: an attacker who fine-tunes those projections on the concept's prompts solves a
regression whose Hessian is S = ΦᵀΦ / m over the prompts' token features Φ (m rows: every
token position of every prompt, as the projections see them). The text encoder is the feature
extractor to immunize, the projections are the head the attacker adapts.

With K the feature width, the regularisers (the seed paper's, on S / m divided by the original
encoder's RMS eigenvalue ‖S_0‖_F / √K of the same set, so that λ1 and λ2 do not depend on the
encoder's feature scale):
- r1(S_benign) = ½ σ_max(S)² − ‖S‖_F² / (2K): small when the benign covariance is well
  conditioned (keeps benign fine-tuning fast);
- r2(S_harm) = 1 / (‖S‖_F² / (2K) − ½ σ_min(S)²): small when σ_min is small against the
  covariance's overall size (makes fine-tuning on the concept slow).
Eigenvalues come from float64 symmetric eigensolvers (``torch.linalg.eigvalsh``), in the span
of the original encoder's features: directions in which they do not vary at all (below
``span_tolerance`` of the largest variance; a final LayerNorm leaves one) carry no information a
fine-tuning step could use and would make every κ infinite, so they are left out. The text
encoder (its last ``encoder_layers`` transformer layers and final norm) is trained on
``feature_weight`` · MSE(benign features, the original encoder's) + λ1·r1 + λ2·r2, the first
term being the extractor's task (keep the benign conditioning the U-Net was trained on). The
U-Net is trained at the same time by the erasure loss of ``base`` (ga | esd | salun) plus
ResAlign's retain distillation, exactly as ResAlign's outer objective with ``lam`` = 0; ``lam``
> 0 adds ResAlign's resilience term too (immunization and ResAlign together).

Logged every step: κ of both covariances and the relative immunization ratio
[κ(A_harm)/κ(X_harm)] / [κ(A_benign)/κ(X_benign)], A the immunized encoder's features and X the
ORIGINAL encoder's (the public deep-net code divides by the immunized model's own features,
which makes the ratio 1 by construction; erasekit does not).

Departures: the seed paper immunizes a feature extractor for linear probes; here the erasure
loss and the U-Net's retain distillation are added. The erasure loss reads the original
encoder's features (precomputed); in the retain distillation the teacher reads the original
encoder's features and the trained U-Net the immunized encoder's current ones (no gradient to
the encoder), so the U-Net keeps its retain outputs under the features it ships with. The
attacker in the audit fine-tunes the whole U-Net
(full or LoRA, with Adam) rather than a linear head by gradient descent.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError
from erasekit.methods.resalign.config import ResAlignConfig
from erasekit.methods.resalign.method import ResAlign
from erasekit.training import Split, TrainContext, step_generator, token_ids

TEXT_PREFIX = "text_encoder."


@dataclass
class ImmunizeConfig(ResAlignConfig):
    lam: float = 0.0  # ResAlign's resilience weight; 0 = immunization over the base alone
    lambda_benign: float = 0.1  # λ1, weight of r1 (benign covariance well conditioned)
    lambda_harm: float = 1.0  # λ2, weight of r2 (harmful covariance ill conditioned)
    feature_weight: float = 10.0  # the encoder's task: benign features stay the original's
    encoder_layers: int = 1  # trainable: the last N text-encoder layers and its final norm
    covariance_prompts: int = 0  # prompts per set and step for the covariances; 0 = all
    span_tolerance: float = 1e-6  # feature directions with variance below this share: left out
    singular_tolerance: float = 1e-12  # σ_min/σ_max of an ORIGINAL covariance below: refuse

    def validate(self) -> None:
        super().validate()
        for key in ("lambda_benign", "lambda_harm", "feature_weight"):
            if not getattr(self, key) >= 0:
                raise ErasekitError(f"{key} must be non-negative")
        if self.encoder_layers < 0:
            raise ErasekitError("encoder_layers must be 0 (final norm only) or more")
        if self.covariance_prompts < 0:
            raise ErasekitError("covariance_prompts must be 0 (all) or positive")
        for key in ("span_tolerance", "singular_tolerance"):
            if not 0 <= getattr(self, key) < 1:
                raise ErasekitError(f"{key} must be in [0, 1)")


# --- the linear algebra ----------------------------------------------------------------------


def feature_covariance(features: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """S = ΦᵀΦ / m in float64 over every row of ``features`` (…, K), in ``basis`` (K × K')
    coordinates when given."""
    phi = features.reshape(-1, features.shape[-1]).double()
    if basis is not None:
        phi = phi @ basis
    return phi.T @ phi / phi.shape[0]


def feature_span(s: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Orthonormal basis (K × K') of the eigenvectors of ``s`` with eigenvalue ≥ tolerance ·
    σ_max: the directions in which the features vary at all."""
    values, vectors = torch.linalg.eigh(0.5 * (s + s.T).double())
    return vectors[:, values >= tolerance * values[-1]]


def extreme_eigenvalues(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_min, σ_max) of a symmetric PSD matrix (float64 symmetric eigensolver)."""
    values = torch.linalg.eigvalsh(0.5 * (s + s.T).double())
    return values[0].clamp_min(0.0), values[-1]


def condition_number(s: torch.Tensor) -> float:
    """κ(S) = σ_max / σ_min (inf for a singular matrix)."""
    lo, hi = extreme_eigenvalues(s.detach())
    return float(hi / lo) if lo > 0 else float("inf")


def benign_regulariser(s: torch.Tensor) -> torch.Tensor:
    """r1 = ½σ_max(S)² − ‖S‖_F²/(2K) (≥ 0, small when S is well conditioned)."""
    _, hi = extreme_eigenvalues(s)
    return 0.5 * hi**2 - s.pow(2).sum() / (2 * s.shape[0])


def harmful_regulariser(s: torch.Tensor) -> torch.Tensor:
    """r2 = 1 / (‖S‖_F²/(2K) − ½σ_min(S)²) (small when σ_min is small against S's size)."""
    lo, _ = extreme_eigenvalues(s)
    return 1.0 / (s.pow(2).sum() / (2 * s.shape[0]) - 0.5 * lo**2).clamp_min(1e-300)


def check_conditioned(s: torch.Tensor, tolerance: float, what: str) -> None:
    lo, hi = extreme_eigenvalues(s.detach())
    if not hi > 0 or lo / hi < tolerance:
        raise ErasekitError(
            f"immunize: the original {what} feature covariance is singular beyond tolerance "
            f"(σ_min/σ_max = {float(lo / hi) if hi > 0 else 0.0:.3g} < {tolerance:g}); use "
            "more prompts or set singular_tolerance"
        )


def immunization_ratio(k_harm: float, k_harm_0: float, k_benign: float, k_benign_0: float):
    """[κ(A_harm)/κ(X_harm)] / [κ(A_benign)/κ(X_benign)]: > 1 when the harmful conditioning
    worsened more than the benign one, against the original features X."""
    return (k_harm / k_harm_0) / (k_benign / k_benign_0)


# --- the method ------------------------------------------------------------------------------


class Immunize(ResAlign):
    name = "immunize"
    summary = ("ResAlign plus a text-encoder term that worsens the condition number of the "
               "concept's features")  # fmt: skip
    source = "Zheng et al., Model Immunization from a Condition Number Perspective"
    Config = ImmunizeConfig
    uses_text_encoder = True
    one_concept = "its covariances are one concept's harmful and benign prompts"

    def prepare_data(self, pipe) -> dict[str, Split]:
        data = super().prepare_data(pipe)
        self.encoder = pipe.text_encoder
        self.original_encoder = copy.deepcopy(pipe.text_encoder).requires_grad_(False).eval()
        self.harm_ids = token_ids(pipe.tokenizer, list(self.concept.forget.prompts))
        self.benign_ids = token_ids(pipe.tokenizer, list(self.concept.retain.prompts))
        data["retain"].ids = token_ids(pipe.tokenizer, data["retain"].prompts)
        self.data_info["covariances"] = {
            "harmful": self.concept.forget.describe(), "benign": self.concept.retain.describe(),
            "features": "text-encoder hidden states at every token position (to_k/to_v inputs)",
        }  # fmt: skip
        return data

    def encoder_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        model = getattr(self.encoder, "text_model", self.encoder)  # CLIPTextModel layouts
        layers = model.encoder.layers
        n = self.config.encoder_layers
        if n > len(layers):
            raise ErasekitError(f"encoder_layers={n}: the text encoder has {len(layers)} layers")
        chosen = [f"encoder.layers.{i}." for i in range(len(layers) - n, len(layers))]
        prefixes = ("final_layer_norm.", *chosen)
        return [(TEXT_PREFIX + name, p) for name, p in model.named_parameters()
                if name.startswith(prefixes)]  # fmt: skip

    def trainable_parameters(self, unet):
        return [*super().trainable_parameters(unet), *self.encoder_parameters()]

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        cfg: ImmunizeConfig = self.config
        self.encoder.to(ctx.device)
        self.original_encoder.to(ctx.device)
        self.encoder_params = dict(self.encoder_parameters())
        ctx.accelerator.register_for_checkpointing(self.encoder)
        with torch.no_grad():
            f_harm = self._features(self.original_encoder, self.harm_ids)
            f_benign = self._features(self.original_encoder, self.benign_ids)
            pooled = feature_covariance(torch.cat([f_harm.flatten(0, 1), f_benign.flatten(0, 1)]))
            self.basis = feature_span(pooled, cfg.span_tolerance)
            x_harm = feature_covariance(f_harm, self.basis)
            x_benign = feature_covariance(f_benign, self.basis)
        check_conditioned(x_harm, cfg.singular_tolerance, "harmful")
        check_conditioned(x_benign, cfg.singular_tolerance, "benign")
        self.kappa_original = {"harm": condition_number(x_harm),
                               "benign": condition_number(x_benign)}  # fmt: skip
        self.span = {"dimensions": int(self.basis.shape[1]), "width": int(pooled.shape[0])}
        # the regularisers' units: each set's original RMS eigenvalue (‖S_0‖_F / √K)
        k = self.basis.shape[1]
        self.unit = {"harm": float(x_harm.norm()) / k**0.5,
                     "benign": float(x_benign.norm()) / k**0.5}  # fmt: skip

    @torch.no_grad()
    def student_cond(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The retain distillation's student reads the encoder being immunized, the one the
        model ships with (the teacher reads the original's): the U-Net learns to keep retain
        outputs under the moved features instead of being fitted to the original ones."""
        return self._features(self.encoder, batch["ids"]).to(batch["cond"].dtype)

    def _features(self, encoder, ids: torch.Tensor) -> torch.Tensor:
        device = next(encoder.parameters()).device
        return encoder(ids.to(device))[0].float()

    def _pick(self, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = self.config.covariance_prompts
        if not n or n >= len(ids):
            return ids
        return ids[torch.randperm(len(ids), generator=gen)[:n]]

    def immunization_loss(self, ctx: TrainContext, micro: int):
        """feature_weight · benign feature MSE + λ1·r1(S_benign) + λ2·r2(S_harm), and stats."""
        cfg: ImmunizeConfig = self.config
        gen = step_generator(cfg.seed, ctx.step, ctx.global_micro(micro), 6173)
        harm_ids, benign_ids = self._pick(self.harm_ids, gen), self._pick(self.benign_ids, gen)
        a_harm = self._features(self.encoder, harm_ids)
        a_benign = self._features(self.encoder, benign_ids)
        with torch.no_grad():
            x_benign = self._features(self.original_encoder, benign_ids)
        s_harm = feature_covariance(a_harm, self.basis)
        s_benign = feature_covariance(a_benign, self.basis)
        r1 = benign_regulariser(s_benign / self.unit["benign"])
        r2 = harmful_regulariser(s_harm / self.unit["harm"])
        keep = F.mse_loss(a_benign, x_benign)
        loss = cfg.feature_weight * keep + cfg.lambda_benign * r1 + cfg.lambda_harm * r2
        k_harm, k_benign = condition_number(s_harm), condition_number(s_benign)
        k0 = self.kappa_original
        return loss, {
            "kappa_harm": k_harm, "kappa_benign": k_benign,
            "immunization_ratio": immunization_ratio(k_harm, k0["harm"], k_benign, k0["benign"]),
            "r1": float(r1.detach()), "r2": float(r2.detach()),
            "feature_mse": float(keep.detach()),
        }  # fmt: skip

    def parameter_groups(self, trainable: dict[str, torch.nn.Parameter]) -> list[dict[str, Any]]:
        """The U-Net's and the text encoder's parameters are clipped each on its own (the
        regularisers' gradients would otherwise scale the erasure's down), and the encoder is
        not weight-decayed (decay would move benign features with no loss asking for it)."""
        encoder = [p for n, p in trainable.items() if n.startswith(TEXT_PREFIX)]
        unet = [p for n, p in trainable.items() if not n.startswith(TEXT_PREFIX)]
        return [{"params": unet}, {"params": encoder, "weight_decay": 0.0}]

    def loss(self, ctx: TrainContext, micro: int):
        value, logs = super().loss(ctx, micro)  # the U-Net's gradients (base + retain [+ lam])
        loss, stats = self.immunization_loss(ctx, micro)
        params = list(self.encoder_params.values())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        scale = 1.0 / self.config.gradient_accumulation_steps
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                g = (g * scale).to(p.dtype)
                p.grad = g if p.grad is None else p.grad + g
        encoder_norm = torch.linalg.vector_norm(
            torch.stack([g.norm() for g in grads if g is not None])
        )
        stats["encoder_grad_norm"] = float(encoder_norm)
        return value + loss.detach().float(), {**logs, **stats}

    @torch.no_grad()
    def final_conditioning(self) -> dict[str, float]:
        """κ of the trained encoder's covariances over every prompt, and the ratio."""
        harm = self._features(self.encoder, self.harm_ids)
        benign = self._features(self.encoder, self.benign_ids)
        k_harm = condition_number(feature_covariance(harm, self.basis))
        k_benign = condition_number(feature_covariance(benign, self.basis))
        k0 = self.kappa_original
        ratio = immunization_ratio(k_harm, k0["harm"], k_benign, k0["benign"])
        return {"harm": k_harm, "benign": k_benign, "immunization_ratio": ratio}

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        cfg: ImmunizeConfig = self.config
        out = super().write_outputs(folder)
        return {**out, "text_encoder_trained": sorted(self.encoder_params),
                "feature_span": self.span, "kappa_original": self.kappa_original,
                "kappa_final": self.final_conditioning(),
                "lambda_benign": cfg.lambda_benign, "lambda_harm": cfg.lambda_harm}  # fmt: skip
