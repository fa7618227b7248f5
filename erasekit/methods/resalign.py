"""ResAlign: erasure meant to survive downstream fine-tuning.

Outer objective over the trainable parameters θ, with φ_c(θ) the parameters after simulated
fine-tuning under a configuration c drawn from a meta-distribution:

    F(θ) = (1 − λ)·L_h(θ) + λ·mean_c L_h(φ_c) + w_r·R(θ)

L_h is the base method's harmful loss (``base``: ``ga`` gradient ascent on forget images,
``esd`` ESD's negatively guided target, ``salun`` SalUn's remap to the surrogate prompt), R the
distillation to the frozen original on retain images, MSE(ε_θ(x_t, c), ε_0(x_t, c)), and w_r
``retain_weight`` (``retain_weight_late`` from the second half of training on).

Hypergradient (fine-tuning modelled as a proximal step, γ = ``gamma``):
    ĝ = g_θ + (I + γH)⁻¹ g_φ,   g_θ = ∂_θF,  g_φ = ∂_φF,  H = ∇²(fine-tuning loss) at φ.
(I + γH)⁻¹ g_φ is applied by ``fixed_point_iterations`` = K Richardson iterations from v_0 = 0,
v ← (1 − α)v − αγHv + g_φ, result α·v_K; every iteration after the first costs one
Hessian-vector product (double backprop; H·v_0 = 0 needs none). Safeguards: when an iteration
grows the iterate (‖Jv‖ > ‖v‖, J = (1 − α)I − αγH) or the resilience term ‖α·v_K‖ exceeds
``max_resilience_norm``, α is halved and the solve retried (up to ``max_retries`` times); after
that the configuration's term is dropped (the step uses g_θ for it) and the log records it.

Simulated fine-tuning acts on the merged U-Net as an attacker would (``mode: full``: every
weight; ``mode: lora``: a fresh LoRA on the attention projections) with GD or Adam on benign
data; its update is then projected onto the trainable set (a LoRA: per layer, the rank-r SVD of
B·A·s + ΔW; a subset or SalUn mask: ΔW restricted to it). g_φ and H are taken at the projected φ.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError
from erasekit.methods import Method
from erasekit.methods.esd import VARIANTS as ESD_VARIANTS
from erasekit.methods.esd import esd_parameters
from erasekit.training import Split, TrainConfig, TrainContext, make_split, step_generator

BASES = ("ga", "esd", "salun")
TRAINABLE = ("lora", "full", "mask", *ESD_VARIANTS)
PRESETS = Path(__file__).parent / "presets"
META_SD = PRESETS / "resalign-meta-sd.yaml"
META_WORLD = PRESETS / "resalign-meta-world.yaml"


@dataclass
class ResAlignConfig(TrainConfig):
    steps: int = 160  # outer steps
    lr: float = 0.0  # 0: 2e-4 for a LoRA (released), 1e-5 for weights; x5 / x10 on ShapesWorld
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    base: str = "ga"  # the harmful loss L_h: ga | esd | salun
    lam: float = 0.8  # λ, the weight of L_h after simulated fine-tuning
    retain_weight: float = 1.6  # w_r in the first half of training
    retain_weight_late: float = 2.0  # w_r from the second half on
    trainable: str = "lora"  # lora | full | mask (SalUn saliency) | an ESD variant
    rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    meta_distribution: str = ""  # YAML file; "" = the shipped default (world scale for ShapesWorld)
    configs_per_step: int = 3  # k configurations sampled per outer step
    gamma: float = 1.0  # γ of the proximal (Moreau-envelope) model of fine-tuning
    fixed_point_iterations: int = 5  # K
    alpha: float = 1.0  # first step size α of the fixed-point iteration
    max_retries: int = 5
    max_resilience_norm: float = 0.2
    # base methods' own settings
    negative_guidance: float = 1.0  # esd: η
    esd_target: str = "paper"  # esd: target convention, paper | diffusers-code
    ddim_steps: int = 50  # esd: partial-sample schedule
    sample_guidance: float = 3.0  # esd: CFG of the partial sample
    surrogate: str = ""  # salun: "" = the concept's surrogate prompt
    mask_fraction: float = 0.5  # trainable=mask: share of weights trained
    mask_guidance: float = 7.5
    mask_batch_size: int = 8
    world_scale: bool = False  # lr=0 resolves to 10x (weights) / 5x (LoRA) the SD values

    def validate(self) -> None:
        if self.lr == 0.0:
            lora = self.trainable == "lora"
            self.lr = (1e-3 if lora else 1e-4) if self.world_scale else (2e-4 if lora else 1e-5)
        super().validate()
        if self.base not in BASES:
            raise ErasekitError(f"base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.trainable not in TRAINABLE:
            raise ErasekitError(f"trainable must be one of {', '.join(TRAINABLE)}")
        if not 0.0 <= self.lam <= 1.0:
            raise ErasekitError(f"lam must be in [0, 1], got {self.lam}")
        for key in ("retain_weight", "retain_weight_late", "gamma", "max_resilience_norm"):
            if not getattr(self, key) >= 0:
                raise ErasekitError(f"{key} must be non-negative")
        for key in ("rank", "configs_per_step", "fixed_point_iterations", "mask_batch_size"):
            if getattr(self, key) < 1:
                raise ErasekitError(f"{key} must be at least 1")
        if self.mixed_precision == "fp16":
            raise ErasekitError(
                "resalign: mixed_precision must be no or bf16 (fp16 needs loss scaling, which "
                "the hand-built hypergradient bypasses)"
            )
        if not 0.0 < self.alpha <= 1.0:
            raise ErasekitError("alpha must be in (0, 1]")
        if self.max_retries < 0:
            raise ErasekitError("max_retries must be non-negative")
        if not 0.0 < self.mask_fraction <= 1.0:
            raise ErasekitError("mask_fraction must be in (0, 1]")
        if self.trainable in ("mask", *ESD_VARIANTS) and self.weight_decay != 0:
            raise ErasekitError(f"trainable={self.trainable}: weight_decay must be 0 (decay "
                                "would move weights outside the trainable set)")  # fmt: skip

    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


# --- the meta-distribution of simulated fine-tuning -------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """One simulated downstream fine-tuning run."""

    name: str
    optimizer: str = "adam"  # gd | adam
    lr: float = 1e-5
    steps: int = 10
    batch_size: int = 1
    data: str = "benign"
    mode: str = "lora"  # lora | full
    rank: int = 4
    lora_alpha: float = 4.0


@dataclass
class MetaDistribution:
    configs: list[SimConfig]
    datasets: dict[str, dict[str, Any]]  # name -> {"prompts": PromptSet} | {"images": path}
    source: str

    def describe(self) -> dict[str, Any]:
        sets = {}
        for name, d in self.datasets.items():
            sets[name] = d["prompts"].describe() if "prompts" in d else {"images": d["images"]}
        return {"source": self.source, "configs": [asdict(c) for c in self.configs],
                "datasets": sets}  # fmt: skip


def load_meta_distribution(file: str | Path, concept) -> MetaDistribution:
    """Read a meta-distribution YAML: ``configs`` (a list) and optional ``datasets``
    (name -> {prompts: FILE} | {images: DIR}); ``benign`` is the concept's benign prompts."""
    from erasekit.concepts import _prompt_set_field
    from erasekit.config import read_yaml_mapping

    path = Path(file)
    spec = read_yaml_mapping(path, "meta-distribution file")
    unknown = set(spec) - {"configs", "datasets"}
    if unknown:
        raise ErasekitError(f"{path}: unknown key(s) {sorted(unknown)}; expected configs, datasets")
    datasets: dict[str, dict[str, Any]] = {}
    if concept.benign is not None:
        datasets["benign"] = {"prompts": concept.benign}
    for name, entry in (spec.get("datasets") or {}).items():
        if (
            not isinstance(entry, dict)
            or len(entry) != 1
            or next(iter(entry))
            not in (
                "prompts",
                "images",
            )
        ):
            raise ErasekitError(f"{path}: data set {name!r} must be {{prompts: FILE}} or "
                                "{images: DIR}")  # fmt: skip
        if "images" in entry:
            datasets[name] = {"images": str(entry["images"])}
        else:
            datasets[name] = {"prompts": _prompt_set_field(path, f"datasets.{name}",
                                                           entry["prompts"])}  # fmt: skip
    for name, d in datasets.items():
        if "prompts" in d and d["prompts"].sha256 == concept.retain.sha256:
            raise ErasekitError(
                f"{path}: data set {name!r} is the concept's retain set, which the "
                "audit's fine-tuning attack trains on; use other benign prompts"
            )
    raw = spec.get("configs")
    if not isinstance(raw, list) or not raw:
        raise ErasekitError(f"{path}: 'configs' must be a non-empty list")
    valid = [f.name for f in fields(SimConfig)]
    configs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ErasekitError(f"{path}: configs[{i}] must be a mapping")
        bad = [k for k in item if k not in valid]
        if bad:
            raise ErasekitError(f"{path}: configs[{i}]: unknown key {bad[0]!r}; valid keys: "
                                f"{', '.join(valid)}")  # fmt: skip
        item = {"name": f"config-{i}", **item}
        try:
            c = SimConfig(name=str(item["name"]), optimizer=str(item.get("optimizer", "adam")),
                          lr=float(item.get("lr", 1e-5)), steps=int(item.get("steps", 10)),
                          batch_size=int(item.get("batch_size", 1)),
                          data=str(item.get("data", "benign")), mode=str(item.get("mode", "lora")),
                          rank=int(item.get("rank", 4)),
                          lora_alpha=float(item.get("lora_alpha", 4.0)))  # fmt: skip
        except (TypeError, ValueError) as e:
            raise ErasekitError(f"{path}: configs[{i}]: {e}") from None
        if c.optimizer not in ("gd", "adam") or c.mode not in ("lora", "full"):
            raise ErasekitError(f"{path}: configs[{i}]: optimizer must be gd|adam, mode lora|full")
        if not (c.lr > 0 and math.isfinite(c.lr)) or min(c.steps, c.batch_size, c.rank) < 1:
            raise ErasekitError(f"{path}: configs[{i}]: lr must be > 0; steps, batch_size, rank "
                                ">= 1")  # fmt: skip
        if c.data not in datasets:
            hint = "" if concept.benign else f" (concept {concept.name} has no benign set)"
            raise ErasekitError(f"{path}: configs[{i}]: unknown data set {c.data!r}{hint}")
        configs.append(c)
    return MetaDistribution(configs=configs, datasets=datasets, source=str(path))


