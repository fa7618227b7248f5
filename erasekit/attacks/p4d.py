"""`p4d`: Prompting4Debugging (Chin et al., P4D): white-box prompts under which the model
under audit predicts the noise the ORIGINAL model predicts for the unsafe prompt.

Per prompt: a target latent x0 (the original model's render of the prompt, or a user image,
as for UnlearnDiffAtk); free tokens held as continuous vectors in the token-embedding space,
projected every step to their nearest typeable vocabulary token by cosine similarity (PEZ):
the forward pass uses the projected tokens, the gradient on them updates the vectors (straight
through). Loss: ||eps_audited(x_t, t, E(adversarial)) - eps_original(x_t, t, E_0(prompt))||^2,
fresh noise every iteration, AdamW (weight decay on the vectors only).

- ``variant: n`` (P4D-N): ``tokens`` free tokens replace the prompt ([SOT, 16 tokens, EOT]).
- ``variant: k`` (P4D-K): the prompt's tokens stay; one free token is inserted before every
  ``every_k`` of them (floor(L / k) + 1 inserted for L tokens), each moved forward to the next
  word start so the prompt text re-tokenises to exactly the optimised ids.

Schedule: UnlearnDiffAtk's optimisation core (``attacks.unlearndiffatk``, as in the
Diffusion-MU-Attack re-implementation of P4D): ``blocks`` timesteps, ``steps_per_block``
iterations each, a render and judgement after each block, stop at the first success. The P4D
code instead draws t at random for 3000 iterations (lr 0.1) and returns the prompt whose render
is closest to the target by CLIP; erasekit judges every block's prompt, so ASR at every budget
comes from one run.

A model with inference-time guidance (``guidance.json``) is attacked through it
(``guided_loss``, P4D's filter mode): the audited side of the loss is the guided prediction at
the prompt's guidance scale (negative-prompt guidance, or SLD's safety term without momentum)
and the original side the plain classifier-free-guided one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from erasekit.attacks.adversarial import check_prompt_file
from erasekit.attacks.unlearndiffatk import UnlearnDiffAtk, noise_prediction
from erasekit.errors import ErasekitError

VARIANTS = ("n", "k")


@dataclass
class P4DConfig:
    prompts: str = ""  # prompt file to attack ("": the concept's forget prompts)
    images: str = ""  # imagefolder of target images ("": rendered by the original model)
    variant: str = "k"  # n: free tokens replace the prompt; k: inserted among its tokens
    tokens: int = 16  # P4D-N's free tokens
    every_k: int = 3  # P4D-K: one free token before every k prompt tokens
    blocks: int = 50  # timesteps (one render + judgement after each)
    steps_per_block: int = 40
    lr: float = 0.01
    weight_decay: float = 0.1
    batch_size: int = 8  # prompts per U-Net pass
    guided_loss: bool = True  # attack a guided model through its guidance
    seed: int = 0

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ErasekitError(f"p4d: variant must be one of n, k, got {self.variant!r}")
        if min(self.tokens, self.every_k, self.blocks, self.steps_per_block, self.batch_size) < 1:
            raise ErasekitError("p4d: tokens, every_k, blocks, steps_per_block, batch_size >= 1")
        if self.tokens > 75:
            raise ErasekitError(f"p4d: tokens must be at most 75, got {self.tokens}")
        if self.lr <= 0:
            raise ErasekitError(f"p4d: lr must be positive, got {self.lr}")
        check_prompt_file(self.prompts)
        if self.images:
            from erasekit.data import read_image_folder

            read_image_folder(self.images)


def insertion_layout(tok, prompt: str, every_k: int) -> list[int | None]:
    """P4D-K's token sequence without SOT/EOT: the prompt's ids with ``None`` for each free
    token, one before every ``every_k`` prompt tokens (moved forward to the next word start),
    the prompt truncated so the whole fits the context."""
    body = tok(prompt, add_special_tokens=False).input_ids
    n = tok.model_max_length - 2
    while body and len(body) + len(body) // every_k + 1 > n:
        body = body[:-1]
    pieces = tok.convert_ids_to_tokens(body)
    starts = [j == 0 or pieces[j - 1].endswith("</w>") for j in range(len(body))] + [True]
    out: list[int | None] = []
    pending = 0
    for j in range(len(body) + 1):
        if j % every_k == 0:
            pending += 1
        if pending and starts[j]:
            out += [None] * pending
            pending = 0
        if j < len(body):
            out.append(body[j])
    return out


def layout_text(tok, layout: list[int | None], free: list[int]) -> str:
    """The text of a layout with its free tokens filled: words joined by spaces."""
    words, word, it = [], [], iter(free)
    for i in layout:
        if i is None:
            if word:
                words.append(tok.decode(word).strip())
                word = []
            words.append(tok.decode([next(it)]).strip())
        else:
            word.append(i)
            if tok.convert_ids_to_tokens(i).endswith("</w>"):
                words.append(tok.decode(word).strip())
                word = []
    if word:
        words.append(tok.decode(word).strip())
    return " ".join(w for w in words if w)


class P4D(UnlearnDiffAtk):
    name = "p4d"
    summary = (
        "P4D: white-box prompt tokens under which the model predicts the original's noise "
        "for the prompt"
    )
    Config = P4DConfig
    # world budget by rule: UnlearnDiffAtk's ``defaults`` (inherited: the same timesteps and
    # gradient steps), so the two white-box attacks' curves compare at equal effort

    @classmethod
    def requires_original(cls, config) -> bool:
        return True  # the loss's target is the original model's prediction

    def prepare(self, limit: int | None = None) -> dict[str, Any]:
        if self.ctx.original is None:
            raise ErasekitError("p4d needs the original model (--reference PATH): its noise "
                                "prediction is the attack's target")  # fmt: skip
        self.original = None
        data = super().prepare(limit)  # renders the targets with ``original_pipeline()``
        self.original_pipeline()
        return data

    def original_pipeline(self):
        """The original model, loaded once (targets and the loss's predictions), frozen."""
        if self.original is None:
            self.original = super().original_pipeline()
            for module in (self.original.unet, self.original.vae, self.original.text_encoder):
                module.requires_grad_(False)
        return self.original

    # ---- the hooks of UnlearnDiffAtk's optimisation core

    def slots(self, tok, part: list[dict]):
        from erasekit.prefix import prompt_ids

        cfg = self.config
        if cfg.variant == "n":
            ids = prompt_ids(tok, "", cfg.tokens).expand(len(part), -1).clone()
            return ids, None, torch.full((len(part),), cfg.tokens)
        n = tok.model_max_length
        self.layouts = [insertion_layout(tok, o["prompt"], cfg.every_k) for o in part]
        ids = torch.full((len(part), n), tok.pad_token_id)
        positions = torch.zeros((len(part), n), dtype=torch.bool)
        for row, layout in enumerate(self.layouts):
            seq = [tok.bos_token_id] + [tok.eos_token_id if i is None else i for i in layout]
            ids[row, : len(seq) + 1] = torch.tensor(seq + [tok.eos_token_id])
            positions[row, 1 : len(seq)] = torch.tensor([i is None for i in layout])
        return ids, positions, positions.sum(1)

    def variables(self, start: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Continuous vectors, at the starting tokens' embeddings."""
        return table[start].clone()

    def make_optimizer(self, x: torch.Tensor) -> torch.optim.Optimizer:
        return torch.optim.AdamW([x], lr=self.config.lr, weight_decay=self.config.weight_decay)

    def hard_tokens(self, x: torch.Tensor, table: torch.Tensor):
        """The nearest vocabulary token by cosine similarity; the gradient on its embedding
        goes to the continuous vector (straight through)."""
        unit = torch.nn.functional.normalize(table, dim=-1)
        nearest = (torch.nn.functional.normalize(x.detach(), dim=-1) @ unit.T).argmax(-1)
        return table[nearest] + x - x.detach(), nearest

    def after_step(self, x: torch.Tensor) -> None:
        pass

    def text(self, tok, hard: list[int], o: dict) -> str:
        if self.config.variant == "n":
            from erasekit.attacks.adversarial import ids_to_text

            return ids_to_text(tok, hard)
        return layout_text(tok, self.layouts[self._row[o["index"]]], hard)

    def attack_batch(self, pipe, part, latents, judge) -> float:
        """UnlearnDiffAtk's core, with the batch's fixed encodings made first (outside the
        free-token splice): the original's prompt (and unconditional) encodings, the audited
        model's guidance encodings."""
        from erasekit.training import encode_prompts

        self._row = {o["index"]: r for r, o in enumerate(part)}
        prompts = [o["prompt"] for o in part]
        with torch.no_grad():
            self._target_cond = encode_prompts(self.original, prompts)
            self._guided = None
            guidance = getattr(pipe, "erasekit_guidance", None)
            if guidance is not None and self.config.guided_loss:
                blank = encode_prompts(self.original, [""])
                negative = encode_prompts(pipe, [guidance.concept])
                empty = encode_prompts(pipe, [""])
                self._guided = (guidance, blank, negative, empty)
        return super().attack_batch(pipe, part, latents, judge)

    def loss(self, pipe, cond, x0, t: int, noise, part: list[dict]) -> torch.Tensor:
        """Per prompt: ||eps_audited(E(adversarial)) - eps_original(E_0(prompt))||^2."""
        rows = [self._row[o["index"]] for o in part]
        orig = self.original
        with torch.no_grad():
            target = noise_prediction(orig.unet, orig.scheduler, self._target_cond[rows], x0, t,
                                      noise)[0]  # fmt: skip
        pred = noise_prediction(pipe.unet, pipe.scheduler, cond, x0, t, noise)[0]
        if self._guided is not None:
            pred, target = self._guided_pair(pipe, pred, target, x0, t, noise, part)
        return ((pred - target) ** 2).flatten(1).mean(1)

    def _guided_pair(self, pipe, pred, target, x0, t, noise, part):
        """(the guided model's prediction, the original's CFG prediction) at each prompt's
        guidance scale."""
        from erasekit.guidance import sld_step

        guidance, blank, negative, empty = self._guided
        b = len(part)
        scale = torch.tensor([float(o["guidance"]) for o in part]).view(-1, 1, 1, 1).to(pred)
        orig = self.original
        with torch.no_grad():
            e0 = noise_prediction(orig.unet, orig.scheduler, blank.expand(b, -1, -1), x0, t,
                                  noise)[0]  # fmt: skip
            target = e0 + scale * (target - e0)
            e_neg = noise_prediction(pipe.unet, pipe.scheduler, negative.expand(b, -1, -1), x0,
                                     t, noise)[0]  # fmt: skip
        if guidance.mode == "negative-prompt":
            return e_neg + scale * (pred - e_neg), target
        with torch.no_grad():
            e_u = noise_prediction(pipe.unet, pipe.scheduler, empty.expand(b, -1, -1), x0, t,
                                   noise)[0]  # fmt: skip
        momentum = torch.zeros_like(pred)
        guided, _ = sld_step(e_u, pred, e_neg, momentum, guidance.sld, guidance.sld.warmup,
                             scale)  # fmt: skip
        return guided, target
