"""Erasure evidence on ShapesWorld: writes docs/results/erase-world.md (+ .json).

For the object concept `circle` and the attribute concept `red`, each method is run with
`erasekit erase` in its own process (wall time, CPU time and peak memory are that process's),
then the original and every erased model are measured with the world classifier: concept rate
on the forget prompts and on paraphrase prompts (synonyms, no concept word), and retain accuracy
(every attribute a retain prompt names is classified correctly). n images and 95% Wilson
intervals on every rate.

`--append-esd-defaults` runs ESD-u with the original paper's defaults (1000 iterations) and
merges those rows into the existing record; `--render-only` re-writes the Markdown.

Issue target: SalUn with default settings takes the forget-prompt rate from >= 85% to <= 10%
with retain accuracy within 10 points of the original, in <= 5 CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from erasekit.cli import quiet_libraries
from erasekit.concepts import load_concept
from erasekit.detectors.world import WorldDetector
from erasekit.evaluation import concept_rate, world_retain_accuracy
from erasekit.models import load_pipeline
from erasekit.outputs import write_json
from erasekit.world import world_path

# (label, method, settings). ESD runs use the newer ESD code's preset (200 iterations, lr 5e-5,
# eta 2): the original 1000 iterations take ~13 CPU minutes per run here (each step partially
# samples 0-50 DDIM steps with the frozen teacher). "world lr" changes only the learning rate,
# since ShapesWorld was trained at lr 1e-3 where SD was trained at 1e-4.
ESD_PRESET = ["steps=200", "lr=5e-5", "negative_guidance=2.0"]
RUNS = [
    ("ESD-x (200 it, lr 5e-5, eta 2)", "esd", ["variant=esd-x", *ESD_PRESET]),
    ("ESD-u (200 it, lr 5e-5, eta 2)", "esd", ["variant=esd-u", *ESD_PRESET]),
    ("SalUn (defaults)", "salun", []),
    ("SalUn, world lr 1e-4", "salun", ["lr=1e-4"]),
]
# ESD with the original paper's defaults (1000 iterations, lr 1e-5, eta 1): ~13 CPU minutes per
# run here, so run separately (--append-esd-defaults) and merged into the record.
ESD_DEFAULTS = [("ESD-u (defaults: 1000 it, lr 1e-5, eta 1)", "esd", ["variant=esd-u"])]
# What else was tried to meet the SalUn target on `red` (each changes the listed settings).
# "retain renders" trains the retain term on exact renders of the retain prompts (an
# imagefolder) instead of the original model's samples; "forget term off" replaces the concept
# word by itself, so the surrogate target equals the prediction and only the retain term acts:
# a control for how much fine-tuning alone costs the world model.
ABLATIONS = [
    ("SalUn, lr 1e-4, alpha 2", "salun", ["lr=1e-4", "alpha=2"]),
    ("SalUn, lr 1e-4, mask 0.1", "salun", ["lr=1e-4", "alpha=1", "mask_fraction=0.1"]),
    ("SalUn, lr 3e-5, 10 epochs", "salun", ["lr=3e-5", "epochs=10"]),
    ("SalUn, lr 1e-4, anchor prompts", "salun", ["lr=1e-4", "surrogate_mode=replace"]),
    ("SalUn, lr 1e-4, retain renders", "salun", ["lr=1e-4", "@retain-renders"]),
    ("control: forget term off, lr 1e-4", "salun",
     ["lr=1e-4", "surrogate_mode=replace", "surrogate_replacement=red"]),
]  # fmt: skip


def write_retain_renders(concept, folder: Path, per_prompt: int = 8) -> Path:
    """Exact renders of the concept's retain prompts, as an imagefolder."""
    import random

    from erasekit.world.render import prompt_labels, render, sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i, prompt in enumerate(concept.retain.prompts * per_prompt):
        labels = prompt_labels(prompt)
        scene = sample_scene(rng, shapes=(labels["shape"],), colours=(labels["colour"],))
        render(scene).save(folder / f"{i:04d}.png")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "prompt": prompt}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(rows))
    return folder


