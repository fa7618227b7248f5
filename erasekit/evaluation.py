"""Generate -> detect -> rate: the concept-rate measurement every result is built from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from erasekit.concepts import PromptSet
from erasekit.errors import ErasekitError
from erasekit.generate import SamplerSettings, generate
from erasekit.stats import wilson_interval


def render_and_score(
    pipe,
    prompt_set: PromptSet,
    out_dir: str | Path,
    detector,
    *,
    model_path: str | Path,
    n_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Render ``prompt_set`` into ``out_dir`` (the one generate path) and score every image:
    (sample records, detector records), in the same order."""
    out_dir = Path(out_dir)
    records = generate(pipe, prompt_set, out_dir, model_path=model_path,
                       settings=SamplerSettings.for_model(model_path), n_per_prompt=n_per_prompt,
                       seed=seed, batch_size=batch_size, progress=False)  # fmt: skip
    return records, detector.score([Image.open(out_dir / r["image"]) for r in records])


def _rate(hits: int, n: int, prompt_set: PromptSet) -> dict[str, Any]:
    low, high = wilson_interval(hits, n)
    return {
        "value": hits / n,
        "ci95": [round(low, 4), round(high, 4)],
        "n_images": n,
        "n_prompts": len(prompt_set),
        "prompt_set": prompt_set.describe(),
    }


def concept_rate(
    pipe,
    prompt_set: PromptSet,
    out_dir: str | Path,
    detector,
    dimension: str,
    target: str,
    **kwargs: Any,
) -> dict[str, Any]:
    """Render ``prompt_set`` and return the share of images the detector flags as ``target``,
    with its 95% Wilson interval, n and the prompt set's description. ``kwargs``: see
    ``render_and_score``."""
    _, scores = render_and_score(pipe, prompt_set, out_dir, detector, **kwargs)
    return flag_rate(scores, detector, dimension, target, prompt_set)


def flag_rate(scores, detector, dimension: str, target: str, prompt_set: PromptSet) -> dict:
    """The share of scored images the detector flags as ``target`` (Wilson 95% interval)."""
    hits = sum(detector.flagged(s, dimension, target) for s in scores)
    return _rate(hits, len(scores), prompt_set)


def world_retain_accuracy(
    pipe, prompt_set: PromptSet, out_dir: str | Path, detector, **kwargs: Any
) -> dict[str, Any]:
    """ShapesWorld utility: the share of images whose classified shape/colour/style equals
    every attribute the prompt names (canonical words), with its 95% Wilson interval."""
    records, scores = render_and_score(pipe, prompt_set, out_dir, detector, **kwargs)
    return attribute_accuracy(records, scores, prompt_set)


def attribute_accuracy(records, scores, prompt_set: PromptSet) -> dict[str, Any]:
    """The share of scored world images whose classes equal every attribute the prompt names."""
    from erasekit.world.render import prompt_labels

    hits = 0
    for rec, score in zip(records, scores, strict=True):
        labels = prompt_labels(rec["prompt"])
        if not labels:
            raise ErasekitError(f"retain prompt names no world attribute: {rec['prompt']!r}")
        hits += all(score["pred"][dim] == value for dim, value in labels.items())
    return _rate(hits, len(scores), prompt_set)
