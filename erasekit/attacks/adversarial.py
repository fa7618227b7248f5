"""What the adversarial-prompt attacks share: the typeable vocabulary, the relaxed one-hot
tools (simplex projection, straight-through sample), text encoding with free token
embeddings, the pre-check and per-prompt outcomes (the audit turns them into pre-ASR / ASR:
``audit.prompt_attack_metrics``).

An adversarial-prompt attack (``kind = "prompt"``) leaves the weights alone: per prompt it
first renders the unmodified prompt on the model under audit (a success there counts toward
pre-ASR and is not attacked), then searches for a prompt that makes the model show the concept.
Every prompt it reports is plain text a user could type: tokens are drawn from the whole-word
tokens that re-tokenize to themselves, so the text renders exactly the optimised token ids.

ASR = (pre-attack successes + successes under attack) / N prompts, one image per prompt (the
published protocol), judged by the audit's primary protocol; pre-ASR counts the pre-check only.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from erasekit.attacks import Attack
from erasekit.errors import ErasekitError
from erasekit.prefix import free_token_embeddings, prompt_ids

# judge(pipe, indices, prompts) -> one scored sample per prompt, each with "flagged" (the
# primary protocol), rendered with the seed and guidance of attack prompt ``indices[j]``
Judge = Callable[..., list[dict[str, Any]]]


def project_simplex(x: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row (last dimension) onto the probability simplex
    {w >= 0, sum w = 1}, exact, without sorting (Michelot's algorithm): the threshold of the
    current support, then the entries above it, until the support stops changing. The
    threshold only rises, so the support only shrinks (also under rounding: an entry once out
    stays out) and this ends; over a vocabulary it takes a few passes, where a sort of every
    row was the attack's costliest step."""
    support = torch.ones_like(x, dtype=torch.bool)
    while True:
        count = support.sum(-1, keepdim=True)
        theta = (torch.where(support, x, 0).sum(-1, keepdim=True, dtype=torch.float64) - 1) / count
        theta = theta.to(x.dtype)
        inside = support & (x > theta)
        if torch.equal(inside, support):
            return (x - theta).clamp_min(0)
        support = inside


def straight_through(x: torch.Tensor) -> torch.Tensor:
    """The hard one-hot of each row's argmax in the forward pass, the identity's gradient in
    the backward pass."""
    hard = torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)
    return hard + x - x.detach()


@functools.lru_cache(maxsize=4)
def _vocabulary(tokenizer) -> tuple[int, ...]:
    ids = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
           if isinstance(t, str) and t.endswith("</w>")]  # fmt: skip
    texts = [tokenizer.decode([i]).strip() for i in ids]
    encoded = tokenizer(texts, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids)
    return tuple(i for i, t, e in zip(ids, texts, encoded, strict=True)
                 if t and e == [i] and i not in special)  # fmt: skip


def text_vocabulary(tokenizer) -> torch.Tensor:
    """Ids of the whole-word tokens that re-tokenize to themselves (34,301 of CLIP's 49,408):
    prompts joined from them with spaces re-tokenize to exactly these ids."""
    ids = _vocabulary(tokenizer)
    if not ids:
        raise ErasekitError("the tokenizer has no whole-word tokens to build prompts from")
    return torch.tensor(ids)


def ids_to_text(tokenizer, ids: list[int]) -> str:
    """Space-joined text of vocabulary ids (see ``text_vocabulary``)."""
    return " ".join(tokenizer.decode([int(i)]).strip() for i in ids)


def outcome_record(index: int, entry, pre: dict[str, Any]) -> dict[str, Any]:
    """A prompt's outcome after its pre-check (attack fields are filled by the attack)."""
    return {
        "index": index,
        "id": entry.id,
        "prompt": entry.prompt,
        "seed": pre["seed"],
        "guidance": pre["guidance"],
        "pre_success": bool(pre["flagged"]),
        "success": bool(pre["flagged"]),
        "adversarial_prompt": None,
        "success_step": 0 if pre["flagged"] else None,
        "gradient_steps": 0,
        "renders": 1,
        "sample": pre,
    }


def write_prompt_csv(path: Path, outcomes: list[dict[str, Any]]) -> None:
    """The adversarial prompts found (attacked prompts only), in the UnlearnDiffAtk CSV format
    erasekit reads back (prompt, evaluation_seed, evaluation_guidance, case_number): pass it as
    a prompt file to `erasekit generate` or as an evaluation set to test transfer."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance",
                     "source_prompt", "success"])  # fmt: skip
    for o in outcomes:
        if o["adversarial_prompt"] is not None:
            writer.writerow([o["id"], o["adversarial_prompt"], o["seed"], o["guidance"],
                             o["prompt"], int(o["success"])])  # fmt: skip
    path.write_text(buf.getvalue())


def check_prompt_file(file: str) -> None:
    """A configured prompt file must read (one-line error otherwise); "" means the concept's."""
    if file:
        from erasekit.concepts import read_prompt_set

        read_prompt_set(file)


class PromptAttack(Attack):
    """Base of the adversarial-prompt attacks: ``run(model, out_dir, judge)`` returns
    {"outcomes": [...], "cost": {...}, "prompt_set": ...}."""

    kind = "prompt"
    needs_original = False

    def attack_prompts(self, limit: int | None = None):
        """The prompts to attack: the config's prompt file (named by its stem), else the
        concept's forget set (named "forget", as in the audit); the first ``limit``."""
        from dataclasses import replace

        from erasekit.concepts import read_prompt_set

        file = getattr(self.config, "prompts", "")
        prompts = read_prompt_set(file) if file else replace(self.ctx.concept.forget,
                                                             name="forget")  # fmt: skip
        return prompts.limit(limit)

    def budget_grid(self) -> tuple[str, list[int]]:
        """(the budget's unit, the budgets at which the attack judges its prompts: 0 for the
        pre-check, then every block or checkpoint): the grid of its ASR curve."""
        raise NotImplementedError

    def pre_check(self, pipe, prompt_set, judge: Judge) -> list[dict[str, Any]]:
        """Render every unmodified prompt once on the model under attack."""
        indices = list(range(len(prompt_set)))
        samples = judge(pipe, indices, prompt_set.prompts)
        pairs = zip(indices, samples, strict=True)
        return [outcome_record(i, prompt_set.entries[i], s) for i, s in pairs]


__all__ = [
    "PromptAttack",
    "check_prompt_file",
    "free_token_embeddings",
    "ids_to_text",
    "project_simplex",
    "prompt_ids",
    "straight_through",
    "text_vocabulary",
    "write_prompt_csv",
]