def cpu_seconds_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(model: Path, concept, detector, tmp: Path, n: int, seed: int) -> dict:
    pipe = load_pipeline(model)
    dim, target = concept.detector["dimension"], concept.detector["target"]
    kw = {"model_path": model, "n_per_prompt": n, "seed": seed}
    return {
        "forget": concept_rate(pipe, concept.forget, tmp / "f", detector, dim, target, **kw),
        "paraphrase": concept_rate(pipe, concept.evaluation["paraphrase"], tmp / "p", detector,
                                   dim, target, **kw),
        "retain_accuracy": world_retain_accuracy(pipe, concept.retain, tmp / "r", detector, **kw),
    }  # fmt: skip


def run_one(label, method, sets, concept, base, work, detector, args) -> dict:
    """Erase with `erasekit erase` in its own process, then measure the erased model."""
    name = concept.name
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    out = work / f"{name}-{slug}"
    cmd = [sys.executable, "-m", "erasekit", "erase", "--model", str(base), "--concept", name,
           "--method", method, "--out", str(out), "--cache-dir", str(work / "cache"),
           "--no-progress", "--overwrite"]  # fmt: skip
    for s in sets:
        if s == "@retain-renders":
            cmd += ["--retain-images", str(write_retain_renders(concept, work / f"renders-{name}"))]
        else:
            cmd += ["--set", s]
    cpu0, t0 = cpu_seconds_children(), time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.time() - t0, cpu_seconds_children() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{label} on {name} failed: {proc.stderr.strip()[-500:]}")
    manifest = json.loads((out / "erasekit.json").read_text())
    after = measure(out, concept, detector, work / f"eval-{out.name}", args.n_per_prompt,
                    args.seed)  # fmt: skip
    print(f"{name} {label}: forget {after['forget']['value']:.2f} "
          f"retain {after['retain_accuracy']['value']:.2f} ({wall:.0f}s)", flush=True)  # fmt: skip
    return {
        "concept": name, "label": label, "method": method, "settings": sets,
        "config": manifest["method"]["config"], "after": after,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(manifest["peak_memory"]["host_peak_rss_bytes"] / 2**20),
        "steps": manifest["training"]["steps"],
    }  # fmt: skip


