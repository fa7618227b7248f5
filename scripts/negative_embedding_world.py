"""Negative-embedding evidence on ShapesWorld -> docs/results/negative-embedding-world.md/.json.

Per seed s and erased model (ESD: esd-u 200 steps lr 5e-5 eta 2; SalUn: lr 1e-4; both erased
with seed s by scripts/resalign_world.py's erasers, reused when present): learn c* against the
erased model with `erasekit erase --method negative-embedding` (reference settings: 3000 steps,
Adam lr 5e-3, batch 1; 8 images per forget prompt rendered by the original model; seed s), then
evaluate five defences of the same weights, each a model folder with its guidance.json,
rendered through the one generate path:

  none | hand-written negative (the concept's words) | SLD (medium) on the concept's words |
  c* as the negative prompt | SLD (medium) with c* as the safety concept

Per defended folder: concept rate on the forget and paraphrase prompts (2 images per prompt)
and retain accuracy on the retain prompts (the audit's evaluate_model), then the
concept-inversion attack (world budget: 300 steps) and UnlearnDiffAtk (25 blocks x 20 steps)
through the audit's run_attacks. Transfer: the c* learned on the other erased model of the same
seed, as the negative prompt. Evaluation seeds and the attacks' randomness follow s.

  python scripts/negative_embedding_world.py --seeds 0 --models esd [--work DIR] [--out F.json]
  python scripts/negative_embedding_world.py --merge A.json B.json   # one report
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from erasekit.auditing import (
    AuditSettings,
    attack_configs,
    audit_prompt_sets,
    evaluate_model,
    run_attacks,
)
from erasekit.concepts import load_concept
from erasekit.detectors import DetectorOptions
from erasekit.evaluation import build_judges
from erasekit.guidance import GUIDANCE_FILE
from erasekit.methods.negative_embedding import EMBEDDING_FILE
from erasekit.models import load_pipeline
from erasekit.outputs import write_json
from erasekit.sampling import SamplerSettings
from erasekit.stats import wilson_interval
from erasekit.world import world_path

CONCEPT = "red"
MODELS = ("esd", "salun")
ATTACKS = ("concept-inversion", "unlearndiffatk")
DEFENCES = {
    "none": "no guidance",
    "hand-negative": "the concept's words as the negative prompt",
    "hand-sld": "SLD (medium) on the concept's words",
    "embedding-negative": "c* as the negative prompt",
    "embedding-sld": "SLD (medium) with c* as the safety concept",
    "transfer-negative": "c* learned on the OTHER erased model of the seed, as the negative prompt",
}
TOKEN = "<negative-concept>"
SMOKE: dict = {"learn": [], "attacks": {}}  # --smoke: tiny budgets, to check the script end to end


def learn_embedding(model: Path, seed: int, work: Path) -> Path:
    """The defended folder erase --method negative-embedding writes (reused when present)."""
    out = work / f"{model.name}-negative-embedding"
    if (out / EMBEDDING_FILE).is_file():
        return out
    cmd = [sys.executable, "-m", "erasekit", "erase", "--model", str(model), "--concept",
           CONCEPT, "--method", "negative-embedding", "--out", str(out), "--cache-dir",
           str(work / "cache"), "--no-progress", "--overwrite", "--set", f"seed={seed}",
           "--set", f"original={world_path('full')}", *SMOKE["learn"]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"negative-embedding on {model} failed: {proc.stderr[-800:]}")
    return out


def wait_for(path: Path, timeout: float = 7200) -> Path:
    """Another process learns this embedding: wait for it."""
    started = time.time()
    while not path.is_file():
        if time.time() - started > timeout:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(20)
    return path


def defended_folder(model: Path, defence: str, guidance: dict | None, embedding: Path | None,
                    work: Path) -> Path:  # fmt: skip
    """The erased weights (linked, not copied) + this defence's guidance.json (+ c*)."""
    folder = work / "defended" / f"{model.name}-{defence}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for item in model.iterdir():
        if item.name not in (GUIDANCE_FILE, EMBEDDING_FILE, "README.md"):
            (folder / item.name).symlink_to(item.resolve())
    if guidance is not None:
        (folder / GUIDANCE_FILE).write_text(json.dumps(guidance))
    if embedding is not None:
        shutil.copyfile(embedding, folder / EMBEDDING_FILE)
    return folder


def guidances(words: str) -> dict[str, dict | None]:
    emb = {"concept": TOKEN, "embedding": EMBEDDING_FILE}
    return {
        "none": None,
        "hand-negative": {"mode": "negative-prompt", "concept": words},
        "hand-sld": {"mode": "sld", "concept": words, "sld": "medium"},
        "embedding-negative": {"mode": "negative-prompt", **emb},
        "embedding-sld": {"mode": "sld", **emb, "sld": "medium"},
        "transfer-negative": {"mode": "negative-prompt", **emb},
    }


def _count(metric: dict) -> dict:
    return {"hits": round(metric["value"] * metric["n_images"]), "n": metric["n_images"]}


