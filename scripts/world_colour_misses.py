"""What the world's full model draws for each colour's direct prompts, at several guidances.

For every colour, renders its `forget` (direct) prompt set, 4 images per prompt, and counts the
world detector's colour label (a palette colour or `none`, drawn off the palette). Writes a JSON
file and a Markdown table generated from it.

  python scripts/world_colour_misses.py --guidance 2,3,4,7 --out DIR [--root ASSETS]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import torch
from worldlib import render_and_score

from erasekit.cli import quiet_libraries
from erasekit.concepts import load_concept
from erasekit.detectors.world import WorldDetector
from erasekit.models import load_pipeline, read_manifest
from erasekit.outputs import write_json
from erasekit.sampling import SamplerSettings
from erasekit.world import ASSETS, world_path
from erasekit.world.classifier import LABELS
from erasekit.world.render import COLOURS

N_PER_PROMPT = 4


def count_labels(pipe, model: Path, detector, colour: str, guidance: float, seed: int) -> dict:
    prompts = load_concept(colour).forget
    settings = SamplerSettings.for_model(model, guidance=guidance)
    with tempfile.TemporaryDirectory() as tmp:
        _, scores = render_and_score(pipe, prompts, Path(tmp) / "out", detector, model_path=model,
                                     n_per_prompt=N_PER_PROMPT, seed=seed,
                                     settings=settings)  # fmt: skip
    counts = Counter(s["pred"]["colour"] for s in scores)
    return {"prompt_set": prompts.describe(), "n_images": len(scores),
            "labels": {label: counts.get(label, 0) for label in LABELS["colour"]}}  # fmt: skip


def markdown(result: dict) -> str:
    labels = LABELS["colour"]
    lines = [
        "# What the full model draws for each colour's direct prompts",
        "",
        "Written by `scripts/world_colour_misses.py`; do not edit by hand.",
        "",
        f"- Model: ShapesWorld v{result['world_version']} `full` (`{result['model']}`); "
        f"detector: `{result['detector']}`, its colour label (`none`: off the palette).",
        f"- {N_PER_PROMPT} images per prompt of each colour's direct prompt set, base seed "
        f"{result['seed']}; the sampler the model records, but for the guidance.",
        "",
        "| guidance | prompted | " + " | ".join(labels) + " | n |",
        "|---|---|" + "---|" * (len(labels) + 1),
    ]
    for g, per_colour in result["guidance"].items():
        for colour, r in per_colour.items():
            cells = " | ".join(str(r["labels"][label]) for label in labels)
            lines.append(f"| {g} | {colour} | {cells} | {r['n_images']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ASSETS), help="world assets folder")
    ap.add_argument("--guidance", default="2,3,4,7", help="comma-separated guidance scales")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder for colour-misses.json / .md")
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(2)
    root = Path(args.root)
    model = world_path("full", root)
    detector = WorldDetector(root / "classifier")
    pipe = load_pipeline(model)
    result = {"model": str(model), "world_version": read_manifest(model)["world"]["version"],
              "detector": detector.version, "seed": args.seed, "guidance": {}}  # fmt: skip
    for g in (float(x) for x in args.guidance.split(",")):
        result["guidance"][str(g)] = {
            c: count_labels(pipe, model, detector, c, g, args.seed) for c in COLOURS
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "colour-misses.json", result)
    (out / "colour-misses.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
