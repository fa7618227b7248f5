"""`erasekit demo`: the main job end to end on the embedded ShapesWorld model, on a CPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erasekit.errors import ErasekitError


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "demo",
        parents=[parent],
        help="run the main job on the embedded ShapesWorld model",
        description=(
            "Erase a concept from ShapesWorld with SalUn (its ShapesWorld preset), then audit "
            "the erased model against the original and the never-learned model (erasekit "
            "audit): concept rates on the direct, paraphrase, held-out and retain prompts, retain "
            "accuracy, Wilson 95%% intervals, a benign fine-tuning attack on each model with "
            "its recovery curve, and an HTML report. Writes OUT/erased-salun and OUT/audit, "
            "each atomically."
        ),
    )
    p.add_argument("--concept", default="red", choices=["red", "circle", "outlined"])
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--n-per-prompt", type=int, default=6,
                   help="images per prompt (6: 72 retain images a model, so the retain-accuracy "
                   "interval is within ±10 points)")  # fmt: skip
    p.add_argument("--erase-steps", type=int, default=0, help="SalUn steps (0: its epochs)")
    p.add_argument("--attack-steps", type=int, default=100, help="benign fine-tuning steps")
    p.add_argument("--attack-eval-every", type=int, default=50, help="recovery-curve spacing")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.api import audit, erase
    from erasekit.concepts import load_concept
    from erasekit.methods.salun import SalUn
    from erasekit.reporting import print_summary
    from erasekit.world import world_path

    concept = load_concept(args.concept)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ErasekitError(f"output folder is not empty: {out} (pass --overwrite)")
    original = world_path("full")
    sets = {"steps": args.erase_steps} if args.erase_steps else {}
    preset = " ".join(f"{k}={v}" for k, v in {**SalUn.defaults(concept), **sets}.items())
    print(f"erasing '{args.concept}' with SalUn ({preset}) ...")
    erased = erase(original, concept, "salun", out / "erased-salun", settings=sets,
                   cache_dir=out / "cache", overwrite=True, progress=False)  # fmt: skip
    steps, every = args.attack_steps, args.attack_eval_every
    print("auditing the erased model against the original and the never-learned model, "
          f"with a benign fine-tuning attack ({steps} steps) on each ...")  # fmt: skip
    result = audit(erased, concept, out / "audit", n_per_prompt=args.n_per_prompt,
                   attacks={"finetune": {"steps": steps, "eval_every": every}},
                   overwrite=True, progress=False,
                   invocation={"command": sys.argv[1:]})  # fmt: skip
    print_summary(result.document, str(out / "audit"))
    print(f"erased model: {erased}")
    return 0
