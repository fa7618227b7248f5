"""`erasekit audit`: concept rates, utility and their before/after, with definitions."""

from __future__ import annotations

import argparse

from erasekit.commands._options import add_model_options, positive_int
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
    g.add_argument("--detector-batch-size", type=positive_int, default=16, metavar="B")


def register(subparsers, parent: argparse.ArgumentParser) -> None:
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
    p.add_argument("--n-per-prompt", type=positive_int, default=1, metavar="K")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B")
    p.add_argument("--steps", type=positive_int, metavar="N", help="sampler steps override")
    p.add_argument("--guidance", type=float, metavar="G", help="guidance override")
    add_detector_options(p)
    g = p.add_argument_group("recovery attacks")
    g.add_argument("--attacks", metavar="A,B", default="",
                   help="comma-separated: finetune, memora, concept-inversion")  # fmt: skip
    g.add_argument("--attack-config", metavar="FILE",
                   help="YAML mapping attack name -> settings")  # fmt: skip
    g.add_argument("--attack-set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="override one attack setting (repeatable)")  # fmt: skip
    p.add_argument("--guidance-baselines", action="store_true",
                   help="also render the audited weights unguided (if the folder has guidance), "
                   "with the concept's words as a negative prompt, and with SLD (same sets, "
                   "seeds and detectors)")  # fmt: skip
    p.add_argument("--uncensored", action="store_true", help="report shows flagged images as is")
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
        allow_pickle=args.allow_pickle,
        batch_size=args.detector_batch_size,
    )


def run(args: argparse.Namespace) -> int:
    from erasekit.attacks import ATTACKS
    from erasekit.audit import AuditSettings, attack_configs, run_audit
    from erasekit.concepts import load_concept
    from erasekit.distributed import process_state

    concept = load_concept(args.concept)
    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    for n in names:
        ATTACKS.get(n)  # unknown names fail here, before any rendering
    if (args.attack_config or args.attack_set) and not names:
        raise ErasekitError("--attack-config/--attack-set given without --attacks")
    configs = attack_configs(names, args.attack_config, args.attack_set, concept) if names else None
    settings = AuditSettings(
        n_per_prompt=args.n_per_prompt,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        steps=args.steps,
        guidance=args.guidance,
        dtype=args.dtype,
        device=args.device,
    )
    doc = run_audit(args.model, concept, args.out, audit=settings,
                    detectors=detector_options(args), reference=args.reference,
                    never_learned=args.never_learned, model_config=args.model_config,
                    allow_pickle=args.allow_pickle, uncensored=args.uncensored,
                    overwrite=args.overwrite, progress=not args.no_progress,
                    attacks=configs, baselines=args.guidance_baselines)  # fmt: skip
    if process_state().is_main_process:
        print_summary(doc, args.out)
    return 0


def print_summary(doc: dict, out: str) -> None:
    from erasekit.report import (
        attack_verdicts,
        guidance_verdicts,
        prompt_attack_verdicts,
        summary_rows,
        verdict,
    )

    for row in summary_rows(doc):
        print(verdict(row))
    for line in guidance_verdicts(doc):
        print(f"guidance: {line}")
    for line in attack_verdicts(doc) + prompt_attack_verdicts(doc):
        print(line)
    print(f"report: {out}/report.html (results.json, report.md, samples.jsonl beside it)")
