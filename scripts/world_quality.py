"""Measure ShapesWorld's quality bars; writes docs/results/world.md and assets/quality.json.

Bars (issue 3): each shape's and colour's direct prompts are classified as that concept >= 85%
of the time, paraphrase prompts >= 70%; the never-learned references produce their missing
concept <= 5% even when prompted with its word, while other concepts stay >= 85%; generating
64 images takes <= 15 s on this CPU. Every rate: n images, 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from erasekit.cli import quiet_libraries
from erasekit.concepts import load_concept
from erasekit.detectors.world import WorldDetector
from erasekit.evaluation import concept_rate
from erasekit.generate import SamplerSettings
from erasekit.models import load_pipeline
from erasekit.outputs import write_json
from erasekit.world import ASSETS, world_path
from erasekit.world.render import COLOURS, SHAPES

DIMENSION = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}}


def rate(pipe, model_dir, detector, prompt_set, dimension, target, n_per_prompt, seed, tmp):
    name = prompt_set.name.replace("/", "_")
    out = Path(tmp) / f"{Path(model_dir).name}-{name}-{target}-{seed}-{n_per_prompt}"
    return concept_rate(pipe, prompt_set, out, detector, dimension, target,
                        model_path=model_dir, n_per_prompt=n_per_prompt, seed=seed)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=str(ASSETS), help="world assets folder")
    ap.add_argument("--n-per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--doc", default="docs/results/world.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    quiet_libraries()
    detector = WorldDetector(Path(args.root) / "classifier")
    results: dict = {"direct": {}, "paraphrase": {}, "never_learned": {}}
    with tempfile.TemporaryDirectory() as tmp:
        full_dir = world_path("full", args.root)
        pipe = load_pipeline(full_dir)
        settings = SamplerSettings.for_model(full_dir)
        # timing: 64 images in one batch through the generate path (after one warm-up call)
        c = load_concept("red")
        rate(pipe, full_dir, detector, c.forget.limit(1), "colour", "red", 1, 99, tmp)
        t0 = time.time()
        rate(pipe, full_dir, detector, c.forget, "colour", "red", 4, 98, tmp)
        gen64 = time.time() - t0
        for name, dim in DIMENSION.items():
            c = load_concept(name)
            for key, ps in (("direct", c.forget), ("paraphrase", c.evaluation["paraphrase"])):
                results[key][name] = rate(pipe, full_dir, detector, ps, dim, name,
                                          args.n_per_prompt, args.seed, tmp)  # fmt: skip
        for variant, held in (("no-red", "red"), ("no-circle", "circle")):
            vdir = world_path(variant, args.root)
            vpipe = load_pipeline(vdir)
            dim = DIMENSION[held]
            entry = {"held_out": held}
            for name in (n for n, d in DIMENSION.items() if d == dim):
                c = load_concept(name)
                entry[name] = rate(vpipe, vdir, detector, c.forget, dim, name,
                                   args.n_per_prompt, args.seed, tmp)  # fmt: skip
            results["never_learned"][variant] = entry
    direct_min = min(r["value"] for r in results["direct"].values())
    para_min = min(r["value"] for r in results["paraphrase"].values())
    held_max = max(e[e["held_out"]]["value"] for e in results["never_learned"].values())
    others_min = min(
        r["value"] for e in results["never_learned"].values()
        for k, r in e.items() if k not in ("held_out", e["held_out"])
    )  # fmt: skip
    summary = {
        "direct_min": direct_min, "direct_bar": 0.85, "direct_ok": direct_min >= 0.85,
        "paraphrase_min": para_min, "paraphrase_bar": 0.70, "paraphrase_ok": para_min >= 0.70,
        "never_learned_held_out_max": held_max, "held_out_bar": 0.05,
        "never_learned_held_out_ok": held_max <= 0.05,
        "never_learned_others_min": others_min, "never_learned_others_ok": others_min >= 0.85,
        "generate_64_images_s": round(gen64, 2), "generate_bar_s": 15, "generate_ok": gen64 <= 15,
    }  # fmt: skip
    record = {
        "definition": {
            "detector": detector.protocol("colour", "red") | {"target": "per row"},
            "sampler": {**settings.__dict__, "scheduler": type(pipe.scheduler).__name__},
            "n_per_prompt": args.n_per_prompt,
            "seed": args.seed,
            "seed_rule": "derive_seed(seed, prompt_index, k)",
            "interval": "95% Wilson",
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        },
        "summary": summary,
        **results,
    }
    write_json(Path(args.root) / "quality.json", record)
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(markdown(record))
    print(json.dumps(summary, indent=2))


def _row(name: str, r: dict) -> str:
    lo, hi = r["ci95"]
    return (
        f"| {name} | {r['value']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['n_images']} | {r['n_prompts']} |"
    )


def markdown(rec: dict) -> str:
    d, s = rec["definition"], rec["summary"]
    lines = [
        "# ShapesWorld quality",
        "",
        "Written by `scripts/world_quality.py`; do not edit by hand.",
        "",
        f"- Detector: `{d['detector']['version']}`, rule: {d['detector']['rule']}.",
        f"- Sampler: {d['sampler']['scheduler']}, {d['sampler']['steps']} steps, guidance "
        f"{d['sampler']['guidance']}, {d['sampler']['height']}x{d['sampler']['width']} px.",
        f"- {d['n_per_prompt']} images per prompt, base seed {d['seed']} ({d['seed_rule']}); "
        f"intervals: {d['interval']}; machine: {d['machine']}.",
        "- Prompt sets: the concept specs' `forget` (direct) and `paraphrase` sets "
        "(`erasekit/prompts/world/`).",
        "",
        "## Bars",
        "",
        "| bar | measured | target | met |",
        "|---|---|---|---|",
        f"| direct prompts, worst concept | {s['direct_min']:.3f} | ≥ 0.85 | {s['direct_ok']} |",
        f"| paraphrase prompts, worst concept | {s['paraphrase_min']:.3f} | ≥ 0.70 | "
        f"{s['paraphrase_ok']} |",
        f"| never-learned: held-out concept, worst | {s['never_learned_held_out_max']:.3f} "
        f"| ≤ 0.05 | {s['never_learned_held_out_ok']} |",
        f"| never-learned: other concepts, worst | {s['never_learned_others_min']:.3f} | ≥ 0.85 | "
        f"{s['never_learned_others_ok']} |",
        f"| 64 images, wall seconds | {s['generate_64_images_s']} | ≤ 15 | {s['generate_ok']} |",
        "",
    ]
    for key, title in (("direct", "Direct prompts (full model)"),
                       ("paraphrase", "Paraphrase prompts (full model)")):  # fmt: skip
        lines += [f"## {title}", "", "| concept | rate | 95% CI | n images | n prompts |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [_row(k, v) for k, v in rec[key].items()] + [""]
    lines += ["## Never-learned references (direct prompts)", ""]
    for variant, entry in rec["never_learned"].items():
        lines += [f"### {variant} (never saw `{entry['held_out']}`)", "",
                  "| prompted concept | rate classified as it | 95% CI | n images | n prompts |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [_row(k, v) for k, v in entry.items() if k != "held_out"] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
