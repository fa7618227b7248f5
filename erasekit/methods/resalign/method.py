"""The ResAlign method: the outer step, simulated fine-tuning, projection and outputs."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from erasekit.methods import Method
from erasekit.methods.esd import VARIANTS as ESD_VARIANTS
from erasekit.methods.esd import esd_parameters
from erasekit.methods.resalign.config import ResAlignConfig
from erasekit.methods.resalign.meta import META_SD, META_WORLD, SimConfig, load_meta_distribution
from erasekit.methods.resalign.solver import double_backward_ready, make_hvp, norm, proximal_solve
from erasekit.training import Split, TrainContext, make_split, step_generator


@dataclass
class StepStats:
    """What one outer step's simulated fine-tunings did: the step's log fields, and the counts
    summed into the run's totals."""

    COUNTS: ClassVar[tuple[str, ...]] = ("fallbacks", "retries", "hvps", "inner_steps")

    configs: list[str] = field(default_factory=list)
    l_phi: list[float] = field(default_factory=list)  # L_h(φ) per configuration
    inner_first: list[float] = field(default_factory=list)  # simulated fine-tuning losses
    inner_last: list[float] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)  # the solve's last α per configuration
    resilience_norm: list[float] = field(default_factory=list)  # of the terms used
    fallback_reasons: list[str] = field(default_factory=list)
    fallbacks: int = 0
    retries: int = 0
    hvps: int = 0
    inner_steps: int = 0
    seconds_inner: float = 0.0
    seconds_solve: float = 0.0

    def add(self, c: SimConfig, info: dict[str, Any], used: bool) -> None:
        """One configuration's resilience term (``used``: False when it fell back)."""
        self.configs.append(c.name)
        self.inner_steps += c.steps
        self.inner_first.append(info["inner"][0])
        self.inner_last.append(info["inner"][-1])
        self.l_phi.append(info["L_h_phi"])
        self.alpha.append(info["alpha"])
        self.retries += info["retries"]
        self.hvps += info["hvps"]
        self.seconds_inner += info["seconds_inner"]
        self.seconds_solve += info["seconds_solve"]
        if used:
            self.resilience_norm.append(info["norm"])
        else:
            self.fallbacks += 1
            self.fallback_reasons.append(f"{c.name}: {info['reason']}")

    def mean(self, name: str) -> float:
        values = getattr(self, name)
        return sum(values) / len(values) if values else 0.0

    def logs(self) -> dict[str, Any]:
        """The training log's fields for this step."""
        return {
            "L_h_phi": self.mean("l_phi"),
            "inner_loss_first": self.mean("inner_first"),
            "inner_loss_last": self.mean("inner_last"),
            "alpha": self.mean("alpha"),
            "resilience_norm": max(self.resilience_norm, default=0.0),
            "configs": ",".join(self.configs),
            "fallback_reasons": "; ".join(self.fallback_reasons),
            **{key: getattr(self, key) for key in self.COUNTS},
            "seconds_inner": self.seconds_inner,
            "seconds_solve": self.seconds_solve,
        }


