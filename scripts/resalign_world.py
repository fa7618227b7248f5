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
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recovery_world import _above, _pct, benign_folder, evidence_main

from erasekit.auditing import AuditSettings, attack_configs, run_attacks
from erasekit.cli import quiet_libraries
from erasekit.concepts import load_concept
from erasekit.detectors import DetectorOptions
from erasekit.detectors.world import WorldDetector
from erasekit.evaluation import build_judges, world_retain_accuracy
from erasekit.models import load_pipeline
from erasekit.sampling import SamplerSettings
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
    out = work / f"{concept}-{label.replace(' ', '').replace(',', '-')}-seed{seed}"
    if (out / "erasekit.json").is_file():
        return out, json.loads((out / "erasekit.json").read_text())["wall_time_s"]
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


def log_stats(folder: Path) -> dict | None:
    """What ResAlign's training log says about its hypergradient (None for other methods)."""
    log = folder / "training_log.jsonl"
    rows = [json.loads(ln) for ln in log.read_text().splitlines()] if log.is_file() else []
    if not rows or "hvps" not in rows[0]:
        return None
    n = len(rows)
    return {
        "steps": n,
        "mean_alpha": sum(r["alpha"] for r in rows) / n,
        "mean_resilience_over_g_theta": sum(
            r["resilience_norm"] / max(r["g_theta_norm"], 1e-12) for r in rows
        )
        / n,  # fmt: skip
        "retries_per_config": sum(r["retries"] for r in rows)
        / sum(len(r["configs"].split(",")) for r in rows),
        "fallbacks": sum(r["fallbacks"] for r in rows),
        "hvps": sum(r["hvps"] for r in rows),
        "L_h_first_last": [rows[0]["L_h"], rows[-1]["L_h"]],
        "R_last": rows[-1]["R"],
    }


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
        sets = [*extra, "steps=200", "eval_every=100", f"seed={seed}", f"images={benign}"]
        configs = attack_configs({"finetune": sets}, concept=concept)
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
    stats = {k: log_stats(v) for k, v in models.items()}
    out["resalign_logs"] = {k: v for k, v in stats.items() if v}
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
        "erasure AND the attack with that seed. 'erase s' = wall seconds of the `erasekit "
        "erase` process (one thread, beside a second evidence process; for a model reused "
        "from an earlier run, its manifest's wall_time_s).",
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
            starts = [(r["attacks"]["finetune-full"][base]["curve"][0],
                       r["attacks"]["finetune-full"][ra]["curve"][0]) for r in mine]  # fmt: skip
            less = sum(_above(a, b) for b, a in starts)
            if less:
                lines.append(
                    f"- {concept}: BEFORE any attack {ra} leaves more of the concept "
                    f"than {base} in {less} of {len(mine)} seeds "
                    f"({means[ra]['before']:.0f}% vs {means[base]['before']:.0f}%): it "
                    "erased less, so a smaller climb cannot count as resilience."
                )
            climb = {m: means[m]["full"] - means[m]["before"] for m in (base, ra)}
            lines.append(
                f"- {concept}: mean climb under full fine-tuning {base} "
                f"{climb[base]:+.0f} points, {ra} {climb[ra]:+.0f} points."
            )
        stats = [r.get("resalign_logs", {}) for r in mine]
        if any(stats):
            lines += ["", "ResAlign's hypergradient, from its training logs (means over seeds):",
                      "", "| model | mean α | ‖α·v_K‖ / ‖g_θ‖ | retries per configuration "
                      "| fallbacks | HVPs |", "|---|---|---|---|---|---|"]  # fmt: skip
            for label in [lb for lb in labels if lb.startswith("resalign")]:
                rows = [s[label] for s in stats if s.get(label)]
                if not rows:
                    continue
                mean = {k: sum(r[k] for r in rows) / len(rows) for k in
                        ("mean_alpha", "mean_resilience_over_g_theta", "retries_per_config",
                         "fallbacks", "hvps")}  # fmt: skip
                lines.append(f"| {label} | {mean['mean_alpha']:.3f} | "
                             f"{mean['mean_resilience_over_g_theta']:.3f} | "
                             f"{mean['retries_per_config']:.1f} | {mean['fallbacks']:.1f} | "
                             f"{mean['hvps']:.0f} |")  # fmt: skip
        lines.append("")
    lines += reading(runs)
    return "\n".join(lines)


