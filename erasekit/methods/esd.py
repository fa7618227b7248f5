"""ESD (Erased Stable Diffusion): fine-tune the U-Net so that, for the concept prompt, it
predicts the frozen original's noise with NEGATIVE guidance away from the concept.

target ("paper")          = ε₀(x_t, "") − η · (ε₀(x_t, c) − ε₀(x_t, ""))
target ("diffusers-code") = ε₀(x_t, c)  − η · (ε₀(x_t, c) − ε₀(x_t, ""))
loss = MSE(ε_θ(x_t, c), target)

The paper's target and the newer diffusers ESD code's (with no erase-from concept given) differ
by one unit of η: the code's η equals the paper's η + 1. ``target`` names the convention.

x_t comes from a partial DDIM sample of the concept prompt (guidance 3) by the FROZEN original
model, down to a random step of a 50-step schedule; this follows the newer diffusers ESD code.
The original ESD code sampled x_t with the model being trained, which makes the training
distribution drift as the model forgets.

Trainable sets: ``esd-x`` cross-attention (attn2) only, the usual choice for styles; ``esd-u``
the Linear and Conv2d weights outside cross-attention, for nudity and objects (the newer code's
set; norms stay frozen); ``esd-u-all`` every parameter outside cross-attention, norms included
(the original code's); ``esd-x-strict`` attn2 to_k/to_v only.
Defaults follow the original paper: 1000 iterations, lr 1e-5, η = 1, batch 1, Adam, gradients
clipped at norm 1. Presets named after their source (``--preset NAME``): ``paper`` and
``diffusers-code`` (200 iterations, lr 5e-5, its η = 2, no clipping).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError
from erasekit.methods import Method
from erasekit.training import TrainConfig, TrainContext, compile_unet

VARIANTS = ("esd-x", "esd-u", "esd-u-all", "esd-x-strict")
TARGETS = ("paper", "diffusers-code")


@dataclass
class ESDConfig(TrainConfig):
    steps: int = 1000
    lr: float = 1e-5
    variant: str = "esd-u"  # default per concept kind: esd-x for styles, esd-u otherwise
    negative_guidance: float = 1.0  # η
    target: str = "paper"  # paper | diffusers-code (see the module docstring)
    ddim_steps: int = 50  # schedule the partial sample's stopping step is drawn from
    sample_guidance: float = 3.0  # CFG scale of the partial sample
    # partial samples per teacher trajectory (1: a fresh trajectory every micro-step; k > 1:
    # one trajectory of the group's prompts serves k micro-steps, see ESD.training_pair)
    teacher_reuse: int = 1

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise ErasekitError(f"variant must be one of {', '.join(VARIANTS)}")
        if self.target not in TARGETS:
            raise ErasekitError(f"target must be one of {', '.join(TARGETS)}")
        if self.ddim_steps < 1:
            raise ErasekitError("ddim_steps must be at least 1")
        if not 1 <= self.teacher_reuse <= self.ddim_steps:
            raise ErasekitError(f"teacher_reuse must be between 1 and ddim_steps "
                                f"({self.ddim_steps}), got {self.teacher_reuse}")  # fmt: skip


def esd_selects(name: str, variant: str, module: torch.nn.Module | None = None) -> bool:
    """Whether U-Net parameter ``name`` (of ``module``) is trained by ``variant``."""
    in_xattn = ".attn2." in name
    if variant == "esd-x":
        return in_xattn
    if variant == "esd-x-strict":
        return in_xattn and (".to_k." in name or ".to_v." in name)
    if variant == "esd-u":
        return not in_xattn and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    return not in_xattn


def esd_parameters(unet, variant: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The U-Net parameters ``variant`` trains, by name."""
    out = []
    for prefix, module in unet.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            if esd_selects(name, variant, module):
                out.append((name, p))
    return out


def esd_target(e_u: torch.Tensor, e_c: torch.Tensor, eta: float, convention: str) -> torch.Tensor:
    """ESD's negatively guided target from the frozen model's unconditional and concept
    predictions, in the paper's or the newer diffusers code's convention."""
    base = e_u if convention == "paper" else e_c
    return base - eta * (e_c - e_u)