class ResAlign(Method):
    name = "resalign"
    summary = ("meta-learns an erasure (over SalUn) that survives simulated downstream "
               "fine-tuning")  # fmt: skip
    source = ("Towards Resilient Safety-driven Unlearning for Diffusion Models against "
              "Downstream Fine-tuning")  # fmt: skip
    preset_file = "resalign"
    Config = ResAlignConfig
    needs_images = True
    sets_gradients = True
    double_backward = True  # Hessian-vector products
    one_concept = "its meta-learned fine-tuning data is one concept's benign set"

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        from erasekit.concepts import is_world_concept

        if is_world_concept(concept):  # presets/resalign.yaml
            dimension = concept.detector.get("dimension")
            return {"surrogate_mode": "fixed", **cls.world_preset(),
                    **cls.world_by_dimension(dimension)}  # fmt: skip
        return {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg: ResAlignConfig = self.config
        file = cfg.meta_distribution or (META_WORLD if self._world() else META_SD)
        self.meta = load_meta_distribution(file, self.concept)
        self.teacher = None
        self.masks: dict[str, torch.Tensor] = {}
        self.mask_info: dict[str, Any] = {}
        self.lora_state: dict | None = None
        self.totals = dict.fromkeys(StepStats.COUNTS, 0)

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
        if cfg.base == "salun" and cfg.surrogate_mode == "replace":
            from erasekit.methods.salun import relabel_prompts, surrogate_pairs, world_relabel
            from erasekit.training import encode_prompt_list

            pairs = surrogate_pairs(cfg, self.concept, owner="resalign")
            if not cfg.surrogate_replacement and self._world():
                pairs = [(w, world_relabel(self.concept)) for w, _ in pairs]
            anchors = relabel_prompts(data["forget"].prompts, pairs)
            data["forget"].anchor = encode_prompt_list(pipe, anchors)
            self.data_info["anchor_examples"] = sorted(set(anchors))[:5]
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
        # the plain module: its forward passes feed autograd.grad, not a backward pass, so a
        # data-parallel wrapper would wait for one; the loop averages the gradients instead
        self.raw = ctx.accelerator.unwrap_model(ctx.unet)
        self.params = dict(self.raw.named_parameters())
        self.decision = {n: p for n, p in self.raw.named_parameters() if p.requires_grad}
        if cfg.base == "esd":
            from erasekit.methods.esd import ESDTeacher

            self.esd = ESDTeacher.from_config(self.teacher, cfg)
        if cfg.base == "salun":
            from erasekit.training import encode_prompts

            self.surrogate = cfg.surrogate or self.concept.surrogate
            self.surrogate_cond = encode_prompts(ctx.pipe, [self.surrogate]).to(ctx.device)
        if cfg.trainable == "mask":
            from erasekit.methods.salun import forget_masks

            masks, self.mask_info = forget_masks(ctx, cfg)
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
        x_t, t, noise = ctx.noisy(batch["latents"], ctx.item_generators(micro))
        out = {"x": x_t, "t": t, "cond": batch["cond"], "anchor": batch.get("anchor")}
        if cfg.base == "ga":
            out["target"] = ctx.denoising_target(batch["latents"], noise, t).float()
        return out

    def harmful_loss(self, ctx: TrainContext, inputs: dict[str, Any], overrides=None):
        """L_h at θ (no overrides) or at φ: ga = −ε-MSE, esd = MSE to ESD's target, salun =
        MSE to the same parameters' (detached) prediction for the surrogate prompt (or, with
        surrogate_mode=replace, each image's anchor prompt)."""
        pred = self._eps(ctx, inputs["x"], inputs["t"], inputs["cond"], overrides)
        if self.config.base == "ga":
            return -F.mse_loss(pred, inputs["target"])
        if self.config.base == "esd":
            return F.mse_loss(pred, inputs["target"])
        with torch.no_grad():
            anchor = inputs.get("anchor")
            if anchor is None:
                anchor = self.surrogate_cond.expand_as(inputs["cond"])
            target = self._eps(ctx, inputs["x"], inputs["t"], anchor, overrides)
        return F.mse_loss(pred, target)

    def retain_loss(self, ctx: TrainContext, micro: int) -> torch.Tensor:
        """R(θ): distillation to the frozen original on retain images."""
        batch = ctx.batch("retain", micro)
        x_t, t, _ = ctx.noisy(batch["latents"], ctx.item_generators(micro, salt=1))
        with torch.no_grad():
            target = self.teacher(x_t.to(self.teacher.dtype), t,
                                  batch["cond"].to(self.teacher.dtype)).sample.float()  # fmt: skip
        return F.mse_loss(self._eps(ctx, x_t, t, self.student_cond(batch)), target)

    def student_cond(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The text conditions the trained U-Net reads in the retain distillation (the
        teacher reads the original encoder's, ``batch["cond"]``): the same here."""
        return batch["cond"]

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
        step = StepStats()
        if cfg.lam > 0:
            k = min(cfg.configs_per_step, len(self.meta.configs))
            gen = step_generator(cfg.seed, ctx.step, ctx.global_micro(micro), 4242)
            picks = torch.randperm(len(self.meta.configs), generator=gen)[:k].tolist()
            index = {n: i for i, n in enumerate(names)}
            for j, ci in enumerate(picks):
                c = self.meta.configs[ci]
                term, info = self.resilience_term(
                    ctx, c, inputs, (ctx.step, ctx.global_micro(micro), j)
                )
                step.add(c, info, used=term is not None)
                for n, t in (term or {}).items():
                    hyper[index[n]] = hyper[index[n]] + t / k
            logs.update(step.logs())
            for key in self.totals:
                self.totals[key] += getattr(step, key)
            logs["outer_passes"] = 2 + k  # L_h(θ), R(θ) and one L_h(φ) per configuration
        logs["g_theta_norm"] = norm(g_theta)
        if "resilience_norm" in logs and logs["g_theta_norm"] > 0:  # the term's weight in the step
            logs["resilience_to_gradient"] = logs["resilience_norm"] / logs["g_theta_norm"]
        logs["hypergrad_norm"] = norm(hyper)
        scale = 1.0 / cfg.gradient_accumulation_steps
        for p, g in zip(theta, hyper, strict=True):
            g = (g * scale).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
        value = outer.detach() + cfg.lam * step.mean("l_phi")
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
