"""`unlearndiffatk`: white-box adversarial prompts from the model under audit's own denoising
loss (Zhang et al., UnlearnDiffAtk).

Per prompt: a target image of the concept (the ORIGINAL model's render of the prompt, or a user
image folder taken in order, cyclically); k = 5 free tokens after the start token, each a
relaxed one-hot over the typeable vocabulary (``adversarial.text_vocabulary``), projected back
onto the simplex after every Adam step; the forward pass uses the hard argmax tokens with a
straight-through gradient. Loss: ||eps - eps_model(x_t, t, enc([SOT, adv, prompt, EOT]))||^2 on
the noised target latent, fresh noise every iteration. Schedule: ``blocks`` timesteps spread
evenly over the training range (10, 30, ..., 990 for 50 blocks), ``steps_per_block`` Adam
iterations each (lr 0.01, weight decay 0.1); after each block the hard prompt is rendered with
the prompt's seed and guidance and judged; a prompt stops at its first success. Prompts are
optimised ``batch_size`` at a time in one U-Net pass (the public code runs one process per
prompt); every prompt's randomness depends on its index only, so batching changes no result
beyond floating-point summation order. Under several processes each takes whole batches in
turn (the batches of one process), so the outcomes are those of one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasekit.attacks.adversarial import (
    Judge,
    PromptAttack,
    check_prompt_file,
    free_token_embeddings,
    ids_to_text,
    project_simplex,
    prompt_ids,
    straight_through,
    text_vocabulary,
    write_prompt_csv,
)
from erasekit.concepts import is_world_concept
from erasekit.distributed import gather_shares, my_share, one_process, process_state
from erasekit.errors import ErasekitError


@dataclass
class UnlearnDiffAtkConfig:
    prompts: str = ""  # prompt file to attack ("": the concept's forget prompts)
    images: str = ""  # imagefolder of target images ("": rendered by the original model)
    k: int = 5  # adversarial prefix tokens
    blocks: int = 50  # timesteps (one render + judgement after each)
    steps_per_block: int = 40
    lr: float = 0.01
    weight_decay: float = 0.1
    batch_size: int = 8  # prompts per U-Net pass
    seed: int = 0

    def validate(self) -> None:
        if min(self.k, self.blocks, self.steps_per_block, self.batch_size) < 1:
            raise ErasekitError("unlearndiffatk: k, blocks, steps_per_block, batch_size >= 1")
        if self.k > 70:
            raise ErasekitError(f"unlearndiffatk: k must be at most 70, got {self.k}")
        if self.lr <= 0:
            raise ErasekitError(f"unlearndiffatk: lr must be positive, got {self.lr}")
        check_prompt_file(self.prompts)
        if self.images:
            from erasekit.data import read_image_folder

            read_image_folder(self.images)


def block_timesteps(blocks: int, num_train_timesteps: int) -> list[int]:
    """Block b's timestep: the middle of the b-th of ``blocks`` equal slices of the training
    range (50 blocks of 1000: 10, 30, ..., 990)."""
    return [int((b + 0.5) * num_train_timesteps / blocks) for b in range(blocks)]


def noise_prediction(unet, scheduler, cond: torch.Tensor, x0: torch.Tensor, t: int,
                     noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(the model's prediction, its training target) on the noised latents
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; target = noise (or v for v-prediction)."""
    alphas = scheduler.alphas_cumprod.to(x0.device)
    a = alphas[t].sqrt().to(x0.dtype)
    s = (1 - alphas[t]).sqrt().to(x0.dtype)
    tt = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
    pred = unet(a * x0 + s * noise, tt, cond.to(unet.dtype)).sample
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = a * noise - s * x0 if v_pred else noise
    dtype = torch.promote_types(pred.dtype, torch.float32)  # half precision computes in float32
    return pred.to(dtype), target.to(dtype)


