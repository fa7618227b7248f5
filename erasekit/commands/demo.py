"""`erasekit demo`: the main job end to end on the embedded default model, on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "demo",
        parents=[parent],
        help="run the main job on the embedded default model",
        description=(
            "Build the tiny offline SD pipeline (random weights) and render the 'church' concept's "
            "forget prompts through the one generate path. Until ShapesWorld ships, images are "
            "noise-like: this demonstrates the machinery, not erasure."
        ),
    )
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.concepts import load_concept
    from erasekit.generate import SamplerSettings, generate
    from erasekit.models import load_pipeline
    from erasekit.outputs import atomic_output_dir
    from erasekit.testing import save_tiny_pipeline

    out = Path(args.out)
    concept = load_concept("church")
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        model_dir = save_tiny_pipeline(tmp / "model")
        pipe = load_pipeline(model_dir)
        records = generate(
            pipe,
            concept.forget.limit(4),
            tmp / "samples",
            model_path=model_dir,
            settings=SamplerSettings.for_model(model_dir),
            n_per_prompt=2,
            seed=0,
        )
    print(f"model:   {out / 'model'}")
    print(f"samples: {out / 'samples'} ({len(records)} images, records in samples.jsonl)")
    return 0
