"""Erasure evidence on ShapesWorld: writes docs/results/erase-world.md (+ .json).

For the attribute `red`, the object `circle` and the style `outlined`, ESD-u, ESD-x, SalUn,
UCE and NegMerge run with their ShapesWorld presets (the method's world defaults; nothing is
set here; UCE also as its code edits, for comparison) through
`erasekit erase` in their own process (wall time, CPU time and peak memory are that process's),
once per seed (the seed changes the erasure's randomness and the evaluation seeds). The original,
the never-learned reference and every erased model are measured by the audit's own evaluation
(``erasekit.evaluate``, world detector):
concept rate on the forget prompts and on paraphrase prompts (synonyms, no concept word), and
retain accuracy (every attribute a retain prompt names is classified correctly), at least 64
images per set; rates pooled over seeds (hits / n, 95% Wilson interval) with the per-seed
values beside them. Each run's row is kept in --work, so an interrupted run resumes.

Target (the demo's): SalUn takes red from >= 0.90 to <= 0.05 on direct AND paraphrase prompts
with retain accuracy within 5 points of the original.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

import erasekit
from erasekit.cli import quiet_libraries
from erasekit.concepts import load_concept
from erasekit.detectors.world import WorldDetector
from erasekit.outputs import write_json
from erasekit.stats import wilson_interval
from erasekit.world import world_path

MIN_IMAGES = 64

# (label, method, settings): every method at its ShapesWorld preset.
RUNS = [
    ("ESD-u", "esd", ["variant=esd-u"]),
    ("ESD-x", "esd", ["variant=esd-x"]),
    ("SalUn", "salun", []),
    ("UCE", "uce", []),
    # UCE as its code edits (each text's last token, s_e 1): what the world preset departs from
    ("UCE last-token", "uce", ["tokens=last", "erase_scale=1"]),
    ("NegMerge", "negmerge", []),
]


def cpu_seconds_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def per_prompt(prompt_set) -> int:
    return max(1, math.ceil(MIN_IMAGES / len(prompt_set)))


def measure(model: Path, concept, seed: int) -> dict:
    """Concept rate on the forget (direct) and paraphrase prompts and retain accuracy, each
    measured by the audit's own evaluation (``erasekit.evaluate``), >= MIN_IMAGES images."""
    sets = {"forget": ("concept_rate", "direct", concept.forget),
            "paraphrase": ("concept_rate", "paraphrase", concept.evaluation["paraphrase"]),
            "retain_accuracy": ("retain_accuracy", "retain", concept.retain)}  # fmt: skip
    out = {}
    for key, (metric, name, ps) in sets.items():
        metrics = erasekit.evaluate(model, concept, sets=[name], n_per_prompt=per_prompt(ps),
                                    seed=seed)  # fmt: skip
        out[key] = metrics[f"{metric}/{name}"]
    return out


def cached(work: Path, key: str, fn) -> dict:
    """A row kept in ``work`` (resume: rows already measured are not run again)."""
    file = work / "rows" / f"{key}.json"
    if file.is_file():
        return json.loads(file.read_text())
    row = fn()
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, row)
    return row


def measure_reference(label: str, model: Path, concept, seed: int) -> dict:
    return {"concept": concept.name, "label": label, "seed": seed,
            "measured": measure(model, concept, seed)}  # fmt: skip


