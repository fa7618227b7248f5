"""Forget and retain image sets: rendered by the ORIGINAL model (cached) or read from a folder.

A rendered set is cached under ``$ERASEKIT_CACHE`` (default ``~/.cache/erasekit``) in a folder
named by a hash of everything that determines its pixels: the model's content hash, the prompts,
the seeds and the sampler settings. A second run with the same inputs reuses it.

A user folder uses the diffusers/HF "imagefolder" layout: images plus ``metadata.csv`` or
``metadata.jsonl`` with a ``file_name`` column and a ``prompt`` column (``text`` or ``caption``
are accepted too).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from erasekit.concepts import PromptSet
from erasekit.errors import ErasekitError
from erasekit.outputs import read_jsonl

_PROMPT_COLUMNS = ("prompt", "text", "caption")


@dataclass
class ImageSet:
    """Images with the prompt each was made from (or is captioned with)."""

    name: str
    paths: list[Path]
    prompts: list[str]
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_images": len(self), **self.source}


def cache_root() -> Path:
    return Path(os.environ.get("ERASEKIT_CACHE") or Path.home() / ".cache" / "erasekit")


def read_image_folder(path: str | Path, name: str | None = None) -> ImageSet:
    """An imagefolder-layout folder: ``metadata.csv`` or ``metadata.jsonl`` + images."""
    folder = Path(path)
    if not folder.is_dir():
        raise ErasekitError(f"image folder not found: {folder}")
    if (folder / "metadata.jsonl").is_file():
        try:
            rows = read_jsonl(folder / "metadata.jsonl")
        except json.JSONDecodeError as e:
            raise ErasekitError(f"{folder / 'metadata.jsonl'}: invalid JSON line ({e})") from None
    elif (folder / "metadata.csv").is_file():
        with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ErasekitError(f"{folder}: no metadata.csv or metadata.jsonl (imagefolder layout)")
    if not rows:
        raise ErasekitError(f"{folder}: metadata lists no images")
    paths, prompts = [], []
    for i, row in enumerate(rows):
        file = row.get("file_name")
        prompt = next((row[c] for c in _PROMPT_COLUMNS if row.get(c)), None)
        if not file or prompt is None:
            raise ErasekitError(f"{folder}: metadata row {i + 1} needs file_name and prompt")
        image = folder / file
        if not image.is_file():
            raise ErasekitError(f"{folder}: metadata names a missing image: {file}")
        paths.append(image)
        prompts.append(str(prompt))
    return ImageSet(
        name=name or folder.name,
        paths=paths,
        prompts=prompts,
        source={"origin": "folder", "path": str(folder.resolve())},
    )


def rendered_set_key(
    model_hash: str, prompt_set: PromptSet, settings: Any, n_per_prompt: int, seed: int
) -> str:
    """Cache key: a hash of everything that fixes the rendered pixels."""
    spec = {
        "model": model_hash,
        "prompts": [(e.prompt, e.seed, e.guidance) for e in prompt_set.entries],
        "sampler": asdict(settings),
        "n_per_prompt": n_per_prompt,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def render_image_set(
    pipe,
    model_path: str | Path,
    prompt_set: PromptSet,
    *,
    n_per_prompt: int,
    seed: int = 0,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ImageSet:
    """Render ``prompt_set`` with ``pipe`` (the original model at ``model_path``), or reuse the
    cached rendering of exactly the same inputs."""
    from erasekit.provenance import model_content_hash
    from erasekit.sampling import SamplerSettings

    settings = SamplerSettings.for_model(model_path)
    model_hash = model_content_hash(model_path)
    key = rendered_set_key(model_hash, prompt_set, settings, n_per_prompt, seed)
    folder = Path(cache_dir or cache_root()) / "rendered" / key
    cached = (folder / "samples.jsonl").is_file()
    if not cached:
        _render_into_cache(pipe, prompt_set, folder, model_path, settings, n_per_prompt, seed,
                           batch_size, progress)  # fmt: skip
    records = read_jsonl(folder / "samples.jsonl")
    return ImageSet(
        name=prompt_set.name,
        paths=[folder / r["image"] for r in records],
        prompts=[r["prompt"] for r in records],
        source={
            "origin": "rendered by the original model",
            "model_sha256": model_hash,
            "prompt_set": prompt_set.describe(),
            "n_per_prompt": n_per_prompt,
            "seed": seed,
            "sampler": asdict(settings),
            "cache": str(folder),
            "cache_hit": cached,
        },
    )


def world_image_set(
    prompt_set: PromptSet,
    *,
    n_per_prompt: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> ImageSet:
    """Ground-truth ShapesWorld images of ``prompt_set``: n scenes per prompt drawn by the
    world's own renderer with exactly the attributes the prompt names (the world's training
    distribution), cached by prompts, n and seed."""
    import random
    import shutil

    from erasekit.world.render import prompt_scene, render

    spec = {"renderer": "shapesworld", "prompts": list(prompt_set.prompts),
            "n_per_prompt": n_per_prompt, "seed": seed}  # fmt: skip
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir or cache_root()) / "world" / key
    cached = (folder / "metadata.csv").is_file()
    if not cached:
        own = folder.with_name(f"{key}.run-{os.getpid()}")
        own.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed)
        rows = []
        for i, prompt in enumerate(prompt_set.prompts):
            for k in range(n_per_prompt):
                try:
                    scene = prompt_scene(prompt, rng)
                except ValueError as e:
                    raise ErasekitError(f"{prompt_set.name}: image_source=world: {e}") from None
                name = f"{i:05d}_{k:03d}.png"
                render(scene).save(own / name)
                rows.append({"file_name": name, "prompt": prompt, **scene.labels})
        with open(own / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        try:
            os.rename(own, folder)
        except OSError:  # another run filled the entry first: its images are the same
            shutil.rmtree(own, ignore_errors=True)
    images = read_image_folder(folder, name=prompt_set.name)
    images.source = {"origin": "ShapesWorld renderer (ground truth of each prompt)",
                     "prompt_set": prompt_set.describe(), "n_per_prompt": n_per_prompt,
                     "seed": seed, "cache": str(folder), "cache_hit": cached}  # fmt: skip
    return images


def _render_into_cache(pipe, prompt_set, folder: Path, model_path, settings, n_per_prompt: int,
                       seed: int, batch_size: int, progress: bool) -> None:  # fmt: skip
    """Render into a folder of this run's own, then move it into place: two runs filling the
    same cache entry at once each render whole, and the first to finish is kept."""
    import shutil

    from erasekit.distributed import process_state
    from erasekit.sampling import generate

    state = process_state(str(pipe.device))
    run_id = [os.getpid()]
    if state.num_processes > 1:  # the processes of one launch share the folder
        from accelerate.utils import broadcast_object_list

        run_id = broadcast_object_list(run_id)
    own = folder.with_name(f"{folder.name}.run-{run_id[0]}")
    generate(pipe, prompt_set, own, model_path=model_path, settings=settings,
             n_per_prompt=n_per_prompt, seed=seed, batch_size=batch_size, overwrite=True,
             progress=progress)  # fmt: skip
    if state.is_main_process:
        if folder.is_dir() and not (folder / "samples.jsonl").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # left by an interrupted older version
        try:
            os.rename(own, folder)
        except OSError:  # another run filled the entry first: its images are the same
            shutil.rmtree(own, ignore_errors=True)
    state.wait_for_everyone()


def load_images(image_set: ImageSet, size: int) -> torch.Tensor:
    """The set's images as a float tensor in [-1, 1], shape (n, 3, size, size)."""
    arrays = []
    for p in image_set.paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.float32))
        except OSError as e:
            raise ErasekitError(f"cannot read image {p}: {e}") from None
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0
