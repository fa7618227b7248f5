"""ResAlign evidence on ShapesWorld -> docs/results/resalign-world.md/.json.

For an attribute concept (red) and an object concept (circle), per seed: erase with SalUn
(lr 1e-4), with ResAlign over SalUn's loss (base=salun, trainable=mask), with ESD (esd-u,
200 steps, lr 5e-5, eta 2) and with ResAlign over ESD's loss (base=esd, trainable=esd-u,
eta 2); every erasure uses the seed. Then the audit's benign `finetune` attack, full U-Net and
LoRA (the audit's world defaults: 200 steps, lr 1e-4, effective batch 4, AdamW), on the
concept's retain prompts rendered by the original model: a different prompt set from the
benign prompts ResAlign simulated fine-tuning on. Concept rate (world detector, argmax) on the
16 forget prompts x 2 images before and after each attack, retain accuracy on the retain
prompts x 4 images, Wilson 95% intervals.

The claim under test (ResAlign paper): after benign fine-tuning the base method's concept rate
climbs back, ResAlign's much less.

  python scripts/resalign_world.py [--seeds 0 1 2] [--concepts red circle] [--work DIR]
  python scripts/resalign_world.py --merge A.json B.json   # one report from several runs
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from recovery_world import _above, _pct, benign_folder, evidence_main

from erasekit.audit import AuditSettings, attack_configs, run_attacks
from erasekit.concepts import load_concept
from erasekit.detectors import DetectorOptions
from erasekit.detectors.world import WorldDetector
from erasekit.evaluation import build_judges, world_retain_accuracy
from erasekit.generate import SamplerSettings
from erasekit.models import load_pipeline
from erasekit.world import world_path

ERASERS = {
    "salun": ("salun", ["lr=1e-4"]),
    "resalign-salun": ("resalign", ["base=salun", "trainable=mask", "weight_decay=0"]),
    "esd": ("esd", ["variant=esd-u", "steps=200", "lr=5e-5", "negative_guidance=2.0"]),
    "resalign-esd": ("resalign", ["base=esd", "trainable=esd-u", "weight_decay=0",
                                  "negative_guidance=2.0"]),
}  # fmt: skip
PAIRS = (("salun", "resalign-salun"), ("esd", "resalign-esd"))
ATTACKS = {"finetune-full": ["mode=full"], "finetune-lora": ["mode=lora"]}


def erase(concept: str, label: str, seed: int, work: Path) -> tuple[Path, float]:
    out = work / f"{concept}-{label}-seed{seed}"
    if (out / "erasekit.json").is_file():
        return out, json.loads((out / "erasekit.json").read_text()).get("wall_seconds", 0.0)
    method, sets = ERASERS[label]
    cmd = [sys.executable, "-m", "erasekit", "erase", "--model", str(world_path("full")),
           "--concept", concept, "--method", method, "--out", str(out), "--cache-dir",
           str(work / "cache"), "--no-progress", "--overwrite",
           "--set", f"seed={seed}"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"erasing {concept} with {label} failed: {proc.stderr[-800:]}")
    return out, round(time.time() - started, 1)


def run(concept_name: str, seed: int, work: Path) -> dict:
    concept = load_concept(concept_name)
    models, seconds = {}, {}
    for label in ERASERS:
        models[label], seconds[label] = erase(concept_name, label, seed, work)
        print(f"{concept_name} seed {seed}: {label} erased ({seconds[label]} s)", flush=True)
    roles = {"audited": models["salun"], **{k: v for k, v in models.items() if k != "salun"}}
    judges = build_judges(concept, DetectorOptions())
    settings = SamplerSettings.for_model(world_path("full"))
    audit = AuditSettings(n_per_prompt=2, seed=seed)
    out = {"concept": concept_name, "seed": seed, "erase_seconds": seconds, "attacks": {},
           "retain_accuracy": {}}  # fmt: skip
    benign = benign_folder(concept, work)
    for name, extra in ATTACKS.items():
        sets = [f"finetune.{s}" for s in [*extra, "steps=200", "eval_every=100", f"seed={seed}",
                                          f"images={benign}"]]  # fmt: skip
        configs = attack_configs(["finetune"], sets=sets, concept=concept)
        root = work / f"run-{concept_name}-seed{seed}-{name}"
        root.mkdir(parents=True, exist_ok=True)
        entries, _, _ = run_attacks(configs, roles, concept, concept.forget, judges, root,
                                    settings, audit, "cpu", progress=False)  # fmt: skip
        entry = entries["finetune"]
        role_label = {"audited": "salun"}
        out["attacks"][name] = {
            role_label.get(role, role): {"curve": m["curve"], "cost": m["cost"]}
            for role, m in entry["models"].items()
        }
        out.setdefault("configs", {})[name] = entry["config"]
    detector = WorldDetector()
    for label, path in models.items():
        pipe = load_pipeline(path)
        out["retain_accuracy"][label] = world_retain_accuracy(
            pipe, concept.retain, work / f"retain-{concept_name}-{label}-{seed}", detector,
            model_path=path, n_per_prompt=4, seed=seed,
        )  # fmt: skip
    print(f"{concept_name} seed {seed}: done", flush=True)
    return out


def markdown(runs: list[dict], version: str) -> str:
    labels = list(ERASERS)
    first = runs[0]
    lines = [
        "# ResAlign on ShapesWorld",
        "",
        "Generated by `scripts/resalign_world.py`; numbers from `resalign-world.json`.",
        "",
        f"Concept rate = share of images the world detector ({version}, argmax of the concept's "
        "dimension) assigns the concept, on the concept's 16 forget prompts x 2 images "
        "(n = 32 per cell); DDIM 25 steps, guidance 4.0. Retain accuracy = share of images "
        "whose classified attributes equal every attribute the retain prompt names (12 prompts "
        "x 4 images, n = 48). 95% Wilson intervals in brackets, percent. Each seed re-runs the "
        "erasure AND the attack with that seed.",
        "",
        "Erasure settings (beyond each method's world defaults):",
        "",
    ]
    for label, (method, sets) in ERASERS.items():
        lines.append(f"- {label}: `erasekit erase --method {method} "
                     + " ".join(f"--set {s}" for s in sets) + "`")  # fmt: skip
    lines += [
        "",
        "ResAlign world defaults: 60 outer steps, lr 1e-4 (weights), AdamW, λ 0.8, "
        "w_r 1.6 → 2.0, k = 2 configurations per step from "
        "`erasekit/methods/presets/resalign-meta-world.yaml`, K = 5, γ = 1, α from 1/16, "
        "simulated data: the concept's benign prompts (not its retain prompts).",
        "",
    ]
    for name, cfg in first["configs"].items():
        shown = ("mode", "steps", "lr", "rank", "batch_size", "gradient_accumulation_steps",
                 "optimizer")  # fmt: skip
        keep = {k: cfg[k] for k in shown if k in cfg}
        lines.append(f"- attack `{name}`: {json.dumps(keep)}, data: the retain prompts "
                     "rendered by the original model (4 images each)")  # fmt: skip
    lines.append("")
    for concept in sorted({r["concept"] for r in runs}):
        mine = [r for r in runs if r["concept"] == concept]
        lines += [f"## {concept}", "",
                  "| seed | model | before attack | after finetune-full | after finetune-lora "
                  "| retain accuracy | erase s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mine:
            for label in labels:
                full = r["attacks"]["finetune-full"][label]["curve"]
                lora = r["attacks"]["finetune-lora"][label]["curve"]
                lines.append(f"| {r['seed']} | {label} | {_pct(full[0])} | {_pct(full[-1])} | "
                             f"{_pct(lora[-1])} | {_pct(r['retain_accuracy'][label])} | "
                             f"{r['erase_seconds'][label]} |")  # fmt: skip
        lines += ["", "Means over seeds (percent):", "",
                  "| model | before | after full | climb full | after LoRA | climb LoRA "
                  "| retain |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        means = {}
        for label in labels:
            b = [r["attacks"]["finetune-full"][label]["curve"][0]["value"] for r in mine]
            af = [r["attacks"]["finetune-full"][label]["curve"][-1]["value"] for r in mine]
            al = [r["attacks"]["finetune-lora"][label]["curve"][-1]["value"] for r in mine]
            ra = [r["retain_accuracy"][label]["value"] for r in mine]
            m = {k: 100 * sum(v) / len(v) for k, v in
                 {"before": b, "full": af, "lora": al, "retain": ra}.items()}  # fmt: skip
            means[label] = m
            lines.append(f"| {label} | {m['before']:.0f} | {m['full']:.0f} | "
                         f"{m['full'] - m['before']:+.0f} | {m['lora']:.0f} | "
                         f"{m['lora'] - m['before']:+.0f} | {m['retain']:.0f} |")  # fmt: skip
        lines += ["", "What the numbers say (computed; 'lower' = 95% intervals do not overlap):",
                  ""]  # fmt: skip
        for base, ra in PAIRS:
            for attack in ("finetune-full", "finetune-lora"):
                ends = [(r["attacks"][attack][base]["curve"][-1],
                         r["attacks"][attack][ra]["curve"][-1]) for r in mine]  # fmt: skip
                lower = sum(_above(b, a) for b, a in ends)
                higher = sum(_above(a, b) for b, a in ends)
                key = "full" if attack.endswith("full") else "lora"
                mb, mr = means[base], means[ra]
                lines.append(
                    f"- {concept}, {attack}: {base} {mb['before']:.0f}% → {mb[key]:.0f}%, "
                    f"{ra} {mr['before']:.0f}% → {mr[key]:.0f}%; {ra} ends lower in {lower} "
                    f"and higher in {higher} of {len(mine)} seeds."
                )
            lines.append(f"- {concept}: retain accuracy {base} {means[base]['retain']:.0f}%, "
                         f"{ra} {means[ra]['retain']:.0f}%.")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    evidence_main(__doc__, run, markdown, "/tmp/erasekit-resalign", "docs/results/resalign-world")


if __name__ == "__main__":
    main()
