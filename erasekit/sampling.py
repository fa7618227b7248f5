"""The one generation path: prompt set + seeds -> images + per-sample records.

Every later feature (data sets, audits, attacks, reports) renders through ``generate_images``.
Work is cut into batches first and the batches are dealt to processes, so one process and N
processes compute exactly the same batches and give identical images.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from erasekit.concepts import PromptSet, check_seed
from erasekit.distributed import gather_shares, my_share, process_state
from erasekit.errors import DegenerateOutput, ErasekitError
from erasekit.models import read_manifest
from erasekit.outputs import (
    atomic_output_dir,
    write_json,
    write_jsonl,
)
from erasekit.progress import Progress
from erasekit.progress import bar as progress_bar
from erasekit.provenance import model_content_hash, run_provenance


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler settings; a model folder may record its own defaults in erasekit.json["sampler"]."""

    steps: int = 50
    guidance: float = 7.5
    height: int | None = None  # None: the U-Net's native size
    width: int | None = None
    eta: float = 0.0

    @classmethod
    def for_model(cls, model_path: str | Path | None, **overrides: Any) -> SamplerSettings:
        """The model's recorded defaults (else the SD defaults), then non-None overrides."""
        recorded = read_manifest(model_path).get("sampler", {}) if model_path else {}
        if not isinstance(recorded, dict):
            raise ErasekitError(f"{model_path}: erasekit.json 'sampler' is not an object")
        known = {k: v for k, v in recorded.items() if k in cls.__dataclass_fields__}
        settings = replace(cls(), **known)
        settings.check(f"{model_path}: erasekit.json 'sampler'")
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        settings.check("sampler")
        return settings

    def check(self, where: str = "sampler") -> None:
        """Types and ranges a sampler can run with (one clear line otherwise)."""
        for name in ("steps", "height", "width"):
            value = getattr(self, name)
            if value is None and name != "steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ErasekitError(f"{where}: {name} must be a positive integer, got {value!r}")
        for name in ("guidance", "eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ErasekitError(f"{where}: {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ErasekitError(f"{where}: {name} must be finite, got {value!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ErasekitError(f"{where}: eta must be in [0, 1], got {self.eta}")


def derive_seed(base_seed: int, prompt_index: int, k: int) -> int:
    """Seed of image k of prompt i when the prompt set prescribes none: a hash of (base, i, k)."""
    digest = hashlib.sha256(f"erasekit/{base_seed}/{prompt_index}/{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def plan_samples(
    prompt_set: PromptSet,
    settings: SamplerSettings,
    *,
    n_per_prompt: int = 1,
    seed: int = 0,
    guidance: float | None = None,
    negative_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """One record per image to render. Seeds: the prompt set's (image k gets seed + k), else
    derived from ``seed``. Guidance: explicit ``guidance`` > the prompt set's > ``settings``."""
    if n_per_prompt < 1:
        raise ErasekitError(f"--n-per-prompt must be at least 1, got {n_per_prompt}")
    check_seed(seed, "--seed")
    if guidance is not None and not math.isfinite(guidance):
        raise ErasekitError(f"--guidance must be finite, got {guidance}")
    plan = []
    for i, entry in enumerate(prompt_set.entries):
        g = guidance if guidance is not None else entry.guidance
        g = settings.guidance if g is None else g
        for k in range(n_per_prompt):
            s = entry.seed + k if entry.seed is not None else derive_seed(seed, i, k)
            check_seed(s, f"seed of prompt {i + 1} (image {k})")
            plan.append(
                {
                    "index": len(plan),
                    "prompt_index": i,
                    "prompt_id": entry.id,
                    "k": k,
                    "prompt": entry.prompt,
                    "negative_prompt": negative_prompt,
                    "seed": s,
                    "guidance": float(g),
                    "steps": settings.steps,
                    "eta": settings.eta,
                    "categories": list(entry.categories),
                    "image": f"images/{i:05d}_{k:03d}.png",
                }
            )
    return plan


def make_batches(plan: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """Consecutive records with equal (guidance, steps) in batches of at most ``batch_size``."""
    if batch_size < 1:
        raise ErasekitError(f"--batch-size must be at least 1, got {batch_size}")
    batches: list[list[dict[str, Any]]] = []
    for rec in plan:
        last = batches[-1] if batches else None
        same = last and (last[0]["guidance"], last[0]["steps"]) == (rec["guidance"], rec["steps"])
        if last and same and len(last) < batch_size:
            last.append(rec)
        else:
            batches.append([rec])
    return batches


def _image_size(pipe, settings: SamplerSettings) -> tuple[int, int]:
    """(height, width): the settings' or the U-Net's native size; each a multiple of the VAE
    factor (the latent grid) that the model can sample."""
    factor = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * factor
    size = settings.height or native, settings.width or native
    for name, value in zip(("height", "width"), size, strict=True):
        if value % factor or value > 16384:
            raise ErasekitError(f"--{name} {value}: must be a multiple of {factor} (the VAE factor)"
                                " and at most 16384")  # fmt: skip
    return size


@torch.no_grad()
def render_batch(pipe, batch: list[dict[str, Any]], height: int, width: int) -> list[Image.Image]:
    """Render one batch; each image's initial noise comes from its own seeded CPU generator.
    A model folder's guidance config (``erasekit.guidance``, set on load) applies here: its
    negative prompt joins the record's, or SLD replaces plain classifier-free guidance."""
    first = batch[0]
    guidance = getattr(pipe, "erasekit_guidance", None)
    negatives = [r["negative_prompt"] or "" for r in batch]
    if guidance is not None and guidance.mode == "negative-prompt":
        negatives = [", ".join(filter(None, (n, guidance.concept))) for n in negatives]
    generators = [torch.Generator("cpu").manual_seed(r["seed"]) for r in batch]
    if guidance is not None and guidance.mode == "sld":
        from erasekit.guidance import sld_images

        prompts = [r["prompt"] for r in batch]
        images = sld_images(pipe, guidance, prompts, negatives, generators, first["steps"],
                            first["guidance"], height, width, first["eta"])  # fmt: skip
    else:
        images = pipe(
            prompt=[r["prompt"] for r in batch],
            negative_prompt=negatives if any(negatives) else None,
            num_inference_steps=first["steps"],
            guidance_scale=first["guidance"],
            height=height,
            width=width,
            eta=first["eta"],
            generator=generators,
            output_type="np",
        ).images
    check_images(images, batch)
    arrays = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def check_images(images: np.ndarray, batch: list[dict[str, Any]]) -> None:
    """Stop on a degenerate render: non-finite pixels (NaN/inf weights or latents) or an image
    with no variation at all (a collapsed model); such images would read as "no concept"."""
    for image, rec in zip(images, batch, strict=True):
        where = f"prompt {rec['prompt'][:80]!r} (seed {rec['seed']})"
        if not np.isfinite(image).all():
            raise DegenerateOutput(f"non-finite pixel values rendering {where}: broken weights")
        spread = np.ptp(image.reshape(-1, image.shape[-1]), axis=0)  # per channel
        if float(np.max(spread)) < 1.0 / 255.0:  # every channel flat: one colour, no picture
            raise DegenerateOutput(f"a constant image (no variation) rendering {where}: the"
                                   " model has collapsed")  # fmt: skip


# A set of images of different prompts and seeds is degenerate (a collapsed model that renders
# the same picture whatever it is asked) when the mean over pixels of the per-pixel standard
# deviation across the images is below this many grey levels (of 255).
DEGENERATE_SET_STD = 2.0


def check_image_set(root: str | Path, records: list[dict[str, Any]]) -> None:
    """Stop when the images of ``records`` (paths relative to ``root``), rendered from at least
    two different seeds, are near-identical (``DEGENERATE_SET_STD``): each image alone may look
    fine, but a model that ignores its prompt and its noise shows "no concept". (Images of one
    seed may legitimately agree: a weakly conditioned model varies with its noise.)"""
    if len({r["seed"] for r in records}) < 2:
        return
    total = squares = None
    for rec in records:
        pixels = np.asarray(Image.open(Path(root) / rec["image"]).convert("RGB"), np.float64)
        if total is not None and pixels.shape != total.shape:
            return  # images of different sizes differ
        total = pixels if total is None else total + pixels
        squares = pixels**2 if squares is None else squares + pixels**2
    n = len(records)
    spread = float(np.sqrt(np.maximum(squares / n - (total / n) ** 2, 0.0)).mean())
    if spread < DEGENERATE_SET_STD:
        prompts, seeds = len({r["prompt"] for r in records}), len({r["seed"] for r in records})
        raise DegenerateOutput(
            f"its {n} images of {prompts} prompts and {seeds} seeds are near-identical (mean"
            f" per-pixel standard deviation across them {spread:.2f} grey levels, below"
            f" {DEGENERATE_SET_STD:g}): the model has collapsed"
        )


def warn_truncated(pipe, prompts: list[str]) -> int:
    """Warn once (on stderr, with the count) when prompts exceed the tokenizer's limit and the
    text encoder will see only their start; return how many do."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return 0
    limit = tokenizer.model_max_length
    unique = list(dict.fromkeys(prompts))
    long = [
        p for p, ids in zip(unique, tokenizer(unique).input_ids, strict=True) if len(ids) > limit
    ]
    if long:
        print(f"erasekit: warning: {len(long)} of {len(unique)} prompts exceed the tokenizer's"
              f" {limit} tokens and are cut there (first: {long[0][:60]!r}...)",
              file=sys.stderr)  # fmt: skip
    return len(long)


def generate_images(
    pipe,
    plan: list[dict[str, Any]],
    root: str | Path,
    settings: SamplerSettings,
    *,
    batch_size: int = 4,
    progress: Progress = True,
) -> list[dict[str, Any]]:
    """Render ``plan`` into ``root`` (image paths are relative to it); all processes of an
    accelerate run take part, and every process returns the full, ordered list of records."""

    state = process_state(str(pipe.device))
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    height, width = _image_size(pipe, settings)
    sampler = type(pipe.scheduler).__name__
    batches = make_batches(plan, batch_size)
    if state.is_main_process:
        warn_truncated(pipe, [r["prompt"] for r in plan])
    mine = [batches[i] for i in my_share(len(batches))]
    records = []
    bar = progress_bar(progress, total=sum(len(b) for b in batches), desc="generate",
                       unit="img", main=state.is_main_process)  # fmt: skip
    for batch in mine:
        images = render_batch(pipe, batch, height, width)
        for rec, image in zip(batch, images, strict=True):
            image.save(root / rec["image"])
            records.append({**rec, "sampler": sampler, "height": height, "width": width})
        # The bar counts this process's images times the number of processes: an estimate.
        bar.update(len(batch) * state.num_processes)
    bar.close()
    return sorted(gather_shares(records), key=lambda r: r["index"])


def generate(
    pipe,
    prompt_set: PromptSet,
    out_dir: str | Path,
    *,
    model_path: str | Path | None = None,
    settings: SamplerSettings | None = None,
    n_per_prompt: int = 1,
    seed: int = 0,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    overwrite: bool = False,
    progress: Progress = True,
) -> list[dict[str, Any]]:
    """Render a prompt set into ``out_dir``: images/*.png, samples.jsonl and generation.json.

    The folder appears complete or not at all. Under ``accelerate launch`` / ``torchrun`` the
    batches are shared among processes and the main process writes the records.
    """
    state = process_state(str(pipe.device))
    started = time.time()
    settings = settings or SamplerSettings.for_model(model_path)
    plan = plan_samples(
        prompt_set,
        settings,
        n_per_prompt=n_per_prompt,
        seed=seed,
        guidance=guidance,
        negative_prompt=negative_prompt,
    )
    with atomic_output_dir(out_dir, overwrite, state) as tmp:
        records = generate_images(pipe, plan, tmp, settings, batch_size=batch_size,
                                  progress=progress)  # fmt: skip
        if state.is_main_process:
            write_jsonl(tmp / "samples.jsonl", records)
            write_json(
                tmp / "generation.json",
                {
                    "model": {
                        "path": str(Path(model_path).resolve()) if model_path else None,
                        "sha256": model_content_hash(model_path) if model_path else None,
                    },
                    "prompt_set": prompt_set.describe(),
                    "sampler": {**asdict(settings), "scheduler": type(pipe.scheduler).__name__},
                    "n_per_prompt": n_per_prompt,
                    "seed": seed,
                    "seed_rule": "prompt set's seed + k, else derive_seed(seed, prompt_index, k)",
                    "guidance_override": guidance,
                    "negative_prompt": negative_prompt,
                    "n_images": len(records),
                    "n_processes": state.num_processes,
                    **run_provenance(started),
                },
            )
    return records
