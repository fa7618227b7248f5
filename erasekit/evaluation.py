"""Generate -> detect -> rate: the concept-rate measurement every result is built from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from erasekit.concepts import PromptSet
from erasekit.generate import SamplerSettings, generate
from erasekit.stats import wilson_interval


def concept_rate(
    pipe,
    prompt_set: PromptSet,
    out_dir: str | Path,
    detector,
    dimension: str,
    target: str,
    *,
    model_path: str | Path,
    n_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Render ``prompt_set`` into ``out_dir`` and return the share of images the detector flags
    as ``target``, with its 95% Wilson interval, n and the prompt set's description."""
    out_dir = Path(out_dir)
    records = generate(pipe, prompt_set, out_dir, model_path=model_path,
                       settings=SamplerSettings.for_model(model_path), n_per_prompt=n_per_prompt,
                       seed=seed, batch_size=batch_size, progress=False)  # fmt: skip
    scores = detector.score([Image.open(out_dir / r["image"]) for r in records])
    hits = sum(detector.flagged(s, dimension, target) for s in scores)
    low, high = wilson_interval(hits, len(scores))
    return {
        "value": hits / len(scores),
        "ci95": [round(low, 4), round(high, 4)],
        "n_images": len(scores),
        "n_prompts": len(prompt_set),
        "prompt_set": prompt_set.describe(),
    }
