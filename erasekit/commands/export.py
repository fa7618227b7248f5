"""`erasekit export`: a model folder as one single-file checkpoint."""

from __future__ import annotations

import argparse

from erasekit.commands._options import add_model_options


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "export",
        parents=[parent],
        help="write a model as one .safetensors file (original LDM layout by default)",
        description="Write a model's U-Net, VAE and text-encoder weights as one .safetensors "
        "file: the original (LDM) single-file layout that tools taking "
        "v1-5-pruned-emaonly.safetensors-style files read, or erasekit's component layout. "
        "It loads back with --model FILE --config <a diffusers folder of the architecture>.",
    )
    add_model_options(p, dtype=False)
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--layout", default="ldm", choices=["ldm", "components"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.api import export

    out = export(args.model, args.out, layout=args.layout, model_config=args.model_config,
                 allow_pickle=args.allow_pickle, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {out} ({args.layout} layout)")
    return 0
