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
a CSV prompt file for transfer to other models. Several processes share the searches out
(whole batches in turn) and render the found prompts together.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from erasekit.attacks.adversarial import (
    Judge,
    PromptAttack,
    check_prompt_file,
    ids_to_text,
    text_vocabulary,
    write_prompt_csv,
)
from erasekit.concepts import is_world_concept
from erasekit.distributed import gather_shares, my_share, process_state
from erasekit.errors import ErasekitError
from erasekit.outputs import atomic_file, write_json


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


@torch.no_grad()
def encode(text_encoder, ids: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Full text-encoder outputs (n x 77 x d, float32) of token-id rows, in chunks."""
    out = [text_encoder(ids[i : i + batch].to(text_encoder.device))[0].float()
           for i in range(0, len(ids), batch)]  # fmt: skip
    return torch.cat(out)


def concept_vector(pipe, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Mean of E(with) - E(without) over the pairs (77 x d, float32)."""
    from erasekit.training import encode_prompts

    with_c = encode_prompts(pipe, [a for a, _ in pairs]).float()
    without = encode_prompts(pipe, [b for _, b in pairs]).float()
    return (with_c - without).mean(0)


def candidate_ids(tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """[SOT, tokens, EOT, padding] rows (n x 77) for rows of K token ids."""
    n, k = tokens.shape
    total = tokenizer.model_max_length
    ids = torch.full((n, total), tokenizer.pad_token_id, dtype=torch.long)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 1 : 1 + k] = tokens
    ids[:, 1 + k] = tokenizer.eos_token_id
    return ids


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
    token ids, their fitness and the best fitness after every generation."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    n, n_vocab = len(targets), len(vocab)
    pops = [torch.randint(0, n_vocab, (cfg.population, cfg.length), generator=g) for g in seeds]
    history: list[list[float]] = [[] for _ in range(n)]
    for generation in range(cfg.generations + 1):
        stacked = torch.cat(pops)
        out = encode(te, candidate_ids(tok, vocab[stacked]), cfg.encoder_batch)
        out = out.view(n, cfg.population, *out.shape[1:])
        fitness = ((out - targets[:, None].to(out)) ** 2).sum((2, 3)).cpu()
        for i in range(n):
            history[i].append(float(fitness[i].min()))
        if generation == cfg.generations:
            break
        pops = [next_generation(pops[i], fitness[i], cfg, n_vocab, seeds[i]) for i in range(n)]
    results = []
    for i in range(n):
        best = int(fitness[i].argmin())
        results.append({"ids": vocab[pops[i][best]].tolist(), "fitness": float(fitness[i, best]),
                        "history": history[i]})  # fmt: skip
    return results


def text_encoder_hash(text_encoder) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(text_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def search_files(pipe, encoder_key: str, pairs, cfg: RingABellConfig, outcomes: list[dict],
                 folder: Path) -> dict[int, Path]:  # fmt: skip
    """Each prompt's search result file under ``folder``, keyed by everything the search reads:
    the text encoder (weights, dtype, device type), the tokenizer's vocabulary, the prompt
    pairs, the prompt and its index (its generator's seed) and every search setting."""
    vocab = hashlib.sha256(json.dumps(pipe.tokenizer.get_vocab(), sort_keys=True).encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("prompts", "pairs")}
    common = [encoder_key, str(pipe.text_encoder.dtype), pipe.text_encoder.device.type,
              vocab.hexdigest(), pairs, settings]  # fmt: skip
    files = {}
    for o in outcomes:
        text = json.dumps([*common, o["prompt"], o["index"]], sort_keys=True, default=str)
        files[o["index"]] = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    return files


class RingABell(PromptAttack):
    name = "ring-a-bell"
    summary = (
        "Ring-A-Bell: a genetic token search towards the "
        "concept's direction in text-encoder space (no U-Net)"
    )
    Config = RingABellConfig

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
        return {"prompts": self.prompt_set.describe(), "pairs": {"file": str(file),
                "n_pairs": len(self.pairs)}}  # fmt: skip

    def run(self, model: Path, out_dir: Path, judge: Judge) -> dict[str, Any]:
        from erasekit.models import load_pipeline
        from erasekit.training import encode_prompts, step_generator

        cfg = self.config
        started = time.time()
        pipe = load_pipeline(model, device=self.ctx.device)
        outcomes = self.pre_check(pipe, self.prompt_set, judge)
        key = text_encoder_hash(pipe.text_encoder)
        done = self.searches.setdefault(key, {})
        todo = [o for o in outcomes if not o["pre_success"]]
        files, cached = {}, 0
        if self.ctx.cache_dir is not None:  # searches earlier audits kept
            files = search_files(pipe, key, self.pairs, cfg, todo,
                                 Path(self.ctx.cache_dir) / "ring-a-bell")  # fmt: skip
            for o in todo:
                if o["index"] not in done and files[o["index"]].is_file():
                    done[o["index"]] = json.loads(files[o["index"]].read_text())
                    cached += 1
        missing = [o for o in todo if o["index"] not in done]
        search_started, forwards = time.time(), 0
        if missing:
            vocab = text_vocabulary(pipe.tokenizer)
            c = concept_vector(pipe, self.pairs)
            starts = range(0, len(missing), cfg.batch_size)
            found_here = []
            for start in [starts[b] for b in my_share(len(starts))]:  # searches shared out
                part = missing[start : start + cfg.batch_size]
                source = encode_prompts(pipe, [o["prompt"] for o in part]).float()
                gens = [step_generator(cfg.seed, o["index"]) for o in part]
                found = genetic_search(pipe, source + cfg.eta * c, gens, cfg, vocab)
                found_here += [(o["index"], r) for o, r in zip(part, found, strict=True)]
            found = dict(gather_shares(found_here))
            done.update(found)
            if files and process_state().is_main_process:
                for index, result in found.items():  # whole files: a reader never sees half
                    files[index].parent.mkdir(parents=True, exist_ok=True)
                    with atomic_file(files[index]) as tmp:
                        write_json(tmp, result)
            forwards = len(missing) * cfg.population * (cfg.generations + 1)
        search_seconds = time.time() - search_started
        texts = [ids_to_text(pipe.tokenizer, done[o["index"]]["ids"]) for o in todo]
        t0 = time.time()
        samples = judge(pipe, [o["index"] for o in todo], texts) if todo else []
        render_seconds = time.time() - t0
        for o, text, sample in zip(todo, texts, samples, strict=True):
            result = done[o["index"]]
            o.update(adversarial_prompt=text, renders=2, sample=sample, success=sample["flagged"],
                     success_step=cfg.generations if sample["flagged"] else None,
                     step_unit="generations",
                     fitness_first=result["history"][0], fitness_last=result["fitness"],
                     generations=cfg.generations)  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        if process_state().is_main_process:
            write_prompt_csv(out_dir / "found_prompts.csv", outcomes)
        return {
            "outcomes": outcomes,
            "prompt_set": self.prompt_set.describe(),
            "artefact": str(out_dir / "found_prompts.csv"),
            "cost": {
                "text_encoder_forwards": forwards,
                "searches_run": len(missing),
                "searches_reused": len(todo) - len(missing),  # this audit's or cached
                "searches_cached": cached,  # read from the audit's cache_dir
                "gradient_steps": 0,
                "unet_queries_in_search": 0,
                "renders": sum(o["renders"] for o in outcomes),
                "seconds": round(time.time() - started, 2),
                "search_seconds": round(search_seconds, 2),
                "render_seconds": round(render_seconds, 2),
                "text_encoder_sha256": key,
            },
        }
