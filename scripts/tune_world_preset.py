"""Choose a method's ShapesWorld preset on the tuning phrasings, by a rule fixed before the sweep.

    python scripts/tune_world_preset.py --method speed --grid studies/tuning/speed.yaml \\
        --out docs/results/speed-world-tuning [--concepts red,circle,outlined] [--seeds 0,1,2]

The grid file maps candidate names to settings (``{name: {key: value}}``), the first being the
method's defaults. Every candidate erases each concept from the shipped world's ``full`` model
(with the erase seed for methods that train), and is measured on the concept's **tuning** sets
only (``tuning`` in its spec: two caption templates no audit set, training prompt or attack
seed uses): the concept rate on its tuning phrasings and the retain accuracy on the tuning
retain phrasings, ``--n-per-prompt`` images per prompt at evaluation seed 1000 + seed.

The rule (written into the output before any number): per concept, among the candidates whose
retain accuracy, pooled over the seeds, is at most 3 points below the original's, the lowest
pooled concept rate wins (ties: the earlier candidate in the grid); when none keeps retain, the
smallest retain loss wins and the output says so. A candidate whose model renders non-finite
pixels on any seed is listed as broken and never chosen. Reported numbers come from the
audit's sets, never from these. Resumable: each (candidate, concept, seed) is a JSON part under
``--out/parts``; a rerun measures only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import yaml

import erasekit
from erasekit.concepts import load_concept
from erasekit.errors import DegenerateOutput
from erasekit.outputs import atomic_file
from erasekit.provenance import run_provenance
from erasekit.stats import wilson_interval
from erasekit.world import WORLD_VERSION, world_path

RULE = (
    "per concept, among the candidates whose tuning retain accuracy pooled over the seeds"
    " is at most 3 points below the original's, the lowest pooled tuning concept rate"
    " (ties: the earlier candidate); if none keeps retain, the smallest retain loss"
)
RETAIN_LOSS = 0.03


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def tuning_concept(name: str):
    concept = load_concept(name)
    if not concept.tuning:
        sys.exit(f"erasekit: error: concept {name!r} has no tuning sets")
    return dataclasses.replace(concept, evaluation={"tuning": concept.tuning["concept"]},
                               retain=concept.tuning["retain"])  # fmt: skip


def measure(model, concept: str, seed: int, n: int) -> dict:
    metrics = erasekit.evaluate(model, tuning_concept(concept), sets=["tuning", "retain"],
                                n_per_prompt=n, seed=1000 + seed)  # fmt: skip
    rate, keep = metrics["concept_rate/tuning"], metrics["retain_accuracy/retain"]
    return {"rate": rate["value"], "n_rate": rate["n_images"], "retain": keep["value"],
            "n_retain": keep["n_images"]}  # fmt: skip


def part(args, candidate: str, settings: dict | None, concept: str, seed: int) -> dict:
    file = args.out / "parts" / f"{candidate}--{concept}--{seed}.json"
    if file.is_file():
        return json.loads(file.read_text())
    with tempfile.TemporaryDirectory(prefix="erasekit-tune-") as tmp:
        if settings is None:  # the original
            model, seconds = world_path("full"), 0.0
        else:
            model = erasekit.erase(world_path("full"), concept, args.method, Path(tmp) / "m",
                                   settings={"seed": seed, **settings}, progress=False)  # fmt: skip
            seconds = json.loads((model / "erasekit.json").read_text())["wall_time_s"]
        try:
            record = {**measure(model, concept, seed, args.n_per_prompt), "erase_s": seconds}
        except DegenerateOutput as e:  # a candidate that broke the model is never chosen
            record = {"broken": str(e), "erase_s": seconds}
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps(record))
    return record


def pooled(records: list[dict], key: str) -> dict:
    hits = sum(round(r[key] * r[f"n_{key}"]) for r in records)
    n = sum(r[f"n_{key}"] for r in records)
    low, high = wilson_interval(hits, n)
    return {"value": hits / n, "ci": [low, high], "n": n}


def choose(rows: dict[str, dict]) -> tuple[str, bool]:
    base = rows["original"]["retain"]["value"]
    candidates = [k for k in rows if k != "original" and "broken" not in rows[k]]
    keeps = [k for k in candidates if base - rows[k]["retain"]["value"] <= RETAIN_LOSS + 1e-9]
    if keeps:
        return min(keeps, key=lambda k: (rows[k]["rate"]["value"], candidates.index(k))), True
    return min(candidates, key=lambda k: base - rows[k]["retain"]["value"]), False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--grid", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--concepts", default="red,circle,outlined")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-per-prompt", type=int, default=4)
    args = ap.parse_args()
    grid = yaml.safe_load(args.grid.read_text())
    if not isinstance(grid, dict) or "original" in grid:
        sys.exit("erasekit: error: the grid maps candidate names (not 'original') to settings")
    seeds = [int(s) for s in args.seeds.split(",")]
    concepts = args.concepts.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "RULE.txt", RULE + "\n")  # before any number
    result = {"method": args.method, "rule": RULE, "world_version": WORLD_VERSION,
              "grid": grid, "seeds": seeds, "n_per_prompt": args.n_per_prompt,
              "sets": "each concept's tuning sets (concept and retain)", "concepts": {},
              "provenance": run_provenance()}  # fmt: skip
    for concept in concepts:
        rows = {}
        for name, settings in {"original": None, **grid}.items():
            records = [part(args, name, settings, concept, s) for s in seeds]
            broken = [r["broken"] for r in records if "broken" in r]
            if broken:
                rows[name] = {"broken": broken[0], "erase_s": max(r["erase_s"] for r in records)}
                continue
            rows[name] = {"rate": pooled(records, "rate"), "retain": pooled(records, "retain"),
                          "erase_s": max(r["erase_s"] for r in records)}  # fmt: skip
        chosen, kept = choose(rows)
        result["concepts"][concept] = {"rows": rows, "chosen": chosen, "retain_kept": kept}
    atomic_write_text(args.out / "tuning.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "leaderboard.md", render(result))
    print(render(result))


def render(result: dict) -> str:
    fmt = lambda m: f"{m['value']:.2f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]"  # noqa: E731
    lines = [f"# {result['method']}: ShapesWorld preset tuning (world v{result['world_version']})",
             "", f"Rule, fixed before the sweep: {result['rule']}.", "",
             f"Measured on {result['sets']} only, seeds {result['seeds']} (evaluation seed"
             f" 1000 + seed), {result['n_per_prompt']} images per prompt, the world detector;"
             " 95% Wilson intervals over the pooled images. No reported number uses these"
             " prompts.", ""]  # fmt: skip
    for concept, block in result["concepts"].items():
        kept = "" if block["retain_kept"] else " (no candidate kept retain within 3 points)"
        lines += [f"## {concept}: chosen `{block['chosen']}`{kept}", "",
                  "| candidate | settings | concept rate (tuning) | retain accuracy (tuning) |"
                  " erase s |", "|---|---|---|---|---|"]  # fmt: skip
        for name, row in block["rows"].items():
            settings = json.dumps(result["grid"].get(name, {})) if name != "original" else "—"
            mark = " **chosen**" if name == block["chosen"] else ""
            if "broken" in row:
                lines.append(f"| {name} | `{settings}` | broken: {row['broken']} | — | — |")
                continue
            lines.append(f"| {name}{mark} | `{settings}` | {fmt(row['rate'])} |"
                         f" {fmt(row['retain'])} | {row['erase_s']:.1f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
