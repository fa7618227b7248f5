"""AdvUnlearn: adversarial training of the text encoder against prefix attacks, ESD as the
unlearning loss, with a retain regulariser.

Each step (after ``warmup`` steps on the plain concept prompt):

1. the inner attack (``erasekit.prefix.prefix_attack``): ``k`` vectors in the token-embedding
   space after the start token, warm-started from the previous attack (``attack_init:
   latest``; first time, and with ``random``, the embeddings of random vocabulary tokens),
   ``attack_steps`` Adam steps (``pgd``) or Adam on the gradient's sign (``fast_at``) at
   ``attack_lr``, minimising ``‖ε(x_t, t, E_θ([SOT, adv, prompt])) − ε₀(x_t, t, E₀(prompt))‖²``:
   the being-unlearned text encoder made to reproduce the original's concept prediction;
2. one outer step on ``L = ‖ε(x_t, t, E_θ(adv prompt)) − target‖² + γ·L_retain``: the target is
   ESD's negatively guided one (``ε₀(x_t, "") − η(ε₀(x_t, c) − ε₀(x_t, ""))``) at a partial DDIM
   sample of the concept prompt by the original model (guidance 3); ``L_retain`` =
   ``‖ε(x_r, t_r, E_θ(r)) − ε₀(x_r, t_r, E₀(r))‖²`` over ``retain_batch`` retain prompts, x_r
   sampled the same way.

Only the text encoder changes: its transformer layers and final layer norm (``layers``: all, or
a list such as ``0,1,11`` / ``0-5``; ``component``: all, attn or mlp), the token and position
embedding tables frozen; the U-Net stays the original. The output folder's ``text_encoder/``
is a plain ``CLIPTextModel``: swap it into another pipeline of the same family.

Where this differs from the public code (OPTML-Group/AdvUnlearn): the attack's optimiser
gradient is fresh every step (the code accumulates it over the attack's steps); by default
the attack reuses the outer step's (x_t, t) for its steps instead of a fresh partial sample
per attack step (``attack_fresh_samples: true`` draws them, at ~``ddim_steps`` U-Net passes
each); the retain prompts are the concept's retain set (the code's COCO objects for every
concept), and the retain sample draws its own stop step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError
from erasekit.methods import Method
from erasekit.methods.esd import ESDTeacher
from erasekit.prefix import ATTACK_METHODS, free_token_embeddings, prefix_attack, prompt_ids
from erasekit.training import Split, TrainConfig, TrainContext, make_split

COMPONENTS = {"all": "", "attn": ".self_attn.", "mlp": ".mlp."}
INITS = ("latest", "random")


@dataclass
class AdvUnlearnConfig(TrainConfig):
    steps: int = 1000
    lr: float = 1e-5
    layers: str = "all"  # text-encoder layers trained: all, or e.g. "0,1,11" / "0-5"
    component: str = "all"  # all | attn | mlp (the final layer norm is trained with any)
    retain_weight: float = 0.5  # γ (the maintainers: 0.3 for nudity, 0.5 styles and objects)
    retain_batch: int = 5  # retain prompts per step
    warmup: int = 200  # steps on the plain concept prompt before the attack starts
    k: int = 1  # adversarial prefix vectors
    attack_steps: int = 30
    attack_lr: float = 1e-3
    attack_method: str = "pgd"  # pgd (Adam) | fast_at (Adam on the gradient's sign)
    attack_init: str = "latest"  # latest: warm start from the previous attack | random
    attack_every: int = 1  # a new attack every this many steps (the latest is reused between)
    attack_fresh_samples: bool = False  # a fresh partial sample for every attack step
    negative_guidance: float = 1.0  # η
    target: str = "paper"  # ESD's target convention
    ddim_steps: int = 50
    sample_guidance: float = 3.0

    def validate(self) -> None:
        super().validate()
        if self.component not in COMPONENTS:
            raise ErasekitError(f"component must be one of {', '.join(COMPONENTS)}")
        if self.attack_method not in ATTACK_METHODS:
            raise ErasekitError(f"attack_method must be one of {', '.join(ATTACK_METHODS)}")
        if self.attack_init not in INITS:
            raise ErasekitError(f"attack_init must be one of {', '.join(INITS)}")
        if min(self.k, self.attack_every, self.retain_batch, self.ddim_steps) < 1:
            raise ErasekitError("k, attack_every, retain_batch and ddim_steps must be >= 1")
        if self.attack_steps < 0 or self.warmup < 0 or self.retain_weight < 0:
            raise ErasekitError("attack_steps, warmup and retain_weight must be >= 0")
        parse_layers(self.layers, 10**6)


def parse_layers(text: str, n: int) -> list[int]:
    """Layer indices from ``all`` or a list of indices and ranges (``0,1,11``, ``0-5``)."""
    if text == "all":
        return list(range(n))
    chosen: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ErasekitError(f"layers: {part!r} is not an index or a range (e.g. 0,1,11 or 0-5)")
        lo, hi = int(m[1]), int(m[2] or m[1])
        chosen += range(lo, hi + 1)
    if not chosen or max(chosen) >= n:
        raise ErasekitError(f"layers={text}: the text encoder has {n} layers (0-{n - 1})")
    return sorted(set(chosen))


class Adversary:
    """The latest adversarial prefix (warm start), saved with every checkpoint."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class AdvUnlearn(Method):
    name = "advunlearn"
    summary = "adversarially trains the text encoder against prefix attacks, with ESD's loss"
    source = (
        "Zhang et al., Defensive Unlearning with Adversarial Training for Robust Concept"
        " Erasure in Diffusion Models, NeurIPS 2024"
    )
    Config = AdvUnlearnConfig
    uses_text_encoder = True
    one_concept = "its attack and ESD target are one concept's prompts"

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        return cls.world_defaults(concept) if concept.scale == "world" else {}

    def prepare_data(self, pipe) -> dict[str, Split]:
        cfg: AdvUnlearnConfig = self.config
        forget = list(self.concept.forget.prompts)
        retain = list(self.concept.retain.prompts)
        data = {"forget": make_split(pipe, forget), "retain": make_split(pipe, retain)}
        data["forget"].ids = torch.stack([prompt_ids(pipe.tokenizer, p, cfg.k) for p in forget])
        data["retain"].ids = torch.stack([prompt_ids(pipe.tokenizer, p) for p in retain])
        self.data_info = {"forget": self.concept.forget.describe(),
                          "retain": self.concept.retain.describe()}  # fmt: skip
        return data

    def trained_module(self, pipe) -> torch.nn.Module:
        return pipe.text_encoder

    def trainable_parameters(self, encoder):
        cfg: AdvUnlearnConfig = self.config
        model = getattr(encoder, "text_model", encoder)
        base = "text_model." if model is not encoder else ""
        chosen = parse_layers(cfg.layers, len(model.encoder.layers))
        part = COMPONENTS[cfg.component]
        out = []
        for name, p in model.named_parameters():
            layer = re.match(r"encoder\.layers\.(\d+)\.", name)
            if name.startswith("final_layer_norm.") or (
                layer and int(layer[1]) in chosen and part in name
            ):
                out.append((base + name, p))
        return out

    def setup(self, ctx: TrainContext) -> None:
        """The frozen U-Net as ESD's teacher (the original encoder's conditions are the data's,
        encoded before training) and the adversary's state registered for checkpoints."""
        self.teacher = ESDTeacher.from_config(ctx.pipe.unet, self.config)
        self.adversary = Adversary()
        ctx.accelerator.register_for_checkpointing(self.adversary)
        self.attacks = 0

    def start_vectors(self, ctx: TrainContext, b: int, gen: torch.Generator) -> torch.Tensor:
        cfg: AdvUnlearnConfig = self.config
        latest = self.adversary.value
        if cfg.attack_init == "latest" and latest is not None and latest.shape[0] == b:
            return latest.to(ctx.device)
        # the token table is frozen: the trained encoder's is the original's
        table = ctx.accelerator.unwrap_model(ctx.trained).get_input_embeddings().weight
        ids = torch.randint(0, table.shape[0], (b, cfg.k), generator=gen)
        return table[ids.to(table.device)].detach().float().to(ctx.device)

    def attack(self, ctx: TrainContext, ids, cond0, x_t, t, gen) -> torch.Tensor:
        """The inner attack's prefix for this step's forget prompts."""
        cfg: AdvUnlearnConfig = self.config
        encoder = ctx.accelerator.unwrap_model(ctx.trained)
        concept_eps = self.teacher.eps(x_t, t, cond0, torch.float32)
        samples = {0: (x_t, t, concept_eps)}

        def loss_of(cond, step):
            if cfg.attack_fresh_samples and step not in samples:
                x, tt = self.teacher.partial_sample(ctx, cond0, gen)
                samples[step] = (x, tt, self.teacher.eps(x, tt, cond0, torch.float32))
            x, tt, eps0 = samples[step if cfg.attack_fresh_samples else 0]
            return F.mse_loss(ctx.unet(x, tt, cond).sample.float(), eps0)

        start = self.start_vectors(ctx, ids.shape[0], gen)
        adv, losses = prefix_attack(encoder, ids, start, loss_of, steps=cfg.attack_steps,
                                    lr=cfg.attack_lr, method=cfg.attack_method)  # fmt: skip
        self.adversary.value = adv.cpu()
        self.attack_loss = losses[-1] if losses else None
        self.attacks += 1
        return adv

    def encode(self, ctx: TrainContext, ids, adv) -> torch.Tensor:
        """E_θ of ``ids``: the prefixed layout with ``adv`` spliced in, or without a prefix
        (the slots dropped) when ``adv`` is None."""
        if adv is None:
            k = self.config.k
            ids = torch.cat([ids[:, :1], ids[:, 1 + k :], ids[:, -1:].expand(-1, k)], dim=1)
            return ctx.trained(ids)[0]
        embeds = {"value": adv}
        encoder = ctx.accelerator.unwrap_model(ctx.trained)
        with free_token_embeddings(encoder, embeds):
            return ctx.trained(ids)[0]

    def loss(self, ctx: TrainContext, micro: int):
        cfg: AdvUnlearnConfig = self.config
        gen = ctx.generator(micro)
        batch = ctx.batch("forget", micro)
        cond0, ids = batch["cond"], batch["ids"]
        x_t, t = self.teacher.partial_sample(ctx, cond0, gen)
        target = self.teacher.target(ctx, cond0, x_t, t)
        adv, self.attack_loss = None, None
        if ctx.step >= cfg.warmup and cfg.attack_steps:
            if (ctx.step - cfg.warmup) % cfg.attack_every == 0 or self.adversary.value is None:
                adv = self.attack(ctx, ids, cond0, x_t, t, gen)
            else:
                adv = self.adversary.value.to(ctx.device)
        pred = ctx.unet(x_t, t, self.encode(ctx, ids, adv)).sample
        forget = F.mse_loss(pred.float(), target)
        logs = {
            "t": float(t[0]),
            "forget": float(forget.detach()),
            "attacked": float(adv is not None),
        }
        if self.attack_loss is not None:  # the inner attack's loss at its last step
            logs["attack_loss"] = self.attack_loss
        if not cfg.retain_weight:
            return forget, logs
        retain = ctx.data["retain"]
        pick = torch.randperm(len(retain), generator=gen)[: cfg.retain_batch]
        r_cond, r_ids = retain.cond[pick].to(ctx.device), retain.ids[pick].to(ctx.device)
        x_r, t_r = self.teacher.partial_sample(ctx, r_cond, gen)
        kept = self.teacher.eps(x_r, t_r, r_cond, torch.float32)
        r_loss = F.mse_loss(ctx.unet(x_r, t_r, ctx.trained(r_ids)[0]).sample.float(), kept)
        logs["retain"] = float(r_loss.detach())
        return forget + cfg.retain_weight * r_loss, logs

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        return {"text_encoder": "text_encoder/ (a CLIPTextModel: swap it into a pipeline of the"
                                " same family)", "attacks_run": self.attacks}  # fmt: skip