# --- (I + γH)^-1 g by fixed-point iterations ---------------------------------------------------


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))


def proximal_solve(
    g: list[torch.Tensor],
    hvp,
    *,
    gamma: float,
    iterations: int,
    alpha: float,
    max_retries: int,
    max_norm: float,
) -> tuple[list[torch.Tensor] | None, dict[str, Any]]:
    """α·v_K ≈ (I + γH)⁻¹ g with v_0 = 0, v ← (1 − α)v − αγ·hvp(v) + g, K = ``iterations``.

    Retries with α/2 when an iteration grows the iterate (‖Jv‖ > ‖v‖) or ‖α·v_K‖ > max_norm or
    a value is not finite; returns (None, stats) when every retry failed (the caller falls
    back). stats: alpha (last tried), retries, hvps, reason of the last failure.
    """
    a = alpha
    stats: dict[str, Any] = {"alpha": a, "retries": 0, "hvps": 0, "reason": None}
    for attempt in range(max_retries + 1):
        stats["alpha"] = a
        v = [x.clone() for x in g]  # v_1 = g (H·v_0 = 0)
        failed = None
        for _ in range(iterations - 1):
            hv = hvp(v)
            stats["hvps"] += 1
            jv = [(1 - a) * x - a * gamma * h for x, h in zip(v, hv, strict=True)]
            n_jv, n_v = _norm(jv), _norm(v)
            if not math.isfinite(n_jv):
                failed = "not finite"
                break
            if n_jv > n_v:
                failed = f"diverging (|Jv|/|v| = {n_jv / max(n_v, 1e-30):.3g})"
                break
            v = [j + x for j, x in zip(jv, g, strict=True)]
        if failed is None:
            term = [a * x for x in v]
            n = _norm(term)
            if not math.isfinite(n):
                failed = "not finite"
            elif n > max_norm:
                failed = f"norm {n:.3g} > {max_norm}"
            else:
                stats["norm"] = n
                return term, stats
        stats["reason"] = failed
        if attempt < max_retries:
            a /= 2
            stats["retries"] += 1
    return None, stats


