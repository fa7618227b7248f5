"""`erasekit audit`: concept rates, utility and their before/after, with definitions."""

from __future__ import annotations

import argparse

from erasekit.commands._options import add_censor_options, add_model_options, positive_int
from erasekit.errors import ErasekitError


def add_detector_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detectors (local weights only)")
    g.add_argument("--nudenet-model", metavar="ONNX", help="a local 640m model (default: 320n)")
    g.add_argument("--nudenet-resolution", type=positive_int, metavar="PX",
                   help="inference size (default 320 for 320n, 640 for another model)")  # fmt: skip
    g.add_argument("--clip-model", metavar="NAME|JSON", default=None,
                   help="open_clip model name (ViT-L-14; ViT-L-14-quickgelu for OpenAI weights) "
                   "or a model config .json")  # fmt: skip
    g.add_argument(
        "--clip-weights", metavar="PATH", help="local open_clip weights (CLIP score on retain)"
    )
    g.add_argument("--world-classifier", metavar="DIR", help="ShapesWorld classifier folder")
    g.add_argument("--inception-weights", metavar="PATH",
                   help="local FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth"
                   " with --allow-pickle, or its .safetensors): FID and KID on the utility"
                   " sets")  # fmt: skip
    g.add_argument("--fid-features", choices=("inception", "world"), default="inception",
                   help="FID/KID features: the Inception-v3 (--inception-weights), or world: "
                   "the world classifier's pooled trunk (ShapesWorld; no weights to "
                   "give)")  # fmt: skip
    g.add_argument("--detector-batch-size", type=positive_int, default=16, metavar="B")


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    from erasekit.catalog import names

    p = subparsers.add_parser(
        "audit",
        parents=[parent],
        help="measure a concept on a model and its references; write results + report",
        description=(
            "Render the concept's evaluation, forget and retain prompt sets with the audited "
            "model, its reference (default: the base model in its manifest) and, for "
            "ShapesWorld concepts, the never-learned model; score them with the concept's "
            "detector under every named protocol; write results.json, samples.jsonl, images/, "
            "report.html and report.md (atomically)."
        ),
    )
    add_model_options(p)
    p.add_argument("--concept", required=True, help="built-in concept name or a YAML spec")
    p.add_argument("--out", required=True, help="audit folder (written atomically)")
    p.add_argument(
        "--reference",
        metavar="PATH|none",
        help="the model before erasure (default: the manifest's base model)",
    )
    p.add_argument("--never-learned", metavar="PATH|none",
                   help="a model that never learned the concept (default for ShapesWorld "
                   "concepts: the shipped no-<concept> model)")  # fmt: skip
    p.add_argument("--limit", type=positive_int, metavar="N", help="first N prompts of each set")
    p.add_argument("--captions", metavar="FILE",
                   help="benign captions (a COCO-style CSV such as coco_30k.csv, or a text file)"
                   " rendered by every model: CLIP score and FID/KID on them")  # fmt: skip
    p.add_argument("--fid-images", metavar="DIR",
                   help="FID/KID against this folder of images (e.g. the COCO photos) instead of"
                   " the reference model's images")  # fmt: skip
    p.add_argument("--n-per-prompt", type=positive_int, default=1, metavar="K")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B")
    p.add_argument("--steps", type=positive_int, metavar="N", help="sampler steps override")
    p.add_argument("--guidance", type=float, metavar="G", help="guidance override")
    add_detector_options(p)
    g = p.add_argument_group("recovery and prompt attacks")
    g.add_argument("--attacks", metavar="A,B", default="",
                   help="comma-separated: " + ", ".join(names("attacks")))  # fmt: skip
    g.add_argument("--attack-config", metavar="FILE",
                   help="YAML mapping attack name -> settings")  # fmt: skip
    g.add_argument("--attack-set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="override one attack setting (repeatable)")  # fmt: skip
    p.add_argument("--guidance-baselines", action="store_true",
                   help="also render the audited weights unguided (if the folder has guidance), "
                   "with the concept's words as a negative prompt, and with SLD (same sets, "
                   "seeds and detectors)")  # fmt: skip
    add_censor_options(p)
    p.add_argument("--model-card", action="store_true",
                   help="write the evidence into the audited folder: erasekit-audit.json and "
                   "the README's model-index metadata")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def detector_options(args: argparse.Namespace):
    from erasekit.detectors import DetectorOptions

    return DetectorOptions(
        nudenet_model=args.nudenet_model,
        nudenet_resolution=args.nudenet_resolution,
        clip_model=args.clip_model,
        clip_weights=args.clip_weights,
        world_classifier=args.world_classifier,
        inception_weights=args.inception_weights,
        fid_features=args.fid_features,
        allow_pickle=args.allow_pickle,
        batch_size=args.detector_batch_size,
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from erasekit.api import audit
    from erasekit.distributed import process_state
    from erasekit.reporting import print_summary

    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    if (args.attack_config or args.attack_set) and not names:
        raise ErasekitError("--attack-config/--attack-set given without --attacks")
    per_attack: dict[str, list[str]] = {n: [] for n in names}
    for item in args.attack_set:
        name, dot, rest = item.partition(".")
        if not dot or name not in per_attack:
            raise ErasekitError(f"--attack-set expects ATTACK.key=value for a requested attack, "
                                f"got {item!r}")  # fmt: skip
        per_attack[name].append(rest)
    roles: dict[str, str | None] = {}
    for role, value in (("reference", args.reference), ("never-learned", args.never_learned)):
        if value is not None:
            roles[role] = None if value == "none" else value
    result = audit(args.model, args.concept, args.out, roles=roles, attacks=per_attack,
                   attack_config=args.attack_config, n_per_prompt=args.n_per_prompt,
                   seed=args.seed, limit=args.limit, batch_size=args.batch_size,
                   steps=args.steps, guidance=args.guidance, dtype=args.dtype,
                   device=args.device, detectors=detector_options(args),
                   model_config=args.model_config, allow_pickle=args.allow_pickle,
                   guidance_baselines=args.guidance_baselines, censor=args.censor,
                   overwrite=args.overwrite, progress=not args.no_progress,
                   invocation={"command": sys.argv[1:]}, model_card=args.model_card,
                   captions=args.captions, fid_images=args.fid_images)  # fmt: skip
    if process_state().is_main_process:
        print_summary(result.document, args.out)
    return 0
