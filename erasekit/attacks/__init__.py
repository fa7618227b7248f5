"""Recovery attacks: how much of an erased concept comes back, for how much effort.

An attack takes the model under attack, the concept, the original model where it needs one and
a budget (its config); it writes the attacked artefact (fine-tuned weights, a LoRA file, a
learned token embedding) and returns its cost and a recovery curve: the concept rate measured
by the audit's own evaluation (``evaluate(pipe, step, prompts=None)``) every ``eval_every``
steps. Data an attack shares between the audited model and its controls is built once in
``prepare``, so every model gets the same data and budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from erasekit.errors import ErasekitError
from erasekit.registry import Registry

ATTACKS: Registry[type] = Registry("attack")
ATTACKS.register_lazy("finetune", "erasekit.attacks.finetune:Finetune")
ATTACKS.register_lazy("memora", "erasekit.attacks.memora:MemoRa")
ATTACKS.register_lazy("concept-inversion", "erasekit.attacks.concept_inversion:ConceptInversion")
ATTACKS.register_lazy("unlearndiffatk", "erasekit.attacks.unlearndiffatk:UnlearnDiffAtk")
ATTACKS.register_lazy("ring-a-bell", "erasekit.attacks.ring_a_bell:RingABell")
ATTACKS.register_lazy("p4d", "erasekit.attacks.p4d:P4D")
ATTACKS.register_lazy("mma-diffusion", "erasekit.attacks.mma_diffusion:MMADiffusion")

# evaluate(pipe, step, prompts=None) -> the primary concept-rate metric (and its samples)
Evaluate = Callable[..., dict[str, Any]]


@dataclass
class AttackContext:
    """What every attack is given: the concept, the original model, the audited model (whose
    data the controls share), a work folder, the audit's evaluation callback factory and a
    cache folder other audits share (None: nothing kept beyond this audit)."""

    concept: Any
    original: Path | None
    audited: Path | None  # the audited model (None: attacks run on named roles only)
    work_dir: Path
    device: str = "cpu"
    progress: bool = False
    cache_dir: Path | None = None

    @property
    def render_cache(self) -> Path:
        """Where attacks keep the image sets they render (cached by content): the shared cache
        folder, else this audit's work folder."""
        return self.cache_dir or self.work_dir / "cache"


class Attack:
    """Base class: ``prepare(ctx)`` once, then ``run(model, out_dir, evaluate)`` per model.

    ``kind`` "recovery": the attack changes the model (weights, a LoRA, a token) and returns a
    recovery curve; "prompt": an adversarial-prompt attack (``erasekit.attacks.adversarial``)
    returns per-prompt outcomes and is judged by pre-ASR / ASR."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line for listings and help (``erasekit attacks``)
    Config: ClassVar[type]
    kind: ClassVar[str] = "recovery"
    needs_original: ClassVar[bool] = True

    @classmethod
    def requires_original(cls, config) -> bool:
        """Whether this configuration needs the original model."""
        return cls.needs_original

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        """Config defaults that depend on the concept (ShapesWorld concepts get world-scale
        budgets: the world model trains at lr 1e-3 and runs on a CPU)."""
        return {}

    def __init__(self, config, ctx: AttackContext) -> None:
        self.config = config
        self.ctx = ctx

    def prepare(self) -> dict[str, Any]:
        """Build the data every attacked model shares; return its description."""
        return {}

    def run(self, model: Path, out_dir: Path, evaluate: Evaluate) -> dict[str, Any]:
        """Attack ``model``; write the artefact under ``out_dir``; return
        {"artefact": path, "cost": {...}, "curve": [{"step": s, "metric": {...}}, ...]}."""
        raise NotImplementedError


class RecoveryCurve:
    """The recovery curve of a weight-space attack: the audit's metric at given steps, and the
    seconds spent measuring it (kept apart from the attack's own cost)."""

    def __init__(self, evaluate: Evaluate) -> None:
        self.evaluate = evaluate
        self.points: list[dict[str, Any]] = []
        self.seconds = 0.0

    def measure(self, pipe, step: int, **kwargs: Any) -> None:
        t0 = time.time()
        self.points.append({"step": step, "metric": self.evaluate(pipe, step, **kwargs)})
        self.seconds += time.time() - t0

    def cost(self, config, images: int, seconds: float) -> dict[str, Any]:
        """Steps, effective batch, data and seconds of a run on the shared loop."""
        batch = config.batch_size * config.gradient_accumulation_steps
        return {
            "steps": config.steps,
            "effective_batch": batch,
            "images": images,
            "image_passes": config.steps * batch,
            "seconds": round(seconds - self.seconds, 2),
            "evaluation_seconds": round(self.seconds, 2),
        }


def get_attack(name: str) -> type[Attack]:
    """The attack class of ``name``, or of ``name@variant``: one attack run more than once in
    an audit with different settings (``finetune@lora``), each reported under its full name."""
    import re

    kind, at, variant = name.partition("@")
    if at and not re.fullmatch(r"[A-Za-z0-9_-]+", variant):
        raise ErasekitError(f"attack {name!r}: a variant label is letters, digits, '_' and '-'")
    return ATTACKS.get(kind)


__all__ = ["ATTACKS", "Attack", "AttackContext", "RecoveryCurve", "get_attack"]