def reading(runs: list[dict]) -> list[str]:
    """The mechanism behind the numbers, with the logged statistics filled in."""
    rows = [s for r in runs for s in r.get("resalign_logs", {}).values()]
    if not rows:
        return []
    alpha = sum(r["mean_alpha"] for r in rows) / len(rows)
    ratio = sum(r["mean_resilience_over_g_theta"] for r in rows) / len(rows)
    supported = []  # (concept, base) where ResAlign erased as far AND climbed 10+ points less
    for concept in sorted({r["concept"] for r in runs}):
        mine = [r for r in runs if r["concept"] == concept]
        for base, ra in PAIRS:

            def mean(label, i, mine=mine):
                return 100 * sum(r["attacks"]["finetune-full"][label]["curve"][i]["value"]
                                 for r in mine) / len(mine)  # fmt: skip

            climb_ra, climb_base = mean(ra, -1) - mean(ra, 0), mean(base, -1) - mean(base, 0)
            if mean(ra, 0) <= mean(base, 0) + 10 and climb_ra < climb_base - 10:
                supported.append(f"{concept}/{base}")
    verdict = (f"is supported for {', '.join(supported)}" if supported
               else "is NOT reproduced on ShapesWorld at these settings")  # fmt: skip
    return [
        "## Reading",
        "",
        "The paper's claim (the base method climbs back after benign fine-tuning, ResAlign much "
        f"less, having erased as far) {verdict} (criterion, computed: ResAlign's mean "
        "before-attack rate within 10 points of its base method's and its mean climb under full "
        "fine-tuning at least 10 points smaller). At the world defaults "
        "ResAlign erases less before any attack (see the 'BEFORE any attack' lines) and keeps "
        "more retain accuracy: the outer step applies only (1 − λ) = 0.2 of the harmful "
        "loss's gradient at θ, the retain distillation R weighs 1.6 → 2.0, and the λ part "
        "arrives through α·v_K, which the safeguards shrink: on the world model's full-weight "
        f"Hessians the fixed-point iteration only contracted at a mean α of {alpha:.3f}, so the "
        f"resilience term averaged {ratio:.2f} of ‖g_θ‖. Where the concept stays erased "
        "(circle, whose benign fine-tuning lowers even the original's rate), the climbs are "
        "not comparable either. Tried here: the world defaults (60 outer steps, λ 0.8, "
        "γ 1, K 5, k 2, α from 1/16), one setting per base method, 3 seeds; beyond that, on "
        "red and one seed, γ 0.1 and γ 0.1 with w_r 0.5: see resalign-world-ablations.md "
        "(`scripts/resalign_world.py ablate`). Not tried yet: more outer steps or a higher lr, "
        "LoRA as the trainable set, the SD-scale setting on a real model.",
        "",
    ]


def fill_log_stats(runs: list[dict], work: Path) -> None:
    """Runs made before the logs were summarised: read them from the work folder."""
    for r in runs:
        if "resalign_logs" not in r:
            folders = {lb: work / f"{r['concept']}-{lb}-seed{r['seed']}" for lb in ERASERS}
            stats = {k: log_stats(v) for k, v in folders.items()}
            r["resalign_logs"] = {k: v for k, v in stats.items() if v}


# What else was tried (one concept and seed; `python scripts/resalign_world.py ablate`): a
# smaller γ lets the fixed-point iteration contract at a larger α (a stronger resilience term);
# a lighter retain weight lets ResAlign erase as far as SalUn before the attack.
ABLATIONS = {
    "resalign-salun, γ 0.1": ("resalign", [*ERASERS["resalign-salun"][1], "gamma=0.1"]),
    "resalign-salun, γ 0.1, w_r 0.5": ("resalign", [*ERASERS["resalign-salun"][1], "gamma=0.1",
                                                   "retain_weight=0.5",
                                                   "retain_weight_late=0.5"]),
}  # fmt: skip


