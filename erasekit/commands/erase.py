"""`erasekit erase`: erase a concept from a model with a registered method."""

from __future__ import annotations

import argparse

from erasekit.commands._options import add_model_options


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    from erasekit.catalog import names, preset_names

    methods = ", ".join(names("methods"))
    presets = "; ".join(f"{m}: {', '.join(p)}" for m, p in preset_names().items())
    p = subparsers.add_parser(
        "erase",
        parents=[parent],
        help=f"erase a concept from a model ({methods})",
        description=(
            "Erase a concept with a method on the shared accelerate training loop and write the "
            "erased model (diffusers folder + erasekit.json + training_log.jsonl, and the SalUn "
            "mask, the ResAlign LoRA; negative-embedding: the unchanged weights + the learned "
            "embedding + guidance.json). Settings: method defaults, then --preset NAME, then "
            "--config FILE.yaml, then --set key=value. "
            "Several processes: accelerate launch -m erasekit erase ..."
        ),
    )
    add_model_options(p, config_flag="--model-config", dtype=False)
    p.add_argument("--concept", required=True, help="concept name or YAML spec")
    p.add_argument(
        "--method",
        required=True,
        help=f"erasure method: {methods} ('erasekit methods' describes each)",
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--preset", metavar="NAME", help=f"named settings from a source ({presets})")
    p.add_argument("--config", dest="method_config", metavar="FILE", help="YAML method settings")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting (repeatable); an unknown key's error lists the valid ones",
    )  # fmt: skip
    p.add_argument("--resume", metavar="latest|PATH", help="continue from a checkpoint")
    p.add_argument("--mask", metavar="PATH", help="salun: reuse a saved saliency mask")
    p.add_argument("--forget-images", metavar="DIR", help="imagefolder of forget images")
    p.add_argument("--retain-images", metavar="DIR", help="imagefolder of retain images")
    p.add_argument("--cache-dir", metavar="DIR", help="rendered-data cache (default ~/.cache)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.api import erase
    from erasekit.distributed import process_state

    out = erase(args.model, args.concept, args.method, args.out, settings=args.sets,
                preset=args.preset,
                config_file=args.method_config, resume=args.resume, device=args.device,
                model_config=args.model_config, allow_pickle=args.allow_pickle,
                forget_images=args.forget_images, retain_images=args.retain_images,
                mask=args.mask, cache_dir=args.cache_dir, overwrite=args.overwrite,
                progress=not args.no_progress)  # fmt: skip
    if process_state().is_main_process:
        print(f"erased '{args.concept}' with {args.method}: model written to {out}")
    return 0