def run_one(label, method, sets, concept, seed, base, work) -> dict:
    """Erase with `erasekit erase` in its own process, then measure the erased model."""
    name = concept.name
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    out = work / f"{name}-{slug}-seed{seed}"
    cmd = [sys.executable, "-m", "erasekit", "erase", "--model", str(base), "--concept", name,
           "--method", method, "--out", str(out), "--cache-dir", str(work / "cache"),
           "--no-progress", "--overwrite", "--set", f"seed={seed}"]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    cpu0, t0 = cpu_seconds_children(), time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.time() - t0, cpu_seconds_children() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{label} on {name} failed: {proc.stderr.strip()[-500:]}")
    manifest = json.loads((out / "erasekit.json").read_text())
    after = measure(out, concept, seed)
    print(f"{name} {label} seed {seed}: forget {after['forget']['value']:.2f} paraphrase "
          f"{after['paraphrase']['value']:.2f} retain {after['retain_accuracy']['value']:.2f} "
          f"({wall:.0f}s)", flush=True)  # fmt: skip
    return {
        "concept": name, "label": label, "method": method, "seed": seed, "settings": sets,
        "config": manifest["method"]["config"], "measured": after,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(manifest["peak_memory"]["host_peak_rss_bytes"] / 2**20),
        "steps": manifest["training"]["steps"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concepts", default="red,circle,outlined")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(label for label, _, _ in RUNS))
    ap.add_argument("--doc", default="docs/results/erase-world.md")
    ap.add_argument("--work", required=True, help="models and per-run rows (resumable)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (erasure and measuring)")
    ap.add_argument("--render-only", action="store_true", help="re-write the .md from the .json")
    args = ap.parse_args()
    doc = Path(args.doc)
    if args.render_only:
        doc.write_text(markdown(json.loads(doc.with_suffix(".json").read_text())))
        return
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the erasure subprocesses
    quiet_libraries()
    detector = WorldDetector()  # its protocol goes into the definition
    base = world_path("full")
    work = Path(args.work)
    seeds = [int(x) for x in args.seeds.split(",")]
    wanted = args.methods.split(",")
    rows = []
    for name in args.concepts.split(","):
        concept = load_concept(name)
        references = {"original": base, "never-learned": world_path(f"no-{name}")}
        for seed in seeds:
            for label, model in references.items():
                rows.append(cached(work, f"{name}-{label}-seed{seed}",
                                   partial(measure_reference, label, model, concept,
                                           seed)))  # fmt: skip
            for label, method, sets in RUNS:
                if label in wanted:
                    rows.append(cached(work, f"{name}-{label}-seed{seed}",
                                       partial(run_one, label, method, sets, concept, seed, base,
                                               work)))  # fmt: skip
    build = json.loads((base.parent / "build.json").read_text())
    record = {
        "definition": {
            "world_version": build.get("world_version", 1),
            "detector": detector.protocol("colour", "red") | {"target": "the concept's"},
            "retain_accuracy": "share of retain images whose classified attributes equal every "
            "attribute (colour, shape, style) the prompt names",
            "images": f"ceil({MIN_IMAGES} / prompts) per prompt and set",
            "seed_rule": "erasure --set seed=S; evaluation derive_seed(S, prompt_index, k)",
            "seeds": seeds,
            "interval": "95% Wilson on hits/n pooled over seeds",
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, no GPU",
        },
        "rows": rows,
    }
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_json(doc.with_suffix(".json"), record)
    doc.write_text(markdown(record))


def pooled(rows: list[dict], key: str) -> dict:
    hits = sum(round(r["measured"][key]["value"] * r["measured"][key]["n_images"]) for r in rows)
    n = sum(r["measured"][key]["n_images"] for r in rows)
    lo, hi = wilson_interval(hits, n)
    return {"value": hits / n, "ci95": [lo, hi], "n": n,
            "per_seed": [r["measured"][key]["value"] for r in rows]}  # fmt: skip


def _fmt(p: dict) -> str:
    seeds = "/".join(f"{v:.2f}" for v in p["per_seed"])
    return f"{p['value']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] (n={p['n']}; {seeds})"


def markdown(rec: dict) -> str:
    d = rec["definition"]
    lines = [
        "# Erasure on ShapesWorld (generated by scripts/erase_world.py)",
        "",
        f"ShapesWorld v{d['world_version']}. Detector: {d['detector']['version']}, rule: "
        f"{d['detector']['rule']}. Images: {d['images']}; seeds {d['seeds']} ({d['seed_rule']}); "
        f"{d['interval']}, per-seed values after the semicolon. Retain accuracy: "
        f"{d['retain_accuracy']}. Every method runs at its ShapesWorld preset (config below). "
        f"Machine: {d['machine']}.",
        "",
        "Wall s: the `erasekit erase` process per seed, at times beside other evidence "
        "processes on the machine's 2 cores: upper bounds (controlled step timings: "
        "docs/results/bench-erase-*.json).",
        "",
        "| concept | model | forget rate | paraphrase rate | retain accuracy | steps | wall s "
        "(per seed) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rec["rows"]:
        groups.setdefault((r["concept"], r["label"]), []).append(r)
    for (concept, label), rows in groups.items():
        cost = "– | – | –"
        if "wall_s" in rows[0]:
            wall = "/".join(f"{r['wall_s']:.0f}" for r in rows)
            cost = f"{rows[0]['steps']} | {wall} | {max(r['peak_rss_mb'] for r in rows)}"
        lines.append(
            f"| {concept} | {label} | {_fmt(pooled(rows, 'forget'))} | "
            f"{_fmt(pooled(rows, 'paraphrase'))} | {_fmt(pooled(rows, 'retain_accuracy'))} | "
            f"{cost} |"
        )
    lines += ["", "## Demo target check (SalUn on red)", ""]
    red = {label: rows for (c, label), rows in groups.items() if c == "red"}
    if "SalUn" in red and "original" in red:
        o, a = red["original"], red["SalUn"]
        checks = [
            ("original forget rate >= 0.90", pooled(o, "forget")["value"] >= 0.90,
             pooled(o, "forget")["value"]),
            ("erased forget rate <= 0.05", pooled(a, "forget")["value"] <= 0.05,
             pooled(a, "forget")["value"]),
            ("erased paraphrase rate <= 0.05", pooled(a, "paraphrase")["value"] <= 0.05,
             pooled(a, "paraphrase")["value"]),
            ("retain accuracy within 5 points",
             pooled(a, "retain_accuracy")["value"] >= pooled(o, "retain_accuracy")["value"] - 0.05,
             pooled(a, "retain_accuracy")["value"] - pooled(o, "retain_accuracy")["value"]),
        ]  # fmt: skip
        lines += [f"- {name}: {'met' if ok else 'MISSED'} ({v:+.3f})" for name, ok, v in checks]
    else:
        lines.append("- not measured (no SalUn or original rows on red)")
    lines += ["", "Configuration of every erasure (the method's world preset):", ""]
    seen = set()
    for (_, label), rows in groups.items():
        if "config" in rows[0] and label not in seen:
            seen.add(label)
            cfg = {k: v for k, v in rows[0]["config"].items() if k != "seed"}
            lines.append(f"- {label}: `{json.dumps(cfg, sort_keys=True)}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
