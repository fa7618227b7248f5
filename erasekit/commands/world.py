"""`erasekit world`: the embedded ShapesWorld models — build, path, info."""

from __future__ import annotations

import argparse
import json
import sys

from erasekit.commands._options import positive_int


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "world",
        parents=[parent],
        help="ShapesWorld: the embedded default model (build, path, info)",
        description="ShapesWorld: tiny text-to-image models of coloured shapes (shipped).",
    )
    sub = p.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    from erasekit.world import WORLD_VARIANTS
    from erasekit.world.build import WorldRecipe

    b = sub.add_parser("build", parents=[parent], help="train every world asset from a fixed seed")
    b.add_argument("--out", default=None, help="output folder (default: the package's assets)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    defaults = WorldRecipe()
    for name in ("seed", "n_images", "vae_steps", "classifier_steps", "text_encoder_steps",
                 "base_steps", "unet_steps", "checkpoint_every", "heldout_n"):  # fmt: skip
        kind = int if name == "seed" else positive_int
        b.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    b.add_argument(
        "--unet-seed",
        type=int,
        default=None,
        help="the U-Nets' own seed (default: --seed): replicates of a U-Net recipe that can "
        "share one VAE, classifier and text encoder (--reuse-from)",
    )
    b.add_argument(
        "--variant-text-encoders",
        action="store_true",
        help="give each never-learned model its own text encoder, trained on its captions only "
        "(default: one encoder, trained on every caption, shared by all models)",
    )
    b.add_argument(
        "--variants", default=",".join(WORLD_VARIANTS), help="comma-separated subset to train"
    )
    b.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted build from its work folder (.OUT.build beside --out)",
    )
    b.add_argument(
        "--reuse-from",
        default=None,
        metavar="DIR",
        help="take the VAE, classifier and text encoder of an earlier build (e.g. the shipped "
        "assets) and train only the U-Nets; its recipe must agree on what those stages use",
    )
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=run_build)

    pa = sub.add_parser("path", parents=[parent], help="print a shipped model's folder")
    pa.add_argument("--variant", default="full", choices=list(WORLD_VARIANTS))
    pa.set_defaults(func=run_path)

    i = sub.add_parser("info", parents=[parent], help="concepts, sizes and quality figures")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from erasekit.errors import ErasekitError
    from erasekit.world import ASSETS, WORLD_VARIANTS
    from erasekit.world.build import WorldRecipe, build_world

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in WORLD_VARIANTS]
    if unknown or not variants:
        raise ErasekitError(f"unknown world variants {unknown} (choose from {WORLD_VARIANTS})")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ErasekitError("--device cuda: no CUDA device is available")
    recipe = replace(
        WorldRecipe(),
        seed=args.seed,
        unet_seed=args.unet_seed,
        n_images=args.n_images,
        vae_steps=args.vae_steps,
        classifier_steps=args.classifier_steps,
        text_encoder_steps=args.text_encoder_steps,
        base_steps=args.base_steps,
        unet_steps=args.unet_steps,
        checkpoint_every=args.checkpoint_every,
        heldout_n=args.heldout_n,
        variant_text_encoders=args.variant_text_encoders,
    )
    out = args.out or str(ASSETS)
    command = "erasekit " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
    info = build_world(out, recipe, variants, progress=not args.no_progress, device=args.device,
                       command=command, resume=args.resume,
                       reuse_from=args.reuse_from)  # fmt: skip
    print(f"wrote ShapesWorld ({', '.join(variants)}) to {out} in {info['timings_s']['total_s']} s")
    return 0


def run_path(args: argparse.Namespace) -> int:
    from erasekit.world import world_path

    print(world_path(args.variant))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from erasekit.world.info import world_info

    info = world_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"ShapesWorld v{info['world_version']} — embedded text-to-image world (erasekit)")
    for dim, values in info["concepts"].items():
        print(f"  {dim:7s} {', '.join(values)}")
    for v in info["variants"]:
        print(f"  model {v['variant']:10s} {v['path']}  ({v['parameters']:,} parameters, "
              f"{v['size_mb']:.1f} MB, held out: {v['held_out_concept'] or 'none'})")  # fmt: skip
    acc = info.get("classifier_heldout_accuracy") or {}
    if acc:
        print("  classifier accuracy on 2000 fresh held-out renders (and on their VAE round "
              "trips): " + json.dumps(acc))  # fmt: skip
    fp = info.get("classifier_off_world_false_positives") or {}
    if fp:
        rates = {
            where: {k: v[k] for k in ("off_colour_named_any", "off_shape_named_any")}
            for where, v in fp.items()
        }
        print("  classifier false positives (a world class named instead of 'none') on fresh "
              "off-palette colours and distractor shapes: " + json.dumps(rates))  # fmt: skip
    q = info.get("quality")
    if q:
        bars = {k: v["value"] if isinstance(v, dict) else v for k, v in q["summary"].items()}
        print("  quality (>= 64 images a concept; per-concept rates with 95% Wilson CIs in "
              "docs/results/world.md): " + json.dumps(bars))  # fmt: skip
    else:
        print("  quality: not measured (python scripts/world_quality.py)")
    return 0
