"""The world-quality scripts' measurements (world_quality.py, world_colour_misses.py): render a
prompt set through the one generate path and score it with the world detector alone, as rates
with Wilson intervals. The package's own metric path (audits, studies) is
``erasekit.evaluation``; these are the scripts' lighter compositions of the same pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasekit.concepts import PromptSet
from erasekit.evaluation import score_images
from erasekit.sampling import SamplerSettings, generate
from erasekit.stats import wilson_interval


def _rate(hits: int, n: int, prompt_set: PromptSet) -> dict[str, Any]:
    low, high = wilson_interval(hits, n)
    return {
        "value": hits / n,
        "ci95": [round(low, 4), round(high, 4)],
        "n_images": n,
        "n_prompts": len(prompt_set),
        "prompt_set": prompt_set.describe(),
    }


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
    settings: SamplerSettings | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Render ``prompt_set`` into ``out_dir`` (the one generate path; ``settings`` default to
    the model's recorded sampler) and score every image with one detector: (sample records,
    detector records), in the same order."""
    out_dir = Path(out_dir)
    settings = settings or SamplerSettings.for_model(model_path)
    records = generate(pipe, prompt_set, out_dir, model_path=model_path, settings=settings,
                       n_per_prompt=n_per_prompt, seed=seed, batch_size=batch_size,
                       progress=False)  # fmt: skip
    scores = score_images(records, out_dir, {detector.name: detector})
    return records, [s[detector.name] for s in scores]


def concept_rate(
    pipe,
    prompt_set: PromptSet,
    out_dir: str | Path,
    detector,
    dimension: str,
    target: str,
    **kwargs: Any,
) -> dict[str, Any]:
    """Render ``prompt_set`` and return the share of images the world detector flags as
    ``target``, with its 95% Wilson interval, n and the prompt set's description."""
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
    from erasekit.detectors.world import WorldDetector

    hits = sum(
        WorldDetector.retain_correct(rec["prompt"], score)
        for rec, score in zip(records, scores, strict=True)
    )
    return _rate(hits, len(scores), prompt_set)