def make_hvp(loss: torch.Tensor, params: list[torch.Tensor]):
    """v -> H·v for H the Hessian of ``loss`` w.r.t. ``params`` (one double-backward each)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        dot = sum((g * x.to(g.dtype)).sum() for g, x in zip(grads, v, strict=True))
        out = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
        pairs = zip(out, params, strict=True)
        return [torch.zeros_like(p) if o is None else o.detach() for o, p in pairs]

    return hvp


@contextlib.contextmanager
def double_backward_ready(unet, device: torch.device):
    """Attention kernels that support double backward (math SDPA) and no gradient
    checkpointing (re-entrant checkpoints cannot be differentiated twice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    if checkpointing:
        unet.disable_gradient_checkpointing()
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if checkpointing:
            unet.enable_gradient_checkpointing()


# --- the method -------------------------------------------------------------------------------


class ResAlign(Method):
    name = "resalign"
    Config = ResAlignConfig
    needs_images = True
    sets_gradients = True

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        from erasekit.concepts import is_world_concept

        if is_world_concept(concept):
            # ShapesWorld was trained at lr 1e-3 on a CPU: world-scale lr and budget. Its
            # full-weight Hessians reach eigenvalues near 30, where the fixed-point iteration
            # only contracts for α below ~1/16: starting there saves four failing retries.
            return {"steps": 60, "configs_per_step": 2, "batch_size": 4, "alpha": 1 / 16,
                    "world_scale": True}  # fmt: skip
        return {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from erasekit.distributed import process_state

        if process_state().num_processes > 1:
            raise ErasekitError(
                "resalign runs in one process (its hypergradient is not yet "
                "reduced across processes); run it without accelerate launch"
            )
        cfg: ResAlignConfig = self.config
        file = cfg.meta_distribution or (META_WORLD if self._world() else META_SD)
        self.meta = load_meta_distribution(file, self.concept)
        self.teacher = None
        self.masks: dict[str, torch.Tensor] = {}
        self.mask_info: dict[str, Any] = {}
        self.lora_state: dict | None = None
        self.totals = {"fallbacks": 0, "retries": 0, "hvps": 0, "inner_steps": 0}

    def _world(self) -> bool:
        from erasekit.concepts import is_world_concept

        return is_world_concept(self.concept)

    # data -------------------------------------------------------------------------------
    def prepare_data(self, pipe) -> dict[str, Split]:
        from erasekit.data import read_image_folder, render_image_set

        cfg: ResAlignConfig = self.config
        data: dict[str, Split] = {}
        if cfg.base == "esd" and cfg.trainable != "mask":
            data["forget"] = make_split(pipe, self.concept.forget.prompts)
            self.data_info["forget"] = self.concept.forget.describe()
        else:
            images = self.image_set(pipe, "forget")
            data["forget"] = make_split(pipe, [], images)
            self.data_info["forget"] = images.describe()
        images = self.image_set(pipe, "retain")
        data["retain"] = make_split(pipe, [], images)
        self.data_info["retain"] = images.describe()
        used = {c.data for c in self.meta.configs} if cfg.lam > 0 else set()
        for name in sorted(used):
            d = self.meta.datasets[name]
            if "images" in d:
                images = read_image_folder(d["images"], name=f"simulation set {name}")
            else:
                images = render_image_set(
                    pipe, self.model_path, d["prompts"], n_per_prompt=cfg.images_per_prompt,
                    seed=cfg.seed, cache_dir=self.cache_dir, progress=self.progress,
                )  # fmt: skip
            data[f"sim:{name}"] = make_split(pipe, [], images)
            self.data_info[f"sim:{name}"] = images.describe()
        self.data_info["meta_distribution"] = self.meta.describe()
        return data

    # trainable set ----------------------------------------------------------------------
    def trainable_parameters(self, unet):
        cfg: ResAlignConfig = self.config
        # The frozen original for R (and ESD's target), copied before any adapter is added.
        self.teacher = copy.deepcopy(unet).requires_grad_(False).eval()
        if cfg.trainable == "lora":
            from erasekit.lora import add_lora

            return add_lora(unet, cfg.rank, cfg.lora_alpha, cfg.targets())
        if cfg.trainable in ESD_VARIANTS:
            return esd_parameters(unet, cfg.trainable)
        return list(unet.named_parameters())

    def setup(self, ctx: TrainContext) -> None:
        cfg: ResAlignConfig = self.config
        self.teacher.to(ctx.device, dtype=ctx.weight_dtype)
        self.raw = ctx.unet
        self.params = dict(ctx.unet.named_parameters())
        self.decision = {n: p for n, p in ctx.unet.named_parameters() if p.requires_grad}
        if cfg.base == "esd":
            from erasekit.methods.esd import ESD, ESDConfig

            self.esd = ESD(ESDConfig(ddim_steps=cfg.ddim_steps, sample_guidance=cfg.sample_guidance,
                                     negative_guidance=cfg.negative_guidance,
                                     target=cfg.esd_target, seed=cfg.seed),
                           self.concept, model_path=self.model_path)  # fmt: skip
            self.esd.setup(ctx, teacher=self.teacher)
        if cfg.base == "salun":
            from erasekit.training import encode_prompts

            self.surrogate = cfg.surrogate or self.concept.surrogate
            self.surrogate_cond = encode_prompts(ctx.pipe, [self.surrogate]).to(ctx.device)
        if cfg.trainable == "mask":
            from erasekit.methods.salun import SalUn, SalUnConfig, masks_from_saliency

            helper = SalUn(SalUnConfig(mask_guidance=cfg.mask_guidance, seed=cfg.seed,
                                       mask_batch_size=cfg.mask_batch_size),
                           self.concept, model_path=self.model_path)  # fmt: skip
            masks, info = masks_from_saliency(helper.saliency(ctx), cfg.mask_fraction)
            self.mask_info = {**info, "fraction": cfg.mask_fraction, "w": cfg.mask_guidance}
            self.masks = {n: m.to(ctx.device) for n, m in masks.items()}
        # LoRA layers of the trainable set: module name -> (A name, B name, scale)
        self.lora_layers = {}
        for n in self.decision:
            if ".lora_A." in n:
                module = n.split(".lora_A.")[0]
                self.lora_layers[module] = (n, n.replace(".lora_A.", ".lora_B."),
                                            cfg.lora_alpha / cfg.rank)  # fmt: skip

    # forward passes ---------------------------------------------------------------------
    def _eps(self, ctx, x, t, cond, overrides=None) -> torch.Tensor:
        with ctx.accelerator.autocast():
            if overrides:
                out = torch.func.functional_call(
                    self.raw, overrides, (x, t), {"encoder_hidden_states": cond}, strict=False
                )
            else:
                out = self.raw(x, t, cond)
        return out.sample.float()

    def harmful_inputs(self, ctx: TrainContext, micro: int) -> dict[str, Any]:
        """The outer step's forget batch, noised once: L_h(θ) and every L_h(φ) share it."""
        cfg: ResAlignConfig = self.config
        batch = ctx.batch("forget", micro)
        if cfg.base == "esd":
            x_t, t, target = self.esd.forget_target(ctx, batch["cond"], ctx.generator(micro))
            return {"x": x_t, "t": t, "cond": batch["cond"], "target": target}
        x_t, t, noise = ctx.noisy(batch["latents"], ctx.generator(micro))
        out = {"x": x_t, "t": t, "cond": batch["cond"]}
        if cfg.base == "ga":
            out["target"] = ctx.denoising_target(batch["latents"], noise, t).float()
        return out

    def harmful_loss(self, ctx: TrainContext, inputs: dict[str, Any], overrides=None):
        """L_h at θ (no overrides) or at φ: ga = −ε-MSE, esd = MSE to ESD's target, salun =
        MSE to the same parameters' (detached) prediction for the surrogate prompt."""
        pred = self._eps(ctx, inputs["x"], inputs["t"], inputs["cond"], overrides)
        if self.config.base == "ga":
            return -F.mse_loss(pred, inputs["target"])
        if self.config.base == "esd":
            return F.mse_loss(pred, inputs["target"])
        with torch.no_grad():
            anchor = self.surrogate_cond.expand_as(inputs["cond"])
            target = self._eps(ctx, inputs["x"], inputs["t"], anchor, overrides)
        return F.mse_loss(pred, target)

    def retain_loss(self, ctx: TrainContext, micro: int) -> torch.Tensor:
        """R(θ): distillation to the frozen original on retain images."""
        batch = ctx.batch("retain", micro)
        x_t, t, _ = ctx.noisy(batch["latents"], ctx.generator(micro, salt=1))
        with torch.no_grad():
            target = self.teacher(x_t.to(self.teacher.dtype), t,
                                  batch["cond"].to(self.teacher.dtype)).sample.float()  # fmt: skip
        return F.mse_loss(self._eps(ctx, x_t, t, batch["cond"]), target)

    def finetune_loss(self, ctx, split: str, size: int, gen, overrides) -> torch.Tensor:
        """The simulated fine-tuning's loss: ε-MSE on a random batch of a benign set."""
        data = ctx.data[split]
        idx = torch.randint(0, len(data), (size,), generator=gen)
        latents, cond = data.latents[idx].to(ctx.device), data.cond[idx].to(ctx.device)
        x_t, t, noise = ctx.noisy(latents, gen)
        pred = self._eps(ctx, x_t, t, cond, overrides)
        return F.mse_loss(pred, ctx.denoising_target(latents, noise, t).float())

    # simulated fine-tuning ---------------------------------------------------------------
    def _weight_key(self, module: str) -> str:
        key = f"{module}.base_layer.weight"
        return key if key in self.params else f"{module}.weight"

    def simulate(self, ctx: TrainContext, c: SimConfig, salt: tuple[int, ...]):
        """Run configuration ``c`` from θ; return (φ as decision-space leaves, inner losses)."""
        params = self.params
        if c.mode == "full":  # every weight of the merged model (LoRA factors stay at θ)
            leaves = {n: p.detach().clone().requires_grad_(True)
                      for n, p in params.items() if "lora_" not in n}  # fmt: skip

            def overrides():
                return leaves

        else:  # a fresh LoRA on the attention projections
            gen = step_generator(self.config.seed, *salt, -1)
            modules = [m for m, mod in self.raw.named_modules()
                       if isinstance(mod, torch.nn.Linear) and "lora_" not in m
                       and any(m.endswith(f".{t}") or m.endswith(f".{t}.base_layer")
                               for t in self.config.targets())]  # fmt: skip
            modules = [m.removesuffix(".base_layer") for m in modules]
            leaves = {}
            for m in modules:
                w = params[self._weight_key(m)]
                a = torch.randn((c.rank, w.shape[1]), generator=gen) / c.rank
                leaves[f"{m}.A"] = a.to(w).requires_grad_(True)
                leaves[f"{m}.B"] = torch.zeros((w.shape[0], c.rank)).to(w).requires_grad_(True)
            scale = c.lora_alpha / c.rank

            def overrides():
                return {self._weight_key(m): params[self._weight_key(m)]
                        + scale * leaves[f"{m}.B"] @ leaves[f"{m}.A"] for m in modules}  # fmt: skip

        tensors = list(leaves.values())
        opt = (torch.optim.SGD(tensors, lr=c.lr) if c.optimizer == "gd"
               else torch.optim.Adam(tensors, lr=c.lr))  # fmt: skip
        losses = []
        for s in range(c.steps):
            gen = step_generator(self.config.seed, *salt, s)
            loss = self.finetune_loss(ctx, f"sim:{c.data}", c.batch_size, gen, overrides())
            grads = torch.autograd.grad(loss, tensors)
            for x, g in zip(tensors, grads, strict=True):
                x.grad = g
            opt.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            if c.mode == "full":
                delta = {n: leaves[n] - params[n] for n in leaves}
            else:
                delta = {self._weight_key(m): scale * leaves[f"{m}.B"] @ leaves[f"{m}.A"]
                         for m in modules}  # fmt: skip
            phi = self.project(delta)
        return phi, losses

    @torch.no_grad()
    def project(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """θ + ΔW mapped onto the trainable set: LoRA factors by rank-r SVD of B·A·s + ΔW,
        subsets and masks by restriction. Returns decision-space leaves (φ)."""
        phi = {}
        if self.lora_layers:
            for module, (a_name, b_name, scale) in self.lora_layers.items():
                a, b = self.decision[a_name], self.decision[b_name]
                merged = scale * b.float() @ a.float()
                d = delta.get(self._weight_key(module))
                if d is not None:
                    merged = merged + d.float()
                u, s, vh = torch.linalg.svd(merged, full_matrices=False)
                r = a.shape[0]
                root = (s[:r] / scale).sqrt()
                phi[b_name] = (u[:, :r] * root).to(b.dtype)
                phi[a_name] = (root[:, None] * vh[:r]).to(a.dtype)
        else:
            for n, p in self.decision.items():
                d = delta.get(n)
                if d is None:
                    phi[n] = p.detach().clone()
                    continue
                if n in self.masks:
                    d = d * self.masks[n]
                phi[n] = p.detach() + d.to(p.dtype)
        return {n: x.requires_grad_(True) for n, x in phi.items()}

    # the outer step ---------------------------------------------------------------------
    def _masked(self, names: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.masks:
            return tensors
        pairs = zip(names, tensors, strict=True)
        return [t * self.masks[n] if n in self.masks else t for n, t in pairs]

    def resilience_term(self, ctx: TrainContext, c: SimConfig, inputs, salt):
        """(I + γH)⁻¹ g_φ for one simulated fine-tuning (None on fallback) and its statistics."""
        cfg: ResAlignConfig = self.config
        started = time.perf_counter()
        phi, inner = self.simulate(ctx, c, salt)
        simulated = time.perf_counter()
        names = list(phi)
        tensors = [phi[n] for n in names]
        l_phi = self.harmful_loss(ctx, inputs, phi)
        grads = torch.autograd.grad(cfg.lam * l_phi, tensors, allow_unused=True)
        g_phi = [torch.zeros_like(x) if g is None else g.detach()
                 for g, x in zip(grads, tensors, strict=True)]  # fmt: skip
        g_phi = self._masked(names, g_phi)
        with double_backward_ready(self.raw, ctx.device):
            gen = step_generator(cfg.seed, *salt, 999)
            hvp = make_hvp(self.finetune_loss(ctx, f"sim:{c.data}", c.batch_size, gen, phi),
                           tensors)  # fmt: skip
            term, info = proximal_solve(
                g_phi, lambda v: self._masked(names, hvp(v)), gamma=cfg.gamma,
                iterations=cfg.fixed_point_iterations, alpha=cfg.alpha,
                max_retries=cfg.max_retries, max_norm=cfg.max_resilience_norm,
            )  # fmt: skip
        info.update({"inner": inner, "L_h_phi": float(l_phi.detach()),
                     "seconds_inner": simulated - started,
                     "seconds_solve": time.perf_counter() - simulated})  # fmt: skip
        if term is None:
            return None, info
        return dict(zip(names, term, strict=True)), info

    def loss(self, ctx: TrainContext, micro: int):
        cfg: ResAlignConfig = self.config
        names = list(self.decision)
        theta = [self.decision[n] for n in names]
        total = self.total_steps(ctx.data)
        w_r = cfg.retain_weight if ctx.step < total / 2 else cfg.retain_weight_late
        inputs = self.harmful_inputs(ctx, micro)
        l_theta = self.harmful_loss(ctx, inputs)
        r_theta = self.retain_loss(ctx, micro) if w_r > 0 else torch.zeros((), device=ctx.device)
        outer = (1 - cfg.lam) * l_theta + w_r * r_theta
        grads = torch.autograd.grad(outer, theta, allow_unused=True)
        pairs = zip(grads, theta, strict=True)
        g_theta = [torch.zeros_like(p) if g is None else g for g, p in pairs]
        g_theta = self._masked(names, g_theta)

        logs: dict[str, Any] = {"L_h": float(l_theta.detach()), "R": float(r_theta.detach()),
                                "w_r": w_r}  # fmt: skip
        hyper = [g.clone() for g in g_theta]
        l_phis, firsts, lasts, alphas, chosen = [], [], [], [], []
        stats = {"retries": 0, "fallbacks": 0, "hvps": 0, "inner_steps": 0,
                 "seconds_inner": 0.0, "seconds_solve": 0.0}  # fmt: skip
        resilience_norms, reasons = [], []
        if cfg.lam > 0:
            k = min(cfg.configs_per_step, len(self.meta.configs))
            gen = step_generator(cfg.seed, ctx.step, micro, 4242)
            picks = torch.randperm(len(self.meta.configs), generator=gen)[:k].tolist()
            index = {n: i for i, n in enumerate(names)}
            for j, ci in enumerate(picks):
                c = self.meta.configs[ci]
                chosen.append(c.name)
                term, info = self.resilience_term(ctx, c, inputs, (ctx.step, micro, j))
                stats["inner_steps"] += c.steps
                firsts.append(info["inner"][0])
                lasts.append(info["inner"][-1])
                l_phis.append(info["L_h_phi"])
                stats["retries"] += info["retries"]
                stats["hvps"] += info["hvps"]
                stats["seconds_inner"] += info["seconds_inner"]
                stats["seconds_solve"] += info["seconds_solve"]
                alphas.append(info["alpha"])
                if term is None:
                    stats["fallbacks"] += 1
                    reasons.append(f"{c.name}: {info['reason']}")
                    continue
                resilience_norms.append(info["norm"])
                for n, t in term.items():
                    hyper[index[n]] = hyper[index[n]] + t / k
            logs.update({
                "L_h_phi": sum(l_phis) / len(l_phis),
                "inner_loss_first": sum(firsts) / len(firsts),
                "inner_loss_last": sum(lasts) / len(lasts),
                "alpha": sum(alphas) / len(alphas),
                "resilience_norm": max(resilience_norms, default=0.0),
                "configs": ",".join(chosen),
                "fallback_reasons": "; ".join(reasons),
                **stats,
            })  # fmt: skip
            for key in self.totals:
                self.totals[key] += stats[key]
            logs["outer_passes"] = 2 + k  # L_h(θ), R(θ) and one L_h(φ) per configuration
        logs["g_theta_norm"] = _norm(g_theta)
        logs["hypergrad_norm"] = _norm(hyper)
        scale = 1.0 / cfg.gradient_accumulation_steps
        for p, g in zip(theta, hyper, strict=True):
            g = (g * scale).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
        l_phi_mean = sum(l_phis) / len(l_phis) if l_phis else 0.0
        value = outer.detach() + cfg.lam * l_phi_mean
        return value, logs

    def after_backward(self, unet) -> None:
        if self.masks:
            for n, p in self.decision.items():
                if p.grad is not None and n in self.masks:
                    p.grad.mul_(self.masks[n])

    # outputs ----------------------------------------------------------------------------
    def finalize_unet(self, unet):
        if self.config.trainable == "lora":
            from erasekit.lora import fuse_lora

            self.lora_state = fuse_lora(unet)
        return unet

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        cfg: ResAlignConfig = self.config
        out: dict[str, Any] = {"totals": dict(self.totals), "base": cfg.base,
                               "trainable": cfg.trainable}  # fmt: skip
        if self.lora_state is not None:
            from erasekit.lora import save_lora

            out.update(save_lora(folder, self.lora_state, cfg.rank, cfg.targets()))
        if self.masks:
            from erasekit.methods.salun import MASK_FILE, save_mask

            save_mask(folder / MASK_FILE, self.masks, self.mask_info)
            out.update({"mask": MASK_FILE, **self.mask_info})
        return out