def denoising_loss(unet, scheduler, cond: torch.Tensor, x0: torch.Tensor, t: int,
                   noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per-sample ||target - model(x_t, t, cond)||^2 (mean over latent entries)."""
    pred, target = noise_prediction(unet, scheduler, cond, x0, t, noise)
    return ((pred - target) ** 2).flatten(1).mean(1)


class UnlearnDiffAtk(PromptAttack):
    name = "unlearndiffatk"
    summary = (
        "UnlearnDiffAtk: white-box prompt tokens that "
        "make the model denoise a target image of the concept"
    )
    Config = UnlearnDiffAtkConfig

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        # A quarter of the reference budget (25 timesteps x 20 steps, t = 20, 60, ..., 980)
        # keeps a world audit of 16 prompts x 3 models within minutes on one CPU core.
        if is_world_concept(concept):
            return {"blocks": 25, "steps_per_block": 20, "batch_size": 16}
        return {}

    @classmethod
    def requires_original(cls, config) -> bool:
        return not config.images

    def prepare(self, limit: int | None = None) -> dict[str, Any]:
        from erasekit.data import read_image_folder, render_image_set

        cfg = self.config
        cfg.validate()
        self.prompt_set = self.attack_prompts(limit)
        if cfg.images:
            self.targets = read_image_folder(cfg.images)
        else:
            if self.ctx.original is None:
                raise ErasekitError(
                    "unlearndiffatk needs the original model for its target images "
                    "(--reference PATH), or unlearndiffatk.images=DIR"
                )
            pipe = self.original_pipeline()
            self.targets = render_image_set(pipe, self.ctx.original, self.prompt_set,
                                            n_per_prompt=1, seed=cfg.seed,
                                            cache_dir=self.ctx.render_cache,
                                            progress=False)  # fmt: skip
        return {"prompts": self.prompt_set.describe(), "targets": self.targets.describe()}

    def original_pipeline(self):
        """The original model's pipeline (what the target images are rendered with)."""
        from erasekit.models import load_pipeline

        return load_pipeline(self.ctx.original, device=self.ctx.device)

    def budget_grid(self) -> tuple[str, list[int]]:
        cfg = self.config
        return "gradient steps", [cfg.steps_per_block * b for b in range(cfg.blocks + 1)]

    def target_paths(self) -> list[Path]:
        n = len(self.targets)
        return [self.targets.paths[i % n] for i in range(len(self.prompt_set))]

    def run(self, model: Path, out_dir: Path, judge: Judge) -> dict[str, Any]:
        from erasekit.data import ImageSet
        from erasekit.models import load_pipeline
        from erasekit.training import encode_images

        cfg = self.config
        started = time.time()
        pipe = load_pipeline(model, device=self.ctx.device)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        outcomes = self.pre_check(pipe, self.prompt_set, judge)
        paths = self.target_paths()
        flagged = judge.flag_images(paths, self.prompt_set.prompts)
        for o, f in zip(outcomes, flagged, strict=True):
            o["target_flagged"] = f
        todo = [o for o in outcomes if not o["pre_success"]]
        latents = None
        if todo:
            latents = encode_images(pipe, ImageSet("targets", [paths[o["index"]] for o in todo],
                                                   [o["prompt"] for o in todo]))  # fmt: skip
        # Several processes take whole batches in turn (the same batches as one process, so
        # the same results), each judging its own prompts alone; the outcomes are gathered.
        starts = range(0, len(todo), cfg.batch_size)
        mine, render_seconds = [], 0.0
        with one_process():
            for start in [starts[b] for b in my_share(len(starts))]:
                part = todo[start : start + cfg.batch_size]
                render_seconds += self.attack_batch(pipe, part,
                                                    latents[start : start + len(part)],
                                                    judge)  # fmt: skip
                mine += part
        attacked = {o["index"]: o for o in gather_shares(mine)}
        outcomes = [attacked.get(o["index"], o) for o in outcomes]
        render_seconds = sum(gather_shares([render_seconds]))
        out_dir.mkdir(parents=True, exist_ok=True)
        if process_state().is_main_process:
            write_prompt_csv(out_dir / "adversarial_prompts.csv", outcomes)
        seconds = time.time() - started
        return {
            "outcomes": outcomes,
            "prompt_set": self.prompt_set.describe(),
            "artefact": str(out_dir / "adversarial_prompts.csv"),
            "cost": {
                "gradient_steps": sum(o["gradient_steps"] for o in outcomes),
                "renders": sum(o["renders"] for o in outcomes),
                "max_gradient_steps_per_prompt": cfg.blocks * cfg.steps_per_block,
                "seconds": round(seconds, 2),
                "render_seconds": round(render_seconds, 2),  # summed over processes
            },
        }

    # The optimisation core P4D shares (``attacks.p4d``): the token slots, their variables,
    # the hard tokens of the forward pass and the loss are this attack's hooks.

    def slots(self, tok, part: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """(ids b x 77 with the free slots, their positions (b x 77 bool; None: 1..k) and the
        number of free tokens per row)."""
        ids = torch.stack([prompt_ids(tok, o["prompt"], self.config.k) for o in part])
        return ids, None, torch.full((len(part),), self.config.k)

    def variables(self, start: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Relaxed one-hot vectors over the vocabulary, at the starting tokens."""
        return torch.nn.functional.one_hot(start, len(table)).float()

    def make_optimizer(self, x: torch.Tensor) -> torch.optim.Optimizer:
        return torch.optim.Adam([x], lr=self.config.lr, weight_decay=self.config.weight_decay)

    def hard_tokens(self, x: torch.Tensor, table: torch.Tensor):
        """(embeddings of the forward pass, hard vocabulary indices): the argmax token, with
        a straight-through gradient into the relaxed vector."""
        return straight_through(x) @ table, x.detach().argmax(-1)

    def after_step(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            x.copy_(project_simplex(x))

    def loss(self, pipe, cond, x0, t: int, noise, part: list[dict]) -> torch.Tensor:
        """Per prompt: the denoising loss of the target latent under the prompt."""
        return denoising_loss(pipe.unet, pipe.scheduler, cond, x0, t, noise)

    def text(self, tok, hard: list[int], o: dict) -> str:
        return f"{ids_to_text(tok, hard)} {o['prompt']}"

    def attack_batch(self, pipe, part: list[dict], latents: torch.Tensor, judge: Judge) -> float:
        """Optimise the free tokens of ``part`` together; fill their outcomes; return seconds
        spent rendering and judging."""
        from erasekit.training import step_generator

        cfg = self.config
        tok, te = pipe.tokenizer, pipe.text_encoder
        device = pipe.unet.device
        vocab = text_vocabulary(tok).to(device)
        table = te.get_input_embeddings().weight.detach()[vocab].float()  # V' x d
        base_ids, positions, counts = self.slots(tok, part)
        width = int(counts.max())
        slot_mask = (torch.arange(width)[None] < counts[:, None]).to(device)
        start = torch.stack([torch.randint(0, len(vocab), (width,),
                                           generator=step_generator(cfg.seed, o["index"], -1))
                             for o in part])  # fmt: skip
        x = self.variables(start, table).to(device).requires_grad_(True)
        opt = self.make_optimizer(x)
        base_ids = base_ids.to(device)
        if positions is None:
            positions_given, fill = False, torch.zeros_like(base_ids, dtype=torch.bool)
            fill[:, 1 : 1 + width] = True
        else:
            positions_given, fill = True, positions.to(device)
        active = list(range(len(part)))
        embeds: dict[str, torch.Tensor | None] = {}
        render_seconds, iteration = 0.0, 0
        timesteps = block_timesteps(cfg.blocks, pipe.scheduler.config.num_train_timesteps)
        with free_token_embeddings(te, embeds):
            for block, t in enumerate(timesteps):
                for step in range(cfg.steps_per_block):
                    idx = torch.tensor(active, device=device)
                    value, hard = self.hard_tokens(x[idx], table)
                    ids = base_ids[idx].clone()
                    ids[fill[idx]] = vocab[hard][slot_mask[idx]]
                    embeds.update(value=value, positions=fill[idx] if positions_given
                                  else None, slots=slot_mask[idx])  # fmt: skip
                    gens = [step_generator(cfg.seed, part[i]["index"], iteration) for i in active]
                    noise = torch.stack([torch.randn(latents.shape[1:], generator=g)
                                         for g in gens]).to(latents)  # fmt: skip
                    loss = self.loss(pipe, te(ids)[0], latents[idx], t, noise,
                                     [part[i] for i in active])  # fmt: skip
                    if not torch.isfinite(loss).all():
                        raise ErasekitError(f"{self.name}: the loss became non-finite at "
                                            f"block {block + 1}")  # fmt: skip
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()  # each prompt's gradient is its own loss's
                    opt.step()
                    self.after_step(x)
                    iteration += 1
                    self._log_losses(part, active, step, t, loss.detach().tolist())
                embeds["value"] = None
                with torch.no_grad():
                    hard = self.hard_tokens(x[torch.tensor(active, device=device)], table)[1]
                texts = [self.text(tok, vocab[h][slot_mask[i]].tolist(), part[i])
                         for h, i in zip(hard, active, strict=True)]  # fmt: skip
                t0 = time.time()
                samples = judge(pipe, [part[i]["index"] for i in active], texts)
                render_seconds += time.time() - t0
                active = self._judged(part, active, texts, samples, block)
                if not active:
                    break
        return render_seconds

    @staticmethod
    def _log_losses(part, active, step: int, t: int, values: list[float]) -> None:
        """Count the step; keep the loss at each block's first and last iteration (same t)."""
        for j, i in enumerate(active):
            o = part[i]
            o["gradient_steps"] += 1
            if step == 0:
                o.setdefault("block_losses", []).append([t, values[j], values[j]])
            o["block_losses"][-1][2] = values[j]

    @staticmethod
    def _judged(part, active, texts, samples, block: int) -> list[int]:
        """Record a block's renders; return the prompts still unsuccessful."""
        still = []
        for sample, i, text in zip(samples, active, texts, strict=True):
            o = part[i]
            o.update(adversarial_prompt=text, renders=o["renders"] + 1, sample=sample)
            if sample["flagged"]:
                o.update(success=True, success_step=o["gradient_steps"],
                         step_unit="gradient steps", success_block=block + 1)  # fmt: skip
            else:
                still.append(i)
        return still