def ablate(concept_name: str = "red", seed: int = 0, work: Path = Path("/tmp/erasekit-resalign"),
           out: str = "docs/results/resalign-world-ablations") -> None:  # fmt: skip
    """Run ABLATIONS beside SalUn on one concept and seed: before / after full fine-tuning,
    retain accuracy, hypergradient statistics; write OUT.json and OUT.md."""
    quiet_libraries()
    concept = load_concept(concept_name)
    ERASERS.update(ABLATIONS)
    labels = ["salun", "resalign-salun", *ABLATIONS]
    models = {lb: erase(concept_name, lb, seed, work)[0] for lb in labels}
    roles = {"audited": models["salun"], **{lb: models[lb] for lb in labels[1:]}}
    sets = ["mode=full", "steps=200", "eval_every=200", f"seed={seed}",
            f"images={benign_folder(concept, work)}"]  # fmt: skip
    configs = attack_configs({"finetune": sets}, concept=concept)
    root = work / f"ablate-{concept_name}-seed{seed}"
    shutil.rmtree(root, ignore_errors=True)  # a re-run starts its attack and renders afresh
    for stale in work.glob(f"retain-ablate-*-{seed}"):
        shutil.rmtree(stale)
    root.mkdir(parents=True)
    judges = build_judges(concept, DetectorOptions())
    settings = SamplerSettings.for_model(world_path("full"))
    entries, _, _ = run_attacks(configs, roles, concept, concept.forget, judges, root, settings,
                                AuditSettings(n_per_prompt=2, seed=seed), "cpu",
                                progress=False)  # fmt: skip
    detector = WorldDetector()
    rows = {}
    for lb in labels:
        curve = entries["finetune"]["models"]["audited" if lb == "salun" else lb]["curve"]
        retain = world_retain_accuracy(load_pipeline(models[lb]), concept.retain,
                                       work / f"retain-ablate-{lb.replace(' ', '_')}-{seed}",
                                       detector, model_path=models[lb], n_per_prompt=4,
                                       seed=seed)  # fmt: skip
        rows[lb] = {"before": curve[0], "after": curve[-1], "retain": retain,
                    "log": log_stats(models[lb]),
                    "settings": ERASERS[lb][1]}  # fmt: skip
    Path(f"{out}.json").write_text(json.dumps({"concept": concept_name, "seed": seed,
                                               "rows": rows}, indent=1) + "\n")  # fmt: skip
    lines = [f"# ResAlign on ShapesWorld: what else was tried ({concept_name}, seed {seed})", "",
             "Generated by `scripts/resalign_world.py ablate`; same metric, attack (finetune "
             "full, 200 steps, lr 1e-4) and retain accuracy as resalign-world.md; one seed.", "",
             "| model | settings | before | after full fine-tuning | retain | mean α "
             "| ‖α·v_K‖/‖g_θ‖ |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for lb, r in rows.items():
        log = r["log"] or {}
        a = f"{log['mean_alpha']:.3f}" if log else "–"
        q = f"{log['mean_resilience_over_g_theta']:.3f}" if log else "–"
        lines.append(f"| {lb} | `{' '.join(r['settings'])}` | {_pct(r['before'])} | "
                     f"{_pct(r['after'])} | {_pct(r['retain'])} | {a} | {q} |")  # fmt: skip
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md and .json")


def main() -> None:
    if sys.argv[1:2] == ["ablate"]:
        ablate()
        return
    evidence_main(__doc__, run, markdown, "/tmp/erasekit-resalign", "docs/results/resalign-world",
                  on_merge=fill_log_stats)  # fmt: skip


if __name__ == "__main__":
    main()
