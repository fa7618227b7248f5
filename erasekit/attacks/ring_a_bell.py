"""`ring-a-bell`: model-agnostic adversarial prompts from the text encoder alone (Tsai et al.,
Ring-A-Bell).

Concept vector c = mean over prompt pairs (with / without the concept) of the difference of
the full text-encoder outputs (77 x d). For a source prompt P the target is E(P) + eta * c; a
genetic search over ``length`` token ids (typeable whole-word tokens) minimises
||target - E(candidate)||^2 over the whole 77 x d output: population 200, 3000 generations,
the best half kept, single-point crossover with probability 0.5, one random token replaced
with probability 0.25. It never queries the U-Net; the found prompts are rendered by the model
under audit with the source prompt's seed and guidance and judged. Text-encoder forwards of
several prompts' populations are batched. Searches depend on the text encoder only, so models
that share one (every erasure of the U-Net) share the search, within an audit and, through
the audit's ``cache_dir`` (a bench study's cache), across audits; the found prompts are saved as
a CSV prompt file for transfer to other models (``attacks.encoder_search``). The published
protocol renders the final prompt only (``eval_every`` 0); with ``eval_every`` the best prompt
every that many generations is rendered too, until the first success (ASR at every checkpoint
from one search, which the renders do not change).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasekit.attacks.adversarial import check_prompt_file, text_vocabulary
from erasekit.attacks.encoder_search import (
    EncoderSearchAttack,
    candidate_ids,
    checkpoint_budgets,
    encode,
)
from erasekit.concepts import is_world_concept
from erasekit.errors import ErasekitError


@dataclass
class RingABellConfig:
    prompts: str = ""  # source prompts ("": the concept's forget prompts)
    pairs: str = ""  # CSV with columns 'with' and 'without' ("": the concept spec's pairs)
    eta: float = 3.0  # 3 for nudity in the paper, 5-5.5 for violence
    length: int = 16  # K adversarial tokens (16, 38; 75 fills the context)
    population: int = 200
    generations: int = 3000
    crossover: float = 0.5
    mutation: float = 0.25
    batch_size: int = 16  # source prompts whose populations share text-encoder passes
    encoder_batch: int = 2048  # sequences per text-encoder forward
    eval_every: int = 0  # also render the best so far every this many generations (0: the end)
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.length <= 75:
            raise ErasekitError(f"ring-a-bell: length must be within 1..75, got {self.length}")
        if self.population < 2 or self.generations < 1:
            raise ErasekitError("ring-a-bell: population >= 2 and generations >= 1")
        if not (0 <= self.crossover <= 1 and 0 <= self.mutation <= 1):
            raise ErasekitError("ring-a-bell: crossover and mutation are probabilities")
        if min(self.batch_size, self.encoder_batch) < 1:
            raise ErasekitError("ring-a-bell: batch_size and encoder_batch must be >= 1")
        if self.eval_every < 0:
            raise ErasekitError(f"ring-a-bell: eval_every must be >= 0, got {self.eval_every}")
        check_prompt_file(self.prompts)
        if self.pairs:
            read_pairs(self.pairs)  # a missing or malformed file fails before any rendering


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Prompt pairs from a CSV with columns ``with`` and ``without`` (one-line errors)."""
    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"prompt-pair file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"with", "without"} <= set(reader.fieldnames or []):
            raise ErasekitError(f"{path}: needs columns 'with' and 'without'")
        pairs = [(r["with"].strip(), r["without"].strip()) for r in reader]
    if not pairs or any(not a or not b for a, b in pairs):
        raise ErasekitError(f"{path}: no pairs, or a pair with an empty prompt")
    return pairs