def append_esd_defaults(doc: Path, base: Path, detector, args) -> None:
    """Add ESD_DEFAULTS rows to an existing record, after each concept's other ESD rows."""
    record = json.loads(doc.with_suffix(".json").read_text())
    rows = record["rows"]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        for name in args.concepts.split(","):
            concept = load_concept(name)
            for label, method, sets in ESD_DEFAULTS:
                row = run_one(label, method, sets, concept, base, work, detector, args)
                rows = [r for r in rows if (r["concept"], r["label"]) != (name, label)]
                at = max(i for i, r in enumerate(rows) if r["concept"] == name
                         and r["label"].startswith(("ESD", "original")))  # fmt: skip
                rows.insert(at + 1, row)
    record["rows"] = rows
    write_json(doc.with_suffix(".json"), record)
    doc.write_text(markdown(record))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concepts", default="circle,red")
    ap.add_argument("--n-per-prompt", type=int, default=8)
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    ap.add_argument("--seed", type=int, default=1, help="evaluation seed (erasure seed is 0)")
    ap.add_argument("--doc", default="docs/results/erase-world.md")
    ap.add_argument("--work", default=None, help="keep models here (default: a temp folder)")
    ap.add_argument("--render-only", action="store_true", help="re-write the .md from the .json")
    ap.add_argument(
        "--append-esd-defaults",
        action="store_true",
        help="run ESD-u with its original defaults and add the rows to the .json",
    )
    args = ap.parse_args()
    doc = Path(args.doc)
    if args.render_only:
        doc.write_text(markdown(json.loads(doc.with_suffix(".json").read_text())))
        return
    torch.set_num_threads(2)
    quiet_libraries()
    detector = WorldDetector()
    base = world_path("full")
    if args.append_esd_defaults:
        append_esd_defaults(doc, base, detector, args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        for name in args.concepts.split(","):
            concept = load_concept(name)
            before = measure(base, concept, detector, work / f"eval-{name}-base",
                             args.n_per_prompt, args.seed)  # fmt: skip
            rows.append({"concept": name, "label": "original", "before": before})
            runs = RUNS + (ABLATIONS if name == "red" and args.ablations else [])
            for label, method, sets in runs:
                rows.append(run_one(label, method, sets, concept, base, work, detector, args))
    record = {
        "definition": {
            "detector": detector.protocol("colour", "red") | {"target": "the concept's"},
            "retain_accuracy": "share of retain images whose classified attributes equal every "
            "attribute (colour, shape, style) the prompt names",
            "n_per_prompt": args.n_per_prompt,
            "evaluation_seed": args.seed,
            "seed_rule": "derive_seed(seed, prompt_index, k)",
            "interval": "95% Wilson",
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, no GPU",
        },
        "rows": rows,
    }
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_json(doc.with_suffix(".json"), record)
    doc.write_text(markdown(record))


def _fmt(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['value']:.2f} [{lo:.2f}, {hi:.2f}]"


def markdown(rec: dict) -> str:
    d = rec["definition"]
    lines = [
        "# Erasure on ShapesWorld (generated by scripts/erase_world.py)",
        "",
        f"Detector: {d['detector']['version']}, rule: {d['detector']['rule']}. "
        f"Rates over n images ({d['n_per_prompt']} per prompt, evaluation seed "
        f"{d['evaluation_seed']}), {d['interval']} intervals. Retain accuracy: "
        f"{d['retain_accuracy']}. Machine: {d['machine']}.",
        "",
        "| concept | model | forget rate | paraphrase rate | retain accuracy | steps | wall s "
        "| CPU s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        m = r.get("after") or r["before"]
        cost = (
            f"{r['steps']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mb']}"
            if "after" in r
            else "– | – | – | –"
        )
        lines.append(
            f"| {r['concept']} | {r['label']} | {_fmt(m['forget'])} (n={m['forget']['n_images']})"
            f" | {_fmt(m['paraphrase'])} (n={m['paraphrase']['n_images']}) | "
            f"{_fmt(m['retain_accuracy'])} (n={m['retain_accuracy']['n_images']}) | {cost} |"
        )
    lines += [
        "",
        "Rows on `red` after `SalUn, world lr 1e-4` are what else was tried (ABLATIONS in the "
        "script): a larger retain weight, a sparser mask, a gentler lr for longer, anchor prompts "
        "(each forget prompt with the concept word removed, instead of the fixed surrogate), "
        "exact renders as retain data, and a control with the forget term switched off (the "
        "surrogate is the prompt itself), which measures what the fine-tuning alone costs the "
        "world model's retain accuracy.",
    ]
    lines += ["", "## SalUn target check (defaults)", ""]
    base = {r["concept"]: r["before"] for r in rec["rows"] if "before" in r}
    for r in rec["rows"]:
        if r.get("label") != "SalUn (defaults)":
            continue
        b, a = base[r["concept"]], r["after"]
        checks = [
            ("original forget rate >= 0.85", b["forget"]["value"] >= 0.85,
             f"{b['forget']['value']:.2f}"),
            ("erased forget rate <= 0.10", a["forget"]["value"] <= 0.10,
             f"{a['forget']['value']:.2f}"),
            ("retain accuracy within 10 points",
             a["retain_accuracy"]["value"] >= b["retain_accuracy"]["value"] - 0.10,
             f"{b['retain_accuracy']['value']:.2f} -> {a['retain_accuracy']['value']:.2f}"),
            ("<= 300 CPU seconds", r["cpu_s"] <= 300, f"{r['cpu_s']} s"),
        ]  # fmt: skip
        verdict = ", ".join(f"{name}: {'met' if ok else 'MISSED'} ({v})" for name, ok, v in checks)
        lines.append(f"- {r['concept']}: {verdict}")
    lines += ["", "Settings of every run (beyond the method defaults):", ""]
    for r in rec["rows"]:
        if "after" in r:
            lines.append(f"- {r['concept']} / {r['label']}: `{' '.join(r['settings']) or '-'}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
