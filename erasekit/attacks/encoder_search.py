"""What the text-encoder-only prompt attacks share (Ring-A-Bell, MMA-Diffusion): a search that
reads the text encoder alone, so models that share one (every erasure of the U-Net) share the
search, within an audit and, through the audit's ``cache_dir``, across audits; and the
renders of its checkpoints on the model under audit.

A search returns, per prompt, the best token ids found at each checkpoint budget (ascending;
the last is the full budget). The checkpoints are rendered in order with the prompt's seed and
guidance and judged; a prompt stops at its first success, whose budget is its
``success_step``. Rendering never touches the search (it is finished first, with its own
generators), so the checkpoints do not change the attack's path; they give ASR at every
checkpoint budget from one run. Several processes share the searches out (whole batches in
turn) and render the found prompts together.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch

from erasekit.attacks.adversarial import Judge, PromptAttack, ids_to_text, write_prompt_csv
from erasekit.distributed import gather_shares, my_share, process_state
from erasekit.outputs import atomic_file, write_json


@torch.no_grad()
def encode(text_encoder, ids: torch.Tensor, batch: int = 2048, pooled: bool = False):
    """Text-encoder outputs of token-id rows in chunks, float32: the hidden states
    (n x 77 x d), or the pooled output (n x d: the final-LN EOT row) with ``pooled``."""
    out = []
    for i in range(0, len(ids), batch):
        res = text_encoder(ids[i : i + batch].to(text_encoder.device))
        out.append((res.pooler_output if pooled else res[0]).float())
    return torch.cat(out)


def candidate_ids(tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """[SOT, tokens, EOT, padding] rows (n x 77) for rows of K token ids."""
    n, k = tokens.shape
    total = tokenizer.model_max_length
    ids = torch.full((n, total), tokenizer.pad_token_id, dtype=torch.long)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 1 : 1 + k] = tokens
    ids[:, 1 + k] = tokenizer.eos_token_id
    return ids


def text_encoder_hash(text_encoder) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(text_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_budgets(total: int, every: int) -> list[int]:
    """The budgets a search keeps its best at: every ``every`` steps and the full budget
    (``every`` 0: the full budget only)."""
    marks = list(range(every, total, every)) if every > 0 else []
    return marks + [total]


class EncoderSearchAttack(PromptAttack):
    """Base of the searches that read the text encoder only: ``search(pipe, part)`` returns,
    per outcome of ``part``, {"checkpoints": [[budget, ids], ...], ...}; ``search_key()`` is
    what the search reads besides the encoder, the prompt and its index."""

    unit: ClassVar[str] = "steps"  # the budget's unit
    budget_field: ClassVar[str] = "steps"  # the config field of the full budget

    def search(self, pipe, part: list[dict]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def budget_grid(self) -> tuple[str, list[int]]:
        total = getattr(self.config, self.budget_field)
        return self.unit, [0, *checkpoint_budgets(total, self.config.eval_every)]

    def search_key(self) -> Any:
        return None

    def search_files(self, pipe, encoder_key: str, outcomes: list[dict],
                     folder: Path) -> dict[int, Path]:  # fmt: skip
        """Each prompt's search result file under ``folder``, keyed by everything the search
        reads: the text encoder (weights, dtype, device type), the tokenizer's vocabulary,
        ``search_key()``, the prompt and its index (its generator's seed) and every search
        setting."""
        vocab = hashlib.sha256(json.dumps(pipe.tokenizer.get_vocab(), sort_keys=True).encode())
        settings = {k: v for k, v in asdict(self.config).items() if k not in ("prompts", "pairs")}
        common = [encoder_key, str(pipe.text_encoder.dtype), pipe.text_encoder.device.type,
                  vocab.hexdigest(), self.search_key(), settings]  # fmt: skip
        files = {}
        for o in outcomes:
            text = json.dumps([*common, o["prompt"], o["index"]], sort_keys=True, default=str)
            files[o["index"]] = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
        return files

    def found(self, pipe, todo: list[dict]) -> tuple[dict[int, dict], dict[str, Any]]:
        """The searches of ``todo``: read from this audit or the cache, else run (shared out
        over processes) and kept. Returns (index -> result, cost fields)."""
        key = text_encoder_hash(pipe.text_encoder)
        done = self.searches.setdefault(key, {})
        files, cached = {}, 0
        if self.ctx.cache_dir is not None:  # searches earlier audits kept
            files = self.search_files(pipe, key, todo, Path(self.ctx.cache_dir) / self.name)
            for o in todo:
                if o["index"] not in done and files[o["index"]].is_file():
                    done[o["index"]] = json.loads(files[o["index"]].read_text())
                    cached += 1
        missing = [o for o in todo if o["index"] not in done]
        started = time.time()
        if missing:
            starts = range(0, len(missing), self.config.batch_size)
            found_here = []
            for start in [starts[b] for b in my_share(len(starts))]:  # searches shared out
                part = missing[start : start + self.config.batch_size]
                found_here += [(o["index"], r) for o, r in
                               zip(part, self.search(pipe, part), strict=True)]  # fmt: skip
            found = dict(gather_shares(found_here))
            done.update(found)
            if files and process_state().is_main_process:
                for index, result in found.items():  # whole files: a reader never sees half
                    files[index].parent.mkdir(parents=True, exist_ok=True)
                    with atomic_file(files[index]) as tmp:
                        write_json(tmp, result)
        cost = {"searches_run": len(missing),
                "searches_reused": len(todo) - len(missing),  # this audit's or cached
                "searches_cached": cached,  # read from the audit's cache_dir
                "search_seconds": round(time.time() - started, 2),
                "text_encoder_sha256": key}  # fmt: skip
        return done, cost

    def render_checkpoints(self, pipe, todo: list[dict], done: dict[int, dict],
                           judge: Judge) -> float:  # fmt: skip
        """Render each prompt's checkpoints in order until its first success; fill the
        outcomes; return the seconds spent rendering and judging."""
        seconds, active = 0.0, list(todo)
        n_marks = max((len(done[o["index"]]["checkpoints"]) for o in todo), default=0)
        for mark in range(n_marks):
            texts = [ids_to_text(pipe.tokenizer, done[o["index"]]["checkpoints"][mark][1])
                     for o in active]  # fmt: skip
            t0 = time.time()
            samples = judge(pipe, [o["index"] for o in active], texts) if active else []
            seconds += time.time() - t0
            still = []
            for o, text, sample in zip(active, texts, samples, strict=True):
                budget = done[o["index"]]["checkpoints"][mark][0]
                o.update(adversarial_prompt=text, renders=o["renders"] + 1, sample=sample,
                         step_unit=self.unit)  # fmt: skip
                if sample["flagged"]:
                    o.update(success=True, success_step=budget)
                else:
                    still.append(o)
            active = still
        return seconds

    def run(self, model: Path, out_dir: Path, judge: Judge) -> dict[str, Any]:
        from erasekit.models import load_pipeline

        started = time.time()
        pipe = load_pipeline(model, device=self.ctx.device)
        outcomes = self.pre_check(pipe, self.prompt_set, judge)
        todo = [o for o in outcomes if not o["pre_success"]]
        done, cost = self.found(pipe, todo)
        render_seconds = self.render_checkpoints(pipe, todo, done, judge)
        for o in todo:
            self.annotate(o, done[o["index"]])
        out_dir.mkdir(parents=True, exist_ok=True)
        if process_state().is_main_process:
            write_prompt_csv(out_dir / "found_prompts.csv", outcomes)
        budget = getattr(self.config, self.budget_field)
        return {
            "outcomes": outcomes,
            "prompt_set": self.prompt_set.describe(),
            "artefact": str(out_dir / "found_prompts.csv"),
            "cost": {
                **self.search_cost(cost["searches_run"]),
                **cost,
                "gradient_steps": 0,
                "unet_queries_in_search": 0,
                "renders": sum(o["renders"] for o in outcomes),
                "budget": {"unit": self.unit, "max": budget},
                "seconds": round(time.time() - started, 2),
                "render_seconds": round(render_seconds, 2),
            },
        }

    def annotate(self, outcome: dict, result: dict) -> None:
        """Add the search's own numbers to an attacked prompt's outcome."""

    def search_cost(self, searches_run: int) -> dict[str, Any]:
        """The text-encoder forwards the searches run here took."""
        return {}