class ESDTeacher:
    """ESD's training pairs from a frozen copy of the original U-Net: a partial DDIM sample x_t
    of the concept prompt and the negatively guided target at x_t. Used by ESD and by ResAlign's
    ``base: esd``."""

    def __init__(self, teacher, *, ddim_steps: int, sample_guidance: float,
                 negative_guidance: float, convention: str) -> None:  # fmt: skip
        self.unet = teacher
        self.ddim_steps = ddim_steps
        self.sample_guidance = sample_guidance
        self.negative_guidance = negative_guidance
        self.convention = convention
        self.sampler = None  # built lazily from the training context's scheduler config
        self.fixed_stop: int | None = None  # set: every partial sample stops here (tests)

    @classmethod
    def from_config(cls, teacher, config) -> ESDTeacher:
        """From any config with ESD's ``ddim_steps``, ``sample_guidance``, ``negative_guidance``
        and ``target`` (or ResAlign's ``esd_target``)."""
        convention = getattr(config, "esd_target", None) or config.target
        return cls(teacher, ddim_steps=config.ddim_steps, sample_guidance=config.sample_guidance,
                   negative_guidance=config.negative_guidance, convention=convention)  # fmt: skip

    @torch.no_grad()
    def eps(self, x, t, cond, dtype):
        unet = self.unet
        return unet(x.to(unet.dtype), t, cond.to(unet.dtype)).sample.to(dtype)

    def stop_index(self, gen: torch.Generator) -> int:
        """How many DDIM steps the partial sample takes: uniform over the schedule."""
        stop = int(torch.randint(0, self.ddim_steps, (1,), generator=gen))
        return stop if self.fixed_stop is None else self.fixed_stop

    @torch.no_grad()
    def partial_samples(self, ctx: TrainContext, cond, gen,
                        k: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """k pairs (x_t, t) from ONE trajectory of the frozen teacher: k stop indices drawn
        uniformly over the DDIM schedule, then one sample of ``cond`` run to the deepest of
        them, x taken at each. k = 1 is the reference's partial sample."""
        from diffusers import DDIMScheduler

        if self.sampler is None:
            self.sampler = DDIMScheduler.from_config(ctx.pipe.scheduler.config)
            self.sampler.set_timesteps(self.ddim_steps)
        unet_cfg = ctx.pipe.unet.config
        shape = (cond.shape[0], unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size)
        stops = [self.stop_index(gen)]
        if k > 1:
            stops += [self.stop_index(gen) for _ in range(k - 1)]
        x = torch.randn(shape, generator=gen).to(ctx.device) * self.sampler.init_noise_sigma
        empty = ctx.empty_cond.expand(cond.shape[0], -1, -1)
        timesteps = self.sampler.timesteps
        at = {0: x}
        for i, t in enumerate(timesteps[: max(stops)]):
            both = self.eps(torch.cat([x, x]), t.to(ctx.device), torch.cat([empty, cond]),
                            x.dtype)  # fmt: skip
            e_u, e_c = both.chunk(2)
            eps = e_u + self.sample_guidance * (e_c - e_u)
            x = self.sampler.step(eps, t, x).prev_sample
            if i + 1 in stops:
                at[i + 1] = x
        return [(at[s], timesteps[s].to(ctx.device).expand(cond.shape[0])) for s in stops]

    def partial_sample(self, ctx: TrainContext, cond, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t for a random stop index of the DDIM schedule, sampled by the frozen teacher."""
        return self.partial_samples(ctx, cond, gen)[0]

    @torch.no_grad()
    def target(self, ctx: TrainContext, cond, x_t, t) -> torch.Tensor:
        """The negatively guided teacher target at (x_t, t) for ``cond``."""
        empty = ctx.empty_cond.expand(cond.shape[0], -1, -1)
        e_u, e_c = self.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([empty, cond]),
                            torch.float32).chunk(2)  # fmt: skip
        return esd_target(e_u, e_c, self.negative_guidance, self.convention)

    def forget_target(self, ctx: TrainContext, cond, gen):
        """(x_t, t, target): the partial sample and the negatively guided teacher target."""
        x_t, t = self.partial_sample(ctx, cond, gen)
        return x_t, t, self.target(ctx, cond, x_t, t)


class ESD(Method):
    name = "esd"
    summary = (
        "fine-tunes the U-Net so the concept's prediction points away from it (negative guidance)"
    )
    source = "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023"
    Config = ESDConfig
    runs_on_sdxl = True  # conditions packed with SDXL's pooled embedding (models.py)

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        variant = {"variant": "esd-x" if concept.kind == "style" else "esd-u"}
        if concept.scale == "world":
            return {**variant, **cls.world_preset()}
        return variant

    def trainable_parameters(self, unet):
        return esd_parameters(unet, self.config.variant)

    def setup(self, ctx: TrainContext) -> None:
        """The frozen teacher (never prepared, held in the weight dtype) and its targets."""
        teacher = copy.deepcopy(ctx.unet).requires_grad_(False).eval()
        teacher.to(ctx.device, dtype=ctx.weight_dtype)
        compile_unet(teacher, self.config)
        self.teacher = ESDTeacher.from_config(teacher, self.config)
        self.group: tuple[int, Any, list] | None = None  # (index, cond, partial samples)

    def training_pair(self, ctx: TrainContext, micro: int):
        """(cond, x_t, t) of this micro-step. With ``teacher_reuse`` k > 1, micro-steps are
        grouped k at a time (counted over the run, so a resumed run regroups identically):
        the group's first micro-step draws the prompts and one teacher trajectory, and each
        micro-step of the group takes one of its k partial samples. Every (x_t, t) is still a
        partial sample of its prompts at a uniform stop; within a group the prompts are the
        same and the samples share their initial noise."""
        k = self.config.teacher_reuse
        if k == 1:
            cond = ctx.batch("forget", micro)["cond"]
            return (cond, *self.teacher.partial_sample(ctx, cond, ctx.generator(micro)))
        accumulation = self.config.gradient_accumulation_steps
        position = ctx.step * accumulation + micro
        index = position // k
        if self.group is None or self.group[0] != index:
            now = ctx.step
            ctx.step, first = divmod(index * k, accumulation)
            try:
                cond = ctx.batch("forget", first)["cond"]
                samples = self.teacher.partial_samples(ctx, cond, ctx.generator(first), k)
            finally:
                ctx.step = now
            self.group = (index, cond, samples)
        _, cond, samples = self.group
        return (cond, *samples[position % k])

    def loss(self, ctx: TrainContext, micro: int):
        cond, x_t, t = self.training_pair(ctx, micro)
        target = self.teacher.target(ctx, cond, x_t, t)
        pred = ctx.unet(x_t, t, cond).sample
        loss = F.mse_loss(pred.float(), target)
        return loss, {"t": float(t[0])}
