"""`erasekit generate`: render a prompt set with a model (the one generation path)."""

from __future__ import annotations

import argparse

from erasekit.commands._options import add_model_options, load_model_from_args, positive_int


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "generate",
        parents=[parent],
        help="render a prompt set: images/*.png + samples.jsonl",
        description=(
            "Render prompts with a model. Seeds come from the prompt file when it has them "
            "(I2P/UnlearnDiffAtk CSV), else are derived from --seed. Sampler settings default "
            "to those the model records in erasekit.json, else SD's (50 steps, guidance 7.5)."
        ),
    )
    add_model_options(p)
    p.add_argument("--prompts", required=True, help="prompt file (.txt/.csv) or one prompt")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--n-per-prompt", type=positive_int, default=1, metavar="K")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N")
    p.add_argument("--guidance", type=float, default=None, metavar="G")
    p.add_argument("--height", type=positive_int, default=None)
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="B")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="first N prompts")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.concepts import resolve_prompts
    from erasekit.distributed import process_state
    from erasekit.generate import SamplerSettings, generate

    prompt_set = resolve_prompts(args.prompts).limit(args.limit)
    # A single-file checkpoint's recorded defaults live in its --config folder.
    settings = SamplerSettings.for_model(
        args.model_config or args.model,
        steps=args.steps,
        height=args.height,
        width=args.width,
    )
    pipe = load_model_from_args(args)
    records = generate(
        pipe,
        prompt_set,
        args.out,
        model_path=args.model,
        settings=settings,
        n_per_prompt=args.n_per_prompt,
        seed=args.seed,
        guidance=args.guidance,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if process_state().is_main_process:
        print(f"wrote {len(records)} images of {len(prompt_set)} prompts to {args.out}")
    return 0
