"""`erasekit generate`: render a prompt set with a model (the one generation path)."""

from __future__ import annotations

import argparse

from erasekit.commands._options import add_model_options, positive_int


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
    from erasekit.api import generate
    from erasekit.distributed import process_state

    records = generate(args.model, args.prompts, args.out, n_per_prompt=args.n_per_prompt,
                       seed=args.seed, steps=args.steps, guidance=args.guidance,
                       height=args.height, width=args.width,
                       negative_prompt=args.negative_prompt, batch_size=args.batch_size,
                       limit=args.limit, device=args.device, dtype=args.dtype,
                       model_config=args.model_config, allow_pickle=args.allow_pickle,
                       overwrite=args.overwrite, progress=not args.no_progress)  # fmt: skip
    if process_state().is_main_process:
        prompts = len({r["prompt_index"] for r in records})
        print(f"wrote {len(records)} images of {prompts} prompts to {args.out}")
    return 0
