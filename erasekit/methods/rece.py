"""RECE: reliable and efficient concept erasure, UCE followed by closed-form adversarial rounds.

After UCE's edit (``erasekit.methods.uce``), each epoch:

1. finds the embedding that makes the edited cross-attention reproduce the original model's
   keys and values for the concept, row by row, in closed form over every ``attn2.to_k`` /
   ``to_v`` matrix W_l (W⁰_l the original):
   ``e' = (Σ_l W_lᵀW_l + λ_reg I)⁻¹ (Σ_l W_lᵀ W⁰_l) c`` (λ_reg keeps e' near zero);
2. erases e' with UCE's closed form (each row of e' mapped to ``W·g``, the guide's row, with
   the preserved texts kept), at RECE's own λ and preservation scale;
3. renders a validation set and measures the concept rate with the concept's detector.

The epoch with the lowest validation rate is kept (ties: the earlier one, less drift). The
validation set is the concept's tuning phrasings (``tuning`` in its spec), which no reported
metric uses; a concept without them validates on its forget prompts, and ``validation`` names
another prompt file. ``select: last`` skips the renders and keeps the last epoch.

Where this differs from the public code (CharlesGong12/RECE): the concept rows c are the rows
UCE erased (``tokens``: the last token, or every token of the forget prompts from the word on),
not always the 77 rows of the bare concept word; preserved targets use the current weights as
there, so drift accumulates over epochs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.methods.uce import PROJECTIONS, UCE, UCEConfig, uce_edit

SELECT = ("validation", "last")
VALIDATION_DIR = ".rece-validation"  # inside the run's folder, removed before it is written


@dataclass
class RECEConfig(UCEConfig):
    epochs: int = 3  # adversarial rounds after UCE's edit
    reg: float = 0.1  # λ_reg: pulls the adversarial embedding towards zero
    adv_lam: float = 0.1  # λ of each round's re-edit (weight of the current W)
    adv_preserve_scale: float = 0.1  # preservation scale of each round's re-edit
    adv_erase_scale: float = 1.0  # erase scale of each round's re-edit
    select: str = "validation"  # validation: the lowest validation rate; last: the last epoch
    validation: str = ""  # a prompt file; "" = the concept's tuning set, else its forget set
    validation_images: int = 1  # images per validation prompt
    validation_steps: int = 0  # sampler steps of the validation renders; 0 = the model's

    def validate(self) -> None:
        super().validate()
        if self.epochs < 1:
            raise ErasekitError(f"epochs must be at least 1, got {self.epochs}")
        if not self.reg > 0:
            raise ErasekitError(f"reg must be positive (it keeps e' bounded), got {self.reg}")
        if not self.adv_lam > 0:
            raise ErasekitError(f"adv_lam must be positive, got {self.adv_lam}")
        for key in ("adv_preserve_scale", "adv_erase_scale"):
            if getattr(self, key) < 0:
                raise ErasekitError(f"{key} must be non-negative, got {getattr(self, key)}")
        if self.select not in SELECT:
            raise ErasekitError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.validation_images < 1 or self.validation_steps < 0:
            raise ErasekitError("validation_images must be ≥ 1 and validation_steps ≥ 0")


def adversarial_embedding(
    current: list[torch.Tensor], original: list[torch.Tensor], rows: torch.Tensor, reg: float
) -> torch.Tensor:
    """(n, d) float64: per row c of ``rows``, the e' minimising
    Σ_l ‖W_l e' − W⁰_l c‖² + reg‖e'‖² over the matrices (``current`` W_l, ``original`` W⁰_l)."""
    d = rows.shape[1]
    gram = reg * torch.eye(d, dtype=torch.float64)
    cross = torch.zeros((d, d), dtype=torch.float64)
    for w, w0 in zip(current, original, strict=True):
        w, w0 = w.double(), w0.double()
        gram += w.T @ w
        cross += w.T @ w0
    # e'ᵀ rows: solve gram · E = cross · Cᵀ
    return torch.linalg.solve(gram, cross @ rows.double().T).T


class RECE(UCE):
    name = "rece"
    summary = (
        "UCE, then rounds of closed-form adversarial embeddings erased in turn; best round kept"
    )
    source = (
        "Gong et al., Reliable and Efficient Concept Erasure of Text-to-Image Diffusion"
        " Models, ECCV 2024"
    )
    Config = RECEConfig
    runs_on_sdxl = True

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        """UCE's defaults for the starting edit (its world preset on ShapesWorld), then RECE's
        own world preset."""
        base = UCE.defaults(concept)
        return {**base, **cls.world_defaults(concept)} if concept.scale == "world" else base

    def projections(self, unet) -> list[torch.nn.Module]:
        found = [m for n, m in unet.named_modules() if n.endswith(PROJECTIONS)]
        if not found:
            raise ErasekitError("rece: the U-Net has no cross-attention to_k/to_v projections")
        return found

    @torch.no_grad()
    def on_train_start(self, ctx) -> None:
        cfg: RECEConfig = self.config
        started = time.perf_counter()
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        modules = self.projections(unet)
        original = [m.weight.detach().cpu().double().clone() for m in modules]
        self.validation_info = None
        super().on_train_start(ctx)  # UCE's edit
        uce_info = dict(self.edit_info)
        e = self.embeddings
        epochs, best, edit_seconds = [], None, uce_info["edit_seconds"]
        for epoch in range(cfg.epochs):
            tick = time.perf_counter()
            current = [m.weight.detach().cpu().double() for m in modules]
            adv = adversarial_embedding(current, original, e["erase"], cfg.reg)
            for m, w in zip(modules, current, strict=True):
                new = uce_edit(w, adv, e["guide"], e["preserve"], lam=cfg.adv_lam,
                               erase_scale=cfg.adv_erase_scale,
                               preserve_scale=cfg.adv_preserve_scale)  # fmt: skip
                m.weight.copy_(new.to(m.weight))
            edit_seconds += time.perf_counter() - tick
            record = {"epoch": epoch, "adversarial_norm": round(adv.norm(dim=1).mean().item(), 4)}
            if cfg.select == "validation":
                record["validation_rate"] = self.validation_rate(ctx, epoch)
            epochs.append(record)
            key = record.get("validation_rate", 0.0)
            if best is None or key < best[0] or cfg.select == "last":
                best = (key, epoch, [m.weight.detach().cpu().clone() for m in modules])
        for m, w in zip(modules, best[2], strict=True):
            m.weight.copy_(w.to(m.weight))
        ctx.accelerator.wait_for_everyone()  # the renders leave the output folder
        if ctx.accelerator.is_main_process:
            shutil.rmtree(ctx.work_dir / VALIDATION_DIR, ignore_errors=True)
        self.edit_info = {**uce_info, "edit_seconds": round(edit_seconds, 3),
                          "seconds_with_validation": round(time.perf_counter() - started, 3),
                          "epochs": epochs, "chosen_epoch": best[1], "select": cfg.select,
                          "validation": self.validation_info}  # fmt: skip

    def validation_sets(self) -> list:
        """(concept, prompts) pairs: each concept of a combined run with its own tuning
        phrasings (else forget prompts), or the ``validation`` file for the concept."""
        from erasekit.concepts import read_prompt_set

        if self.config.validation:
            return [(self.concept, read_prompt_set(self.config.validation, name="validation"))]
        parts = list(self.concept.parts) or [self.concept]
        return [(c, c.tuning["concept"] if c.tuning else c.forget) for c in parts]

    def validation_rate(self, ctx, epoch: int) -> float:
        """The concept rate of the current weights on the validation prompts (one image each,
        seed 0, each concept's detector and primary protocol; a combined run: the mean of its
        concepts' rates); every process renders its share."""
        from erasekit.detectors import DetectorOptions
        from erasekit.evaluation import build_judges, evaluate_prompt_set
        from erasekit.sampling import SamplerSettings

        cfg: RECEConfig = self.config
        options = DetectorOptions(device=str(ctx.device))
        if not hasattr(self, "judges"):
            self.judges = [(build_judges(c, options), p) for c, p in self.validation_sets()]
        settings = SamplerSettings.for_model(self.model_path, steps=cfg.validation_steps or None)
        pipe = ctx.pipe
        places = (pipe.vae.device, pipe.text_encoder.device)
        pipe.vae.to(ctx.device), pipe.text_encoder.to(ctx.device)
        rates, info = [], []
        try:
            for i, (judges, prompts) in enumerate(self.judges):
                root, folder = ctx.work_dir / VALIDATION_DIR, f"epoch-{epoch}-{i}"
                samples = evaluate_prompt_set(
                    pipe,
                    prompts,
                    root,
                    folder,
                    judges,
                    model_path=None,
                    settings=settings,
                    n_per_prompt=cfg.validation_images,
                    seed=0,
                )
                primary = judges.protocols[0].name
                flags = [s["flags"][primary] for s in samples]
                rates.append(sum(flags) / len(flags))
                info.append({"prompts": prompts.describe(), "n_images": len(flags),
                             "protocol": primary})  # fmt: skip
        finally:
            pipe.vae.to(places[0]), pipe.text_encoder.to(places[1])
        self.validation_info = {"sets": info, "steps": settings.steps}
        return round(sum(rates) / len(rates), 4)