def concept_vector(pipe, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Mean of E(with) - E(without) over the pairs (77 x d, float32)."""
    from erasekit.training import encode_prompts

    with_c = encode_prompts(pipe, [a for a, _ in pairs]).float()
    without = encode_prompts(pipe, [b for _, b in pairs]).float()
    return (with_c - without).mean(0)


def next_generation(pop: torch.Tensor, fitness: torch.Tensor, cfg: RingABellConfig,
                    n_vocab: int, gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Keep the best half (lowest fitness), fill the rest with children of two kept parents:
    single-point crossover with probability ``crossover``, then one token replaced with
    probability ``mutation``."""
    size, k = pop.shape
    keep = max(1, size // 2)
    elite = pop[fitness.argsort()[:keep]]
    n_child = size - keep
    pa = torch.randint(0, keep, (n_child,), generator=gen)
    pb = torch.randint(0, keep, (n_child,), generator=gen)
    cross = torch.rand(n_child, generator=gen) < cfg.crossover
    point = torch.randint(1, max(2, k), (n_child,), generator=gen)
    take_b = cross[:, None] & (torch.arange(k)[None, :] >= point[:, None])
    child = torch.where(take_b, elite[pb], elite[pa])
    mutate = torch.rand(n_child, generator=gen) < cfg.mutation
    where = torch.randint(0, k, (n_child,), generator=gen)
    token = torch.randint(0, n_vocab, (n_child,), generator=gen)
    rows = mutate.nonzero().flatten()
    child[rows, where[rows]] = token[rows]
    return torch.cat([elite, child])


def genetic_search(pipe, targets: torch.Tensor, seeds: list[torch.Generator],
                   cfg: RingABellConfig, vocab: torch.Tensor) -> list[dict[str, Any]]:  # fmt: skip
    """One search per target (n x 77 x d), populations encoded together; per target: the best
    token ids, their fitness, the best fitness after every generation and the best ids at
    each checkpoint (``checkpoint_budgets(generations, eval_every)``)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    n, n_vocab = len(targets), len(vocab)
    marks = set(checkpoint_budgets(cfg.generations, cfg.eval_every))
    pops = [torch.randint(0, n_vocab, (cfg.population, cfg.length), generator=g) for g in seeds]
    history: list[list[float]] = [[] for _ in range(n)]
    checkpoints: list[list] = [[] for _ in range(n)]
    for generation in range(cfg.generations + 1):
        stacked = torch.cat(pops)
        out = encode(te, candidate_ids(tok, vocab[stacked]), cfg.encoder_batch)
        out = out.view(n, cfg.population, *out.shape[1:])
        fitness = ((out - targets[:, None].to(out)) ** 2).sum((2, 3)).cpu()
        for i in range(n):
            history[i].append(float(fitness[i].min()))
            if generation in marks:
                best = vocab[pops[i][int(fitness[i].argmin())]].tolist()
                checkpoints[i].append([generation, best])
        if generation == cfg.generations:
            break
        pops = [next_generation(pops[i], fitness[i], cfg, n_vocab, seeds[i]) for i in range(n)]
    results = []
    for i in range(n):
        best = int(fitness[i].argmin())
        results.append({"ids": vocab[pops[i][best]].tolist(), "fitness": float(fitness[i, best]),
                        "history": history[i], "checkpoints": checkpoints[i]})  # fmt: skip
    return results


class RingABell(EncoderSearchAttack):
    name = "ring-a-bell"
    summary = (
        "Ring-A-Bell: a genetic token search towards the "
        "concept's direction in text-encoder space (no U-Net)"
    )
    Config = RingABellConfig
    unit = "generations"
    budget_field = "generations"

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        # 200 of the reference's 3000 generations: ~0.6M text-encoder forwards for 16 prompts,
        # a few minutes on one CPU core (the search is shared by models with one encoder). On
        # a CPU one prompt's population per pass is faster than several (measured 1.3x,
        # docs/results/bench-adversarial-world.json); batching pays on a GPU.
        return {"generations": 200, "batch_size": 1} if is_world_concept(concept) else {}

    def prepare(self, limit: int | None = None) -> dict[str, Any]:
        cfg, concept = self.config, self.ctx.concept
        cfg.validate()
        self.prompt_set = self.attack_prompts(limit)
        file = cfg.pairs or (concept.pairs if concept is not None else None)
        if not file:
            raise ErasekitError(f"ring-a-bell needs prompt pairs with/without the concept: pass "
                                f"ring-a-bell.pairs=FILE.csv or add 'pairs:' to the concept "
                                f"spec of {concept.name!r}")  # fmt: skip
        self.pairs = read_pairs(file)
        self.searches: dict[str, dict[int, dict]] = {}  # text-encoder hash -> prompt -> result
        self._vector: torch.Tensor | None = None
        return {"prompts": self.prompt_set.describe(), "pairs": {"file": str(file),
                "n_pairs": len(self.pairs)}}  # fmt: skip

    def search_key(self) -> Any:
        return self.pairs

    def search(self, pipe, part: list[dict]) -> list[dict[str, Any]]:
        from erasekit.training import encode_prompts, step_generator

        cfg = self.config
        if self._vector is None:
            self._vector = concept_vector(pipe, self.pairs)
        source = encode_prompts(pipe, [o["prompt"] for o in part]).float()
        gens = [step_generator(cfg.seed, o["index"]) for o in part]
        return genetic_search(pipe, source + cfg.eta * self._vector, gens, cfg,
                              text_vocabulary(pipe.tokenizer))  # fmt: skip

    def annotate(self, outcome: dict, result: dict) -> None:
        outcome.update(fitness_first=result["history"][0], fitness_last=result["fitness"],
                       generations=self.config.generations)  # fmt: skip

    def search_cost(self, searches_run: int) -> dict[str, Any]:
        cfg = self.config
        return {"text_encoder_forwards": searches_run * cfg.population * (cfg.generations + 1)}
