"""Recovery evidence on ShapesWorld -> docs/results/recovery-world.md/.json.

For one attribute concept (red) and one object concept (circle): erase with ESD (esd-u, the
world preset of scripts/erase_world.py) and with SalUn (lr 1e-4), then run every recovery
attack (finetune, memora, concept-inversion) with the same data and budget on the ESD-erased
model, the SalUn-erased model, the original model and the never-learned model, for several
attack seeds. Each model's recovery curve is the concept rate (world detector, argmax) on the
concept's 16 forget prompts, 2 images each, measured by the audit's own code (`run_attacks`).

Budgets (world scale; documented in the output): finetune full U-Net, 200 steps, lr 1e-4
(the world model was trained at 1e-3), effective batch 4, AdamW, on the retain prompts rendered
by the ORIGINAL model (one set shared by every model); memora LoRA rank 4, lr 1e-3 cosine,
200 steps, 3 seed pairs x 11 points, inversion 0.3 of the steps; concept-inversion 300 steps,
batch 4, lr 5e-3 x 4 (scaled).

  python scripts/recovery_world.py [--seeds 0 1 2] [--concepts red circle] [--work DIR]
  python scripts/recovery_world.py --merge OUT1.json OUT2.json   # one report from several runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from erasekit.auditing import AuditSettings, attack_configs, run_attacks
from erasekit.cli import quiet_libraries
from erasekit.concepts import load_concept
from erasekit.detectors import DetectorOptions
from erasekit.evaluation import build_judges
from erasekit.models import load_pipeline
from erasekit.sampling import SamplerSettings, generate
from erasekit.world import world_path

ERASERS = {
    "esd": ("esd", ["variant=esd-u", "steps=200", "lr=5e-5", "negative_guidance=2.0"]),
    "salun": ("salun", ["lr=1e-4"]),
}
ATTACK_SETTINGS = {
    "finetune": ["mode=full", "steps=200", "lr=1e-4", "eval_every=50"],
    "memora": ["steps=200", "lr=1e-3", "eval_every=50"],
    "concept-inversion": ["steps=300", "batch_size=4", "gradient_accumulation_steps=1",
                          "eval_every=75"],
}  # fmt: skip
ROLE_NAMES = {"audited": "esd", "salun": "salun", "reference": "original",
              "never-learned": "never-learned"}  # fmt: skip


def erase(concept: str, label: str, work: Path) -> Path:
    out = work / f"{concept}-{label}"
    if (out / "erasekit.json").is_file():
        return out
    method, sets = ERASERS[label]
    cmd = [sys.executable, "-m", "erasekit", "erase", "--model", str(world_path("full")),
           "--concept", concept, "--method", method, "--out", str(out), "--cache-dir",
           str(work / "cache"), "--no-progress", "--overwrite"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"erasing {concept} with {label} failed: {proc.stderr[-500:]}")
    return out


def benign_folder(concept, work: Path) -> Path:
    """The concept's retain prompts rendered by the original model, as an imagefolder."""
    folder = work / f"benign-{concept.name}"
    if (folder / "metadata.jsonl").is_file():
        return folder
    full = world_path("full")
    records = generate(load_pipeline(full), concept.retain, folder, model_path=full,
                       n_per_prompt=4, overwrite=True, progress=False)  # fmt: skip
    with open(folder / "metadata.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"file_name": r["image"], "prompt": r["prompt"]}) + "\n")
    return folder


def run(concept_name: str, seed: int, work: Path) -> dict:
    concept = load_concept(concept_name)
    roles = {
        "audited": erase(concept_name, "esd", work),
        "salun": erase(concept_name, "salun", work),
        "reference": world_path("full"),
        "never-learned": world_path(f"no-{concept_name}"),
    }

    settings = {a: [*items, f"seed={seed}"] for a, items in ATTACK_SETTINGS.items()}
    settings["finetune"].append(f"images={benign_folder(concept, work)}")
    configs = attack_configs(settings)
    judges = build_judges(concept, DetectorOptions())
    root = work / f"run-{concept_name}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    audit = AuditSettings(n_per_prompt=2, seed=seed)
    curve_set = concept.forget
    started = time.time()
    entries, _, _ = run_attacks(configs, roles, concept, curve_set, judges, root,
                                SamplerSettings.for_model(world_path("full")), audit, "cpu",
                                progress=True)  # fmt: skip
    out = {"concept": concept_name, "seed": seed, "wall_s": round(time.time() - started, 1),
           "attacks": {}}  # fmt: skip
    for name, entry in entries.items():
        out["attacks"][name] = {
            ROLE_NAMES[role]: {"curve": m["curve"], "cost": m["cost"]}
            for role, m in entry["models"].items()
        }
        out.setdefault("configs", {})[name] = entry["config"]
    print(f"{concept_name} seed {seed}: {out['wall_s']} s", flush=True)
    return out


def _pct(p: dict) -> str:
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def markdown(runs: list[dict], judges_version: str) -> str:
    models = ["esd", "salun", "original", "never-learned"]
    lines = [
        "# Recovery attacks on ShapesWorld",
        "",
        "Generated by `scripts/recovery_world.py`; numbers from `recovery-world.json`.",
        "",
        f"Metric: concept rate = share of images the world detector ({judges_version}, argmax "
        "of the concept's dimension) assigns the concept, on the concept's 16 forget prompts x "
        "2 images (n = 32 per cell), sampler = the world model's DDIM 25 steps, guidance 4.0; "
        "95% Wilson intervals in brackets, in percent. 'before' = the model as given, 'after' "
        "= after the attack's full budget. Each seed re-runs the attack (data order, noise, "
        "evaluation seeds); the erased models are erased once (seed 0).",
        "",
        "Erasure: ESD = esd-u, 200 steps, lr 5e-5, negative guidance 2; SalUn = lr 1e-4, other "
        "settings default. Controls: the original (full) model and the never-learned model "
        "(trained without the concept), attacked with the same data and budget.",
        "",
    ]
    first = runs[0]
    for name, cfg in first["configs"].items():
        keep = {k: v for k, v in cfg.items() if k in ("mode", "steps", "lr", "rank", "batch_size",
                "gradient_accumulation_steps", "eval_every", "n_pairs", "n_interpolation",
                "inversion_fraction", "guidance", "token", "images")}  # fmt: skip
        lines.append(f"- `{name}`: {json.dumps(keep)}")
    lines.append("")
    for concept in sorted({r["concept"] for r in runs}):
        lines += [f"## {concept}", ""]
        lines += ["| attack | seed | " + " | ".join(f"{m} before → after" for m in models) + " |",
                  "|---|---|" + "---|" * len(models)]  # fmt: skip
        for r in [r for r in runs if r["concept"] == concept]:
            for name, per_model in r["attacks"].items():
                cells = []
                for m in models:
                    c = per_model.get(m)
                    cells.append(f"{_pct(c['curve'][0])} → {_pct(c['curve'][-1])}" if c else "—")
                lines.append(f"| {name} | {r['seed']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["Mean over seeds of the after-attack rate (percent) and residual memory "
                  "(erased − never-learned, after the attack):", "",
                  "| attack | esd | salun | never-learned | original | esd − never "
                  "| salun − never |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name in first["attacks"]:
            vals = {m: [r["attacks"][name][m]["curve"][-1]["value"]
                        for r in runs if r["concept"] == concept] for m in models}  # fmt: skip
            mean = {m: 100 * sum(v) / len(v) for m, v in vals.items()}
            lines.append(f"| {name} | {mean['esd']:.0f} | {mean['salun']:.0f} | "
                         f"{mean['never-learned']:.0f} | {mean['original']:.0f} | "
                         f"{mean['esd'] - mean['never-learned']:+.0f} | "
                         f"{mean['salun'] - mean['never-learned']:+.0f} |")  # fmt: skip
        lines.append("")
        lines += reading(runs, concept)
    return "\n".join(lines)


def _above(a: dict, b: dict) -> bool:
    """a's 95% interval lies entirely above b's."""
    return a["ci95"][0] > b["ci95"][1]


def reading(runs: list[dict], concept: str) -> list[str]:
    """Plain statements computed from the numbers: per attack and erasure method, does the
    erased model end above the never-learned control after the attack (residual memory that
    the attack brings back: short-term forgetting), or not (consistent with long-term
    forgetting at this budget)?"""
    mine = [r for r in runs if r["concept"] == concept]
    lines = ["What the numbers say (computed; 'above' = the 95% intervals do not overlap):", ""]
    for name in mine[0]["attacks"]:
        for method in ("esd", "salun"):
            after = [(r["attacks"][name][method]["curve"][-1],
                      r["attacks"][name]["never-learned"]["curve"][-1]) for r in mine]  # fmt: skip
            before = [r["attacks"][name][method]["curve"][0] for r in mine]
            above = sum(_above(a, n) for a, n in after)
            mean_a = 100 * sum(a["value"] for a, _ in after) / len(after)
            mean_n = 100 * sum(n["value"] for _, n in after) / len(after)
            mean_b = 100 * sum(b["value"] for b in before) / len(before)
            if above == len(after):
                verdict = (
                    "recovers MORE than the never-learned control in every seed: the "
                    "concept was hidden, not removed (short-term forgetting)"
                )
            elif above == 0:
                verdict = (
                    "recovers no more than the never-learned control in any seed: "
                    "consistent with long-term forgetting at this budget"
                )
            else:
                verdict = (
                    f"recovers more than the never-learned control in {above} of {len(after)} seeds"
                )
            lines.append(f"- {concept}, {name} on the {method.upper()}-erased model: "
                         f"{mean_b:.0f}% before → {mean_a:.0f}% after (never-learned after: "
                         f"{mean_n:.0f}%); {verdict}.")  # fmt: skip
        orig_b = [r["attacks"][name]["original"]["curve"][0]["value"] for r in mine]
        orig_a = [r["attacks"][name]["original"]["curve"][-1]["value"] for r in mine]
        mb, ma = 100 * sum(orig_b) / len(mine), 100 * sum(orig_a) / len(mine)
        if ma < mb - 20:
            lines.append(f"- Caution ({concept}, {name}): the same attack lowers the ORIGINAL "
                         f"model's rate from {mb:.0f}% to {ma:.0f}%: its data teaches the other "
                         "values of the concept's dimension, so a low after-attack rate here is "
                         "not evidence of forgetting.")  # fmt: skip
    lines.append("")
    return lines


def evidence_main(doc: str, run, markdown, work: str, out: str, on_merge=None) -> None:
    """The command line the world evidence scripts share: run every concept x seed (or merge
    earlier runs' JSON, then ``on_merge(runs, work)``), then write OUT.json and OUT.md."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--concepts", nargs="+", default=["red", "circle"])
    ap.add_argument("--work", default=work)
    ap.add_argument("--out", default=out)
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge earlier runs' JSON files")
    args = ap.parse_args()
    quiet_libraries()
    version = build_judges(load_concept(args.concepts[0]), DetectorOptions()).concept.version
    if args.merge:
        runs = [r for f in args.merge for r in json.loads(Path(f).read_text())["runs"]]
        if on_merge is not None:
            on_merge(runs, Path(args.work))
    else:
        folder = Path(args.work)
        folder.mkdir(parents=True, exist_ok=True)
        runs = [run(c, s, folder) for c in args.concepts for s in args.seeds]
    Path(f"{args.out}.json").write_text(json.dumps({"runs": runs, "detector": version},
                                                   indent=1) + "\n")  # fmt: skip
    Path(f"{args.out}.md").write_text(markdown(runs, version))
    print(f"wrote {args.out}.md and .json")


def main() -> None:
    evidence_main(__doc__, run, markdown, "/tmp/erasekit-recovery", "docs/results/recovery-world")


if __name__ == "__main__":
    main()
