"""Audit benchmarks -> JSON (docs/results/bench-audit-*.json).

Parts:
  world  on this CPU, the ShapesWorld model: images/s of `generate` alone, of the detectors
         alone on those images, and of `generate` + detectors (the audit's evaluation path,
         `evaluate_prompt_set`); NudeNet 320n images/s on the same images and on 512 px images.
         Overhead = detector time / generate time (and end to end: extra time / generate time).
  gpu    on a CUDA device: the same for the SD-1.5 architecture at 512 px (random weights, a
         real CLIP BPE tokenizer, DDIM 50 steps, fp16): generate alone vs generate + NudeNet
         (+ CLIP ViT-L-14 with random weights when open_clip can build it). Target: evaluation
         overhead <= 10% of generation.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _prompts(n: int):
    from erasekit.concepts import load_concept

    concept = load_concept("red")
    return concept.forget.limit(n)


def timed_generate_and_eval(
    pipe, model_path, prompt_set, judges, n_per_prompt, batch, root, steps=None
):
    from erasekit.evaluation import evaluate_prompt_set, score_images
    from erasekit.sampling import SamplerSettings, generate

    settings = SamplerSettings.for_model(model_path, steps=steps)
    n = len(prompt_set) * n_per_prompt
    # warm-up
    generate(pipe, prompt_set.limit(1), root / "warm", model_path=model_path, settings=settings,
             batch_size=batch, progress=False)  # fmt: skip
    t0 = time.perf_counter()
    records = generate(pipe, prompt_set, root / "gen", model_path=model_path, settings=settings,
                       n_per_prompt=n_per_prompt, batch_size=batch, progress=False)  # fmt: skip
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_images(records, root / "gen", judges.detectors)
    t_det = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_prompt_set(pipe, prompt_set, root, "eval", judges, model_path=model_path,
                        settings=settings, n_per_prompt=n_per_prompt,
                        batch_size=batch)  # fmt: skip
    t_eval = time.perf_counter() - t0
    return {
        "n_images": n,
        "generate_images_per_s": round(n / t_gen, 3),
        "generate_plus_detect_images_per_s": round(n / t_eval, 3),
        "detect_only_images_per_s": round(n / t_det, 2),
        "detector_time_over_generate_time": round(t_det / t_gen, 4),
        "end_to_end_overhead_fraction": round((t_eval - t_gen) / t_gen, 4),
        "note": "end-to-end overhead is within run-to-run noise when the detector is cheap; "
        "detector_time_over_generate_time is the direct measure",
    }


def nudenet_rate(images: list[Image.Image], batch: int = 16) -> dict:
    from erasekit.detectors.nudenet import NudeNetDetector

    det = NudeNetDetector(batch_size=batch)
    det.score(images[:batch])  # warm-up
    t0 = time.perf_counter()
    det.score(images)
    dt = time.perf_counter() - t0
    return {"n_images": len(images), "size": list(images[0].size),
            "images_per_s": round(len(images) / dt, 2), "detector": det.version}  # fmt: skip


def bench_world(n_prompts: int, n_per_prompt: int, batch: int) -> dict:
    from erasekit.concepts import load_concept
    from erasekit.detectors import DetectorOptions
    from erasekit.evaluation import build_judges
    from erasekit.models import load_pipeline
    from erasekit.world import world_path

    model = world_path("full")
    pipe = load_pipeline(model)
    judges = build_judges(load_concept("red"), DetectorOptions())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = timed_generate_and_eval(pipe, model, _prompts(n_prompts), judges, n_per_prompt,
                                        batch, root)  # fmt: skip
        images = [Image.open(p).convert("RGB") for p in sorted((root / "gen").rglob("*.png"))]
    rng = np.random.default_rng(0)
    big = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(64)]
    return {
        "model": "ShapesWorld full (DDIM, the model's recorded sampler settings)",
        "detector": judges.concept.version,
        "world": world,
        "nudenet_on_world_images": nudenet_rate(images),
        "nudenet_512px": nudenet_rate(big),
    }


def bench_sd15(n_prompts: int, batch: int, device: str, steps: int, latent: int = 64) -> dict:
    from benchlib import SD15_UNET, SD_SCHEDULER
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.concepts import load_concept
    from erasekit.detectors import DetectorOptions
    from erasekit.evaluation import build_judges
    from erasekit.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12,
                                        projection_dim=768))  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                        sample_size=8 * latent)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(),
                                   unet=UNet2DConditionModel(**{**SD15_UNET,
                                                                "sample_size": latent}),
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    judges = build_judges(load_concept("nudity"), DetectorOptions(device=device))
    prompts = load_concept("nudity").forget.limit(n_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        sd = timed_generate_and_eval(pipe, None, prompts, judges, 1, batch, Path(tmp), steps)
    return {
        "model": f"SD-1.5 architecture, random weights, {dtype}, {8 * latent} px, "
        f"DDIM {steps} steps, guidance 7.5",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "detector": judges.concept.version,
        "sd15": sd,
        "target": "evaluation overhead <= 0.10",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("part", choices=["world", "gpu"])
    ap.add_argument("--out", default=None, help="JSON (default docs/results/bench-audit-PART.json)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n-per-prompt", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="gpu part: cuda, or cpu for a smoke run")
    ap.add_argument("--steps", type=int, default=50, help="gpu part: sampler steps")
    ap.add_argument("--latent", type=int, default=64, help="gpu part: latent side (64: 512 px)")
    args = ap.parse_args()
    from benchlib import write_record

    from erasekit.cli import quiet_libraries

    quiet_libraries()
    if args.part == "world":
        torch.set_num_threads(2)
        result = bench_world(args.prompts, args.n_per_prompt, args.batch)
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("bench gpu: no CUDA device")
        result = bench_sd15(args.prompts, args.batch, args.device, args.steps, args.latent)
    out = Path(args.out or f"docs/results/bench-audit-{args.part}.json")
    write_record(f"bench_audit {args.part}", result, out)


if __name__ == "__main__":
    main()
