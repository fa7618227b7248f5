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
            "Erase a concept from ShapesWorld with SalUn (its ShapesWorld preset), then audit "
            "the erased model against the original and the never-learned model (erasekit "
            "audit): concept rates on the direct, paraphrase and retain prompts, retain "
            "accuracy, Wilson 95%% intervals, a benign fine-tuning attack on each model with "
            "its recovery curve, and an HTML report."
        ),
    )
    p.add_argument("--concept", default="red", choices=["red", "circle", "outlined"])
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--erase-steps", type=int, default=0, help="SalUn steps (0: its epochs)")
    p.add_argument("--attack-steps", type=int, default=100, help="benign fine-tuning steps")
    p.add_argument("--attack-eval-every", type=int, default=50, help="recovery-curve spacing")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.audit import AuditSettings, attack_configs, run_audit
    from erasekit.commands.audit import print_summary
    from erasekit.concepts import load_concept
    from erasekit.methods.salun import SalUn
    from erasekit.models import load_pipeline
    from erasekit.outputs import atomic_output_dir
    from erasekit.training import build_config, train
    from erasekit.world import world_path

    concept = load_concept(args.concept)
    out = Path(args.out)
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        sets = [f"steps={args.erase_steps}"] if args.erase_steps else []
        config = build_config(SalUn.Config, SalUn.defaults(concept), sets=sets)
        original = world_path("full")
        method = SalUn(config, concept, model_path=original, cache_dir=tmp / "cache")
        erased = tmp / "erased-salun"
        preset = " ".join(f"{k}={v}" for k, v in {**SalUn.defaults(concept)}.items())
        print(f"erasing '{args.concept}' with SalUn ({' '.join([preset, *sets])}) ...")
        train(method, load_pipeline(original), model_path=original, out_dir=erased,
              concept=concept)  # fmt: skip
        steps, every = args.attack_steps, args.attack_eval_every
        print("auditing the erased model against the original and the never-learned model, "
              f"with a benign fine-tuning attack ({steps} steps) on each ...")  # fmt: skip
        attack_sets = [f"finetune.steps={steps}", f"finetune.eval_every={every}"]
        attacks = attack_configs(["finetune"], sets=attack_sets, concept=concept)
        doc = run_audit(erased, concept, tmp / "audit", reference=str(original),
                        audit=AuditSettings(n_per_prompt=args.n_per_prompt), attacks=attacks,
                        progress=False)  # fmt: skip
    print_summary(doc, str(out / "audit"))
    print(f"erased model: {out / 'erased-salun'}")
    return 0
