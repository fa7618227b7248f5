"""`erasekit demo`: the main job end to end on the embedded ShapesWorld model, on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "demo",
        parents=[parent],
        help="run the main job on the embedded ShapesWorld model",
        description=(
            "Erase a concept from ShapesWorld with SalUn (lr 3e-5 for 10 epochs, otherwise "
            "the method's defaults), then render the concept's forget and retain prompts with the "
            "original, the erased model and the never-learned reference, and measure how often "
            "the world detector sees the concept (Wilson 95%% intervals)."
        ),
    )
    p.add_argument("--concept", default="red", choices=["red", "circle"])
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--n-per-prompt", type=int, default=2)
    p.add_argument("--erase-steps", type=int, default=0, help="SalUn steps (0: its epochs)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.concepts import load_concept
    from erasekit.detectors.world import WorldDetector
    from erasekit.evaluation import (
        attribute_accuracy,
        concept_rate,
        flag_rate,
        render_and_score,
    )
    from erasekit.methods.salun import SalUn
    from erasekit.models import load_pipeline
    from erasekit.outputs import atomic_output_dir, write_json
    from erasekit.training import build_config, train
    from erasekit.world import world_path

    concept = load_concept(args.concept)
    dim, target = concept.detector["dimension"], concept.detector["target"]
    detector = WorldDetector()
    out = Path(args.out)
    rows = []
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        sets = ["lr=3e-5", "epochs=10"]
        if args.erase_steps:
            sets.append(f"steps={args.erase_steps}")
        config = build_config(SalUn.Config, SalUn.defaults(concept), sets=sets)
        original = world_path("full")
        method = SalUn(config, concept, model_path=original, cache_dir=tmp / "cache")
        erased = tmp / "erased-salun"
        print(f"erasing '{args.concept}' with SalUn ({' '.join(sets)}) ...")
        train(method, load_pipeline(original), model_path=original, out_dir=erased,
              concept=concept)  # fmt: skip
        models = {"full": original, "erased-salun": erased, f"no-{args.concept}": None}
        for variant, model in models.items():
            model = model or world_path(variant)
            pipe = load_pipeline(model)
            kw = {"model_path": model, "n_per_prompt": args.n_per_prompt}
            rate = concept_rate(pipe, concept.forget, tmp / f"{variant}-forget", detector, dim,
                                target, **kw)  # fmt: skip
            rows.append({"model": variant, "metric": f"{target}_rate", **rate})
            # retain prompts: rendered once, judged for the concept and for accuracy
            records, scores = render_and_score(pipe, concept.retain, tmp / f"{variant}-retain",
                                               detector, **kw)  # fmt: skip
            rate = flag_rate(scores, detector, dim, target, concept.retain)
            rows.append({"model": variant, "metric": f"{target}_rate", **rate})
            acc = attribute_accuracy(records, scores, concept.retain)
            rows.append({"model": variant, "metric": "retain_accuracy", **acc})
        write_json(tmp / "results.json",
                   {"detector": detector.protocol(dim, target), "results": rows})  # fmt: skip
    print(f"concept '{target}' ({dim}); detector {detector.version}, rule: argmax = {target}")
    for r in rows:
        lo, hi = r["ci95"]
        print(f"  {r['model']:12s} {r['prompt_set']['name']:12s} {r['metric']:15s} = "
              f"{r['value']:.2f} [95% CI {lo:.2f}-{hi:.2f}], n={r['n_images']} images "
              f"of {r['n_prompts']} prompts")  # fmt: skip
    print("retain_accuracy: share of retain images whose colour and shape are the prompt's")
    print(f"images and results.json in {out}")
    return 0