def run(seed: int, label: str, work: Path) -> dict:
    from resalign_world import erase  # scripts/ sits on sys.path when run as a script

    concept = load_concept(CONCEPT)
    other = next(m for m in MODELS if m != label)
    model = erase(CONCEPT, label, seed, work)[0]
    started = time.time()
    own = learn_embedding(model, seed, work)
    learn_s = json.loads((own / "erasekit.json").read_text())["wall_time_s"]
    other_model = work / f"{CONCEPT}-{other}-seed{seed}"
    transfer = wait_for(work / f"{other_model.name}-negative-embedding" / EMBEDDING_FILE)
    folders = {}
    for defence, guidance in guidances(concept.name).items():
        source = transfer if defence == "transfer-negative" else own / EMBEDDING_FILE
        folders[defence] = defended_folder(model, defence, guidance,
                                           source if guidance and "embedding" in guidance
                                           else None, work)  # fmt: skip
    judges = build_judges(concept, DetectorOptions())
    settings = SamplerSettings.for_model(world_path("full"))
    sets = audit_prompt_sets(concept)  # direct (= the forget prompts), paraphrase, retain
    root = work / f"run-{model.name}"
    shutil.rmtree(root, ignore_errors=True)  # a fresh run
    root.mkdir(parents=True)
    rates = AuditSettings(n_per_prompt=2, seed=seed, batch_size=16)
    out = {"seed": seed, "model": label, "model_folder": str(model), "learn_seconds": learn_s,
           "defences": {}}  # fmt: skip
    for defence, folder in folders.items():
        pipe = load_pipeline(folder)
        _, metrics, _ = evaluate_model(pipe, folder, defence, sets, judges, root, settings, rates)
        out["defences"][defence] = {
            "forget": _count(metrics["concept_rate/direct"]),
            "paraphrase": _count(metrics["concept_rate/paraphrase"]),
            "retain_accuracy": _count(metrics["retain_accuracy/retain"]),
        }
        print(f"seed {seed} {label} {defence}: {out['defences'][defence]}", flush=True)
    overrides = {a: [f"seed={seed}", *SMOKE["attacks"].get(a, [])] for a in ATTACKS}
    configs = attack_configs(overrides, concept=concept)
    roles = {"reference": world_path("full"), **folders}
    entries, _, _ = run_attacks(configs, roles, concept, concept.forget, judges, root, settings,
                                AuditSettings(n_per_prompt=1, seed=seed, batch_size=16), "cpu",
                                progress=True, targets=list(folders))  # fmt: skip
    for defence in folders:
        ci = entries["concept-inversion"]["models"][defence]
        last = ci["curve"][-1]
        uda = entries["unlearndiffatk"]["models"][defence]["outcomes"]
        out["defences"][defence].update({
            "concept_inversion": {"hits": round(last["value"] * last["n_images"]),
                                  "n": last["n_images"], "curve": ci["curve"],
                                  "seconds": ci["cost"]["seconds"]},
            "unlearndiffatk": {"pre": sum(o["pre_success"] for o in uda),
                               "hits": sum(o["success"] for o in uda), "n": len(uda),
                               "gradient_steps": sum(o["gradient_steps"] for o in uda)},
        })  # fmt: skip
    out["configs"] = {a: entries[a]["config"] for a in ATTACKS}
    out["wall_s"] = round(time.time() - started, 1)
    print(f"seed {seed} {label}: {out['wall_s']} s", flush=True)
    return out


# ------------------------------------------------------------------------------ report


def _rate(hits: int, n: int) -> str:
    lo, hi = wilson_interval(hits, n)
    return f"{100 * hits / n:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _pooled(runs: list[dict], label: str, defence: str, field: str) -> tuple[int, int]:
    cells = [r["defences"][defence][field] for r in runs if r["model"] == label]
    return sum(c["hits"] for c in cells), sum(c["n"] for c in cells)


FIELDS = (
    ("forget", "forget prompts"),
    ("paraphrase", "paraphrase prompts"),
    ("concept_inversion", "concept-inversion (after attack)"),
    ("unlearndiffatk", "UnlearnDiffAtk ASR"),
    ("retain_accuracy", "retain accuracy"),
)


def markdown(runs: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    cfg = runs[0]["configs"]
    lines = [
        "# Concept-inversion negative embeddings on ShapesWorld",
        "",
        "Generated by `scripts/negative_embedding_world.py`; numbers from "
        "`negative-embedding-world.json`.",
        "",
        f"Concept: `{CONCEPT}` (world detector, argmax of the colour dimension). Erased models: "
        "ESD (esd-u, 200 steps, lr 5e-5, η 2) and SalUn (lr 1e-4), one per seed. c*: `erasekit "
        "erase --method negative-embedding` against each erased model (3000 steps, Adam lr "
        "5e-3, batch 1, one token initialised from 'red', images: 8 per forget prompt by the "
        "original model). SLD: the medium preset (warm-up 10, s_S 1000, λ 0.01, s_m 0.3, "
        "β_m 0.4). Sampler: the world model's DDIM, 25 steps, guidance 4.0.",
        "",
        f"Seeds: {', '.join(map(str, seeds))} (each re-runs erasure, c*, evaluation seeds and "
        "the attacks). Cells pool the seeds: percent [Wilson 95%], n = images (rates: 16 forget "
        "/ 16 paraphrase prompts x 2 images per seed; concept inversion: 16 forget prompts x 1 "
        "image after the attack; UnlearnDiffAtk: 16 prompts per seed; retain accuracy: share of "
        "retain images whose colour AND shape the world classifier reads as prompted).",
        "",
        f"- concept-inversion: {json.dumps(cfg['concept-inversion'])}",
        f"- unlearndiffatk: {json.dumps(cfg['unlearndiffatk'])}",
        "",
    ]
    for label in MODELS:
        lines += [f"## {label.upper()}-erased `{CONCEPT}`", "",
                  "| defence | " + " | ".join(t for _, t in FIELDS) + " |",
                  "|---|" + "---|" * len(FIELDS)]  # fmt: skip
        for defence, text in DEFENCES.items():
            cells = []
            for field, _ in FIELDS:
                hits, n = _pooled(runs, label, defence, field)
                cells.append(f"{_rate(hits, n)} (n={n})")
            lines.append(f"| {defence} ({text}) | " + " | ".join(cells) + " |")
        lines.append("")
    head = "| model | seed | defence | forget | paraphrase | concept inversion | UDA ASR | retain |"
    lines += ["## Per seed", "", head, "|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["model"], r["seed"])):
        for defence, d in r["defences"].items():
            cells = [_rate(d[f]["hits"], d[f]["n"]) for f, _ in FIELDS]
            lines.append(f"| {r['model']} | {r['seed']} | {defence} | " + " | ".join(cells) + " |")
    lines += ["", "## What the numbers say", "",
              "Pooled over seeds; '(below none)': the defence's 95% interval lies entirely below "
              "the undefended model's. Transfer (c* of the other erased model) is in the tables "
              "above.", ""] + findings(runs) + [""]  # fmt: skip
    cost = [r["learn_seconds"] for r in runs]
    lines += [f"Cost of c*: {min(cost):.0f}–{max(cost):.0f} s per erased model (3000 steps, one "
              "CPU thread, including the cached renders of the concept images).", ""]  # fmt: skip
    return "\n".join(lines)


def findings(runs: list[dict]) -> list[str]:
    out = []
    for label in MODELS:
        for field, text in FIELDS[:4]:
            vals = {d: _pooled(runs, label, d, field) for d in DEFENCES}
            base = vals["none"]
            parts = []
            for d in ("hand-negative", "hand-sld", "embedding-negative", "embedding-sld"):
                h, n = vals[d]
                lo, hi = wilson_interval(h, n)
                blo, bhi = wilson_interval(*base)
                below = hi < blo
                parts.append(f"{d} {100 * h / n:.0f}%" + (" (below none)" if below else ""))
            out.append(f"- {label.upper()}, {text}: none {100 * base[0] / base[1]:.0f}%; "
                       + ", ".join(parts) + ".")  # fmt: skip
        h0, n0 = _pooled(runs, label, "none", "retain_accuracy")
        costs = []
        for d in list(DEFENCES)[1:]:
            h, n = _pooled(runs, label, d, "retain_accuracy")
            costs.append(f"{d} {100 * (h / n - h0 / n0):+.0f}")
        out.append(f"- {label.upper()}, retain accuracy cost vs none (points): " +
                   ", ".join(costs) + ".")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/erasekit-negative-embedding"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/negative-embedding-world.json"))
    ap.add_argument("--merge", type=Path, nargs="+", help="merge run files into --out + .md")
    ap.add_argument("--smoke", action="store_true", help="tiny budgets (checks the script only)")
    args = ap.parse_args()
    if args.smoke:
        SMOKE["learn"] += ["--set", "steps=5", "--set", "images_per_prompt=1"]
        SMOKE["attacks"] = {
            "concept-inversion": ["steps=2", "eval_every=1"],
            "unlearndiffatk": ["blocks=1", "steps_per_block=1"],
        }
    if args.merge:
        runs = [r for f in args.merge for r in json.loads(f.read_text())["runs"]]
    else:
        from resalign_world import erase

        args.work.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:  # first every c* this process owns: others wait for them
            for label in args.models:
                learn_embedding(erase(CONCEPT, label, seed, args.work)[0], seed, args.work)
        runs = []
        for seed in args.seeds:
            for label in args.models:
                runs.append(run(seed, label, args.work))
                write_json(args.out, {"concept": CONCEPT, "runs": runs})
    write_json(args.out, {"concept": CONCEPT, "runs": runs})
    if len({r["model"] for r in runs}) == len(MODELS):
        args.out.with_suffix(".md").write_text(markdown(runs))


if __name__ == "__main__":
    main()
