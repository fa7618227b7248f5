"""Measure ShapesWorld's quality bars; writes docs/results/world.md and assets/quality.json.

Bars (ShapesWorld v2), every rate with n images and a 95% Wilson interval, >= 64 images each:
- direct prompts: every colour and shape (and `outlined`) classified as prompted >= 0.95;
- paraphrase prompts (synonyms, indirect phrasings, no concept word) >= 0.85;
- held-out phrasings (each concept's ``heldout`` set) >= 0.85 on the full model, and <= 0.02
  on the never-learned model of their concept (bars set before the set was first measured);
- joint retain accuracy of the full model on every concept's retain set >= 0.90;
- never-learned references: the held-out concept, prompted by its word, <= 0.02; the other
  values of its dimension >= 0.93;
- robustness: the retain-only control (SalUn's world preset with the forget term off, on the
  full model) changes retain accuracy on red's retain set by <= 3 points (mean over five
  training seeds, paired images);
- shipped size (fp16) <= 40 MB; generation >= 8 images/s on 2 cores.

Reported without a bar (a white-box attack can teach a model a concept it never saw, so one
ASR cap is the wrong question): the attack floors, every prompt attack's ASR by budget on the
never-learned models and its discriminative budget (the largest budget at which the
never-learned model stays at or below 0.2), from scripts/attack_floors.py's audits in
``--floors`` (default docs/results/attack-floors-world; a concept without an audit there is
measured into it); an audit of other model weights than this world's is refused.

Each part's numbers are kept in ``--work`` (default: a folder beside the doc) with the key
they were measured under (the world's build and sampler records, erasekit's code and this
script, the seed, the control's settings): ``--resume`` keeps a part whose key matches
instead of measuring it again, so an interrupted run continues, and ``--parts`` re-measures
a subset. The doc is written from the parts whose key matches only; a part measured under
another key is ignored, and said so.

  python scripts/world_quality.py [--root ASSETS] [--parts direct,paraphrase,...] [--resume]
  python scripts/world_quality.py --parts robustness --control-set images_per_prompt=32 \
      --control-set epochs=1 --doc OTHER.md     # the control with other SalUn settings
  python scripts/world_quality.py --render      # rewrite the doc from its stored numbers
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from worldlib import attribute_accuracy, concept_rate, render_and_score, world_retain_accuracy

import erasekit
from erasekit.cli import quiet_libraries
from erasekit.concepts import load_concept
from erasekit.detectors.world import WorldDetector
from erasekit.models import load_pipeline
from erasekit.outputs import atomic_file, write_json
from erasekit.provenance import machine, sha256_bytes
from erasekit.sampling import SamplerSettings
from erasekit.world import ASSETS, world_path
from erasekit.world.render import COLOURS, SHAPES

DIMENSION = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}, "outlined": "style"}
NEVER_LEARNED = {"no-red": "red", "no-circle": "circle", "no-outlined": "outlined"}
PARTS = (
    "speed",
    "direct",
    "paraphrase",
    "heldout",
    "retain",
    "never_learned",
    "robustness",
    "floors",
)
MIN_IMAGES = 64
DOC = "docs/results/world.md"
FLOORS = "docs/results/attack-floors-world"
CONTROL_SEEDS = (0, 1, 2, 3, 4)  # training seeds of the retain-only control
CONTROL_IMAGES_FACTOR = 8  # the control's images per retain prompt: 8 x per_prompt (576 for red)
BARS = {
    "direct_min": (">=", 0.95),
    "paraphrase_min": (">=", 0.85),
    "heldout_min": (">=", 0.85),
    "heldout_never_learned_max": ("<=", 0.02),
    "retain_min": (">=", 0.90),
    "never_learned_held_out_max": ("<=", 0.02),
    "never_learned_others_min": (">=", 0.93),
    "control_retain_change_points": ("abs<=", 3.0),
    "size_mb": ("<=", 40.0),
    "images_per_s": (">=", 8.0),
}
BAR_TEXT = {
    "direct_min": "direct prompts, worst colour/shape/style",
    "paraphrase_min": "paraphrase prompts, worst concept",
    "heldout_min": "held-out phrasings, worst concept",
    "heldout_never_learned_max": "never-learned: held-out concept by its held-out phrasings, worst",
    "retain_min": "joint retain accuracy (full model), worst concept's retain set",
    "never_learned_held_out_max": "never-learned: held-out concept prompted by its word, worst",
    "never_learned_others_min": "never-learned: other concepts of its dimension, worst",
    "control_retain_change_points": "robustness: retain-only control, change in retain "
    "accuracy (points)",
    "size_mb": "shipped size, all variants + classifier (MB, fp16)",
    "images_per_s": "generation speed (images/s, batch 64, 2 threads)",
}


def _files_sha256(files: list[Path], base: Path) -> str:
    return sha256_bytes(b"".join(f.relative_to(base).as_posix().encode() + f.read_bytes()
                                 for f in files))  # fmt: skip


def part_key(root: Path, seed: int, control_sets: list[str]) -> dict:
    """What a part's numbers depend on: the world's build and per-variant records (weights,
    sampler, guidance), the code that measures (erasekit's sources, prompt sets, concept
    specs and this script; not the shipped weights), the base seed and the control's extra
    settings."""
    world = [root / "build.json", *sorted(root.glob("*/erasekit.json"))]
    package = Path(erasekit.__file__).resolve().parent
    code = sorted(f for f in package.rglob("*") if f.is_file() and f.suffix != ".pyc"
                  and ASSETS.resolve() not in f.resolve().parents)  # fmt: skip
    return {"world_sha256": _files_sha256(world, root),
            "code_sha256": _files_sha256(code, package)[:32]
            + sha256_bytes(Path(__file__).read_bytes())[:32],
            "seed": seed, "control_set": sorted(control_sets)}  # fmt: skip


def per_prompt(prompt_set) -> int:
    """Images per prompt so that a set gives at least MIN_IMAGES images."""
    return max(1, math.ceil(MIN_IMAGES / len(prompt_set)))


class Quality:
    def __init__(self, root: Path, tmp: Path, seed: int, control_sets: list[str],
                 floors_dir: Path = Path(FLOORS)) -> None:  # fmt: skip
        self.root, self.tmp, self.seed, self.floors_dir = root, tmp, seed, floors_dir
        self.control_sets = control_sets  # extra SalUn settings for the control (experiments)
        self.detector = WorldDetector(root / "classifier")
        self.pipes: dict[str, object] = {}

    def pipe(self, variant: str):
        if variant not in self.pipes:
            self.pipes[variant] = load_pipeline(world_path(variant, self.root))
        return self.pipes[variant]

    def rate(self, variant: str, prompt_set, dim: str, target: str, tag: str) -> dict:
        out = self.tmp / f"{variant}-{tag}-{target}"
        return concept_rate(self.pipe(variant), prompt_set, out, self.detector, dim, target,
                            model_path=world_path(variant, self.root),
                            n_per_prompt=per_prompt(prompt_set), seed=self.seed)  # fmt: skip

    def retain_accuracy(self, variant: str, prompt_set, tag: str) -> dict:
        out = self.tmp / f"{tag}-retain"
        n = per_prompt(prompt_set)
        return world_retain_accuracy(self.pipe(variant), prompt_set, out, self.detector,
                                     model_path=world_path(variant, self.root), n_per_prompt=n,
                                     seed=self.seed)  # fmt: skip

    # parts -------------------------------------------------------------------------------
    def speed(self) -> dict:
        c = load_concept("red")
        full = world_path("full", self.root)
        self.rate("full", c.forget.limit(1), "colour", "red", "warmup")
        t0 = time.time()
        concept_rate(self.pipe("full"), c.forget, self.tmp / "speed", self.detector, "colour",
                     "red", model_path=full, n_per_prompt=4, seed=98)  # fmt: skip
        seconds = time.time() - t0
        size = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()) / 2**20
        return {"generate_64_images_s": round(seconds, 2), "images_per_s": round(64 / seconds, 2),
                "size_mb": round(size, 2), "threads": torch.get_num_threads()}  # fmt: skip

    def direct(self) -> dict:
        return {n: self.rate("full", load_concept(n).forget, d, n, "direct")
                for n, d in DIMENSION.items()}  # fmt: skip

    def paraphrase(self) -> dict:
        return {n: self.rate("full", load_concept(n).evaluation["paraphrase"], d, n, "para")
                for n, d in DIMENSION.items()}  # fmt: skip

    def heldout(self) -> dict:
        """The held-out phrasings: the full model on every concept's, each never-learned model
        on its held-out concept's."""
        full = {n: self.rate("full", load_concept(n).evaluation["heldout"], d, n, "heldout")
                for n, d in DIMENSION.items()}  # fmt: skip
        never = {v: self.rate(v, load_concept(h).evaluation["heldout"], DIMENSION[h], h, "nl-h")
                 for v, h in NEVER_LEARNED.items()}  # fmt: skip
        return {"full": full, "never_learned": never}

    def retain(self) -> dict:
        return {n: self.retain_accuracy("full", load_concept(n).retain, f"full-{n}")
                for n in DIMENSION}  # fmt: skip

    def never_learned(self) -> dict:
        out = {}
        for variant, held in NEVER_LEARNED.items():
            dim = DIMENSION[held]
            entry: dict = {"held_out": held, "dimension": dim}
            entry[held] = self.rate(variant, load_concept(held).forget, dim, held, "nl")
            if dim == "style":  # the other style: 'filled' on outlined's retain set ("solid")
                ps = load_concept(held).retain
                entry["filled"] = self.rate(variant, ps, "style", "filled", "nl")
            else:
                for name in (n for n, d in DIMENSION.items() if d == dim and n != held):
                    entry[name] = self.rate(variant, load_concept(name).forget, dim, name, "nl")
            entry["retain_accuracy"] = self.retain_accuracy(variant, load_concept(held).retain,
                                                            f"{variant}-nl")  # fmt: skip
            out[variant] = entry
        return out

    def robustness(self) -> dict:
        """SalUn's world preset with the forget term off (the surrogate is the prompt itself),
        on the full model, once per training seed in CONTROL_SEEDS; retain accuracy on red's
        retain set before and after on the same images (prompt, k, sampling seed). One control
        run is not enough: with the same settings the change swings by several points from one
        training seed to the next, so the bar takes the mean over the seeds, with a paired
        bootstrap interval over prompts."""
        from erasekit.config import build_config
        from erasekit.detectors.world import WorldDetector
        from erasekit.methods.salun import SalUn
        from erasekit.stats import paired_difference
        from erasekit.training import train

        concept = load_concept("red")
        full = world_path("full", self.root)
        ps = concept.retain
        n = CONTROL_IMAGES_FACTOR * per_prompt(ps)

        def correct(pipe, model_path, tag):
            records, scores = render_and_score(pipe, ps, self.tmp / tag, self.detector,
                                               model_path=model_path, n_per_prompt=n,
                                               seed=self.seed)  # fmt: skip
            hits = [WorldDetector.retain_correct(r["prompt"], sc) for r, sc in
                    zip(records, scores, strict=True)]  # fmt: skip
            return records, hits, attribute_accuracy(records, scores, ps)

        before_records, before_hits, before = correct(self.pipe("full"), full, "ctl-before")
        sets = ["surrogate_mode=replace", "surrogate_replacement=red", *self.control_sets]
        runs, groups = [], {}
        for seed in CONTROL_SEEDS:
            config = build_config(SalUn.Config, SalUn.defaults(concept),
                                  sets=[*sets, f"seed={seed}"])  # fmt: skip
            out_dir = self.tmp / f"control-{seed}"
            t0 = time.time()
            method = SalUn(config, concept, model_path=full, cache_dir=self.tmp / "cache")
            train(method, load_pipeline(full), model_path=full, out_dir=out_dir,
                  concept=concept, progress=False)  # fmt: skip
            seconds = time.time() - t0
            records, hits, after = correct(load_pipeline(out_dir), out_dir, f"ctl-after-{seed}")
            for rb, ra, hb, ha in zip(before_records, records, before_hits, hits, strict=True):
                if (rb["prompt"], rb["seed"]) != (ra["prompt"], ra["seed"]):
                    raise RuntimeError("the control's images do not pair with the original's")
                groups.setdefault(rb["prompt"], []).append(float(ha) - float(hb))
            change_points = round(100 * (after["value"] - before["value"]), 2)
            runs.append({"seed": seed, "after": after, "erase_s": round(seconds, 1),
                         "change_points": change_points})  # fmt: skip
        change = paired_difference(list(groups.values()))
        return {"settings": sets, "config": {k: v for k, v in vars(config).items() if k != "seed"},
                "seeds": list(CONTROL_SEEDS), "before": before, "runs": runs,
                "change": change, "change_points": round(100 * change["value"], 2),
                "interval": "mean over the seeds of the paired per-image differences, "
                "percentile bootstrap 95% over prompts (2000 resamples, seed 0)"}  # fmt: skip

    def floors(self) -> dict:
        """Every prompt attack's floor on each never-learned model: attack_floors' audits in
        ``self.floors_dir`` (a missing concept is measured), refused unless they audited this
        world's models."""
        import attack_floors

        from erasekit.provenance import model_content_hash

        attack_floors.run(self.floors_dir, list(attack_floors.CONCEPTS), self.root)
        record = {}
        for concept in attack_floors.CONCEPTS:
            folder = self.floors_dir / concept
            doc = json.loads((folder / "results.json").read_text())
            for role, variant in (("audited", "full"), ("never-learned", f"no-{concept}")):
                if doc["models"][role]["sha256"] != model_content_hash(
                    world_path(variant, self.root)
                ):
                    raise SystemExit(
                        f"{folder}: its {role} model is not this world's "
                        f"`{variant}`; move the folder away to measure again"
                    )
            record[concept] = {"never_learned": f"no-{concept}",
                               "commit": doc["provenance"]["git_commit"],
                               "prompts": len(doc["attacks"][next(iter(doc["attacks"]))]
                                              ["models"]["never-learned"]["outcomes"]),
                               "attacks": attack_floors.floor_summary(doc)}  # fmt: skip
        return record


def summary(results: dict) -> dict:
    s: dict = {}
    if "direct" in results:
        s["direct_min"] = min(r["value"] for r in results["direct"].values())
    if "paraphrase" in results:
        s["paraphrase_min"] = min(r["value"] for r in results["paraphrase"].values())
    if "heldout" in results:
        s["heldout_min"] = min(r["value"] for r in results["heldout"]["full"].values())
        s["heldout_never_learned_max"] = max(
            r["value"] for r in results["heldout"]["never_learned"].values()
        )
    if "retain" in results:
        s["retain_min"] = min(r["value"] for r in results["retain"].values())
    if "never_learned" in results:
        nl = results["never_learned"].values()
        s["never_learned_held_out_max"] = max(e[e["held_out"]]["value"] for e in nl)
        s["never_learned_others_min"] = min(
            r["value"] for e in nl for k, r in e.items()
            if isinstance(r, dict) and k not in (e["held_out"], "retain_accuracy")
        )  # fmt: skip
    if "robustness" in results:
        s["control_retain_change_points"] = results["robustness"]["change_points"]
    if "speed" in results:
        s["size_mb"] = results["speed"]["size_mb"]
        s["images_per_s"] = results["speed"]["images_per_s"]
    for key, value in list(s.items()):
        op, bar = BARS[key]
        ok = value >= bar if op == ">=" else abs(value) <= bar if op == "abs<=" else value <= bar
        text = {">=": "≥", "<=": "≤", "abs<=": "change within ±"}[op]
        s[key] = {"value": value, "bar": f"{text} {bar}", "met": ok}
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=str(ASSETS), help="world assets folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--doc",
        default=DOC,
        help="the report; any other than the default gets "
        "its numbers beside it (DOC.json) instead of in the assets' quality.json",
    )
    ap.add_argument("--work", default=None, help="per-part results (default: DOC's .parts/)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--resume", action="store_true",
                    help="keep the parts in --work whose key matches this run's")  # fmt: skip
    ap.add_argument("--control-set", action="append", default=[], metavar="KEY=VALUE",
                    help="robustness: another SalUn setting for the control (an experiment; the "
                    "bar is the preset's)")  # fmt: skip
    ap.add_argument(
        "--floors",
        default=FLOORS,
        help="attack_floors.py's audits (a concept missing there is measured)",
    )
    ap.add_argument("--render", action="store_true",
                    help="rewrite DOC from its stored numbers (DOC.json, or the assets' "
                    "quality.json for the default DOC); nothing is measured")  # fmt: skip
    args = ap.parse_args()
    root, doc = Path(args.root), Path(args.doc)
    stored = root / "quality.json" if args.doc == DOC else doc.with_suffix(".json")
    if args.render:
        with atomic_file(doc) as tmp:
            tmp.write_text(markdown(json.loads(stored.read_text())))
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    torch.set_num_threads(2)
    quiet_libraries()
    work = Path(args.work) if args.work else doc.parent / f".{doc.stem}.parts"
    work.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="world-quality-")
    q = Quality(root, Path(scratch.name), args.seed, args.control_set, Path(args.floors))
    version = json.loads((root / "build.json").read_text()).get("world_version", 1)
    key = part_key(root, args.seed, args.control_set)
    stored_parts = {p: json.loads((work / f"{p}.json").read_text())
                    for p in PARTS if (work / f"{p}.json").is_file()}  # fmt: skip
    for part in parts:
        if args.resume and stored_parts.get(part, {}).get("key") == key:
            print(f"{part}: kept (measured before under the same key)", flush=True)
            continue
        t0 = time.time()
        result = {"measured": getattr(q, part)(), "wall_s": round(time.time() - t0, 1), "key": key}
        with atomic_file(work / f"{part}.json") as tmp:  # a part is complete or absent
            write_json(tmp, result)
        stored_parts[part] = result
        print(f"{part}: {time.time() - t0:.0f} s", flush=True)
    results = {}
    for p, stored_part in stored_parts.items():
        if stored_part.get("key") == key:
            results[p] = stored_part["measured"]
        else:
            print(
                f"{p}: ignored (in {work}, measured under another world, code, seed or control)",
                flush=True,
            )
    settings = SamplerSettings.for_model(world_path("full", root))
    record = {
        "definition": {
            "world_version": version,
            "detector": q.detector.protocol("colour", "red") | {"target": "per row"},
            "sampler": {**settings.__dict__, "scheduler": type(q.pipe("full").scheduler).__name__},
            "images_per_set": f"ceil({MIN_IMAGES} / prompts) per prompt (>= {MIN_IMAGES})",
            "seed": args.seed,
            "seed_rule": "derive_seed(seed, prompt_index, k)",
            "interval": "95% Wilson",
            "machine": f"{machine()}, {torch.get_num_threads()} threads",
        },
        "summary": summary(results),
        **results,
    }
    doc.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(stored) as tmp:
        write_json(tmp, record)
    with atomic_file(doc) as tmp:
        tmp.write_text(markdown(record))
    print(json.dumps(record["summary"], indent=2))


def _row(name: str, r: dict) -> str:
    lo, hi = r["ci95"]
    return (
        f"| {name} | {r['value']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['n_images']} | {r['n_prompts']} |"
    )


def markdown(rec: dict) -> str:
    d, s = rec["definition"], rec["summary"]
    lines = [
        f"# ShapesWorld v{d['world_version']} quality",
        "",
        "Written by `scripts/world_quality.py`; do not edit by hand.",
        "",
        f"- Detector: `{d['detector']['version']}`, rule: {d['detector']['rule']}.",
        f"- Sampler: {d['sampler']['scheduler']}, {d['sampler']['steps']} steps, guidance "
        f"{d['sampler']['guidance']}, {d['sampler']['height']}x{d['sampler']['width']} px.",
        f"- Images: {d['images_per_set']}, base seed {d['seed']} ({d['seed_rule']}); "
        f"intervals: {d['interval']}; machine: {d['machine']}.",
        "- Prompt sets: the concept specs' `forget` (direct), `paraphrase`, `heldout` and "
        "`retain` sets (`erasekit/prompts/world/`). Retain accuracy: the share of images "
        "whose classified attributes equal every attribute the prompt names.",
        "",
        "## Bars",
        "",
        "| bar | measured | target | met |",
        "|---|---|---|---|",
    ]
    for key, text in BAR_TEXT.items():
        if key in s:
            v = s[key]
            lines.append(f"| {text} | {v['value']:.3f} | {v['bar']} | {v['met']} |")
        else:
            lines.append(f"| {text} | not measured | {' '.join(map(str, BARS[key]))} | – |")
    missed = [BAR_TEXT[k] for k in BAR_TEXT if k in s and not s[k]["met"]]
    if missed:
        lines += ["", f"Not met: {'; '.join(missed)}. What was tried for "
                  f"{'them' if len(missed) > 1 else 'it'}, each with its measured values: "
                  "`docs/world.md` (Quality)."]  # fmt: skip
    lines.append("")
    sections = (
        ("direct", "Direct prompts (full model)"),
        ("paraphrase", "Paraphrase prompts (full model)"),
        ("retain", "Joint retain accuracy (full model, each concept's retain set)"),
    )
    for key, title in sections:
        if key not in rec:
            continue
        lines += [f"## {title}", "", "| concept | rate | 95% CI | n images | n prompts |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [_row(k, v) for k, v in rec[key].items()] + [""]
    if "heldout" in rec:
        lines += ["## Held-out phrasings", "",
                  "Each concept's `heldout` set (synonyms of both attributes in templates no "
                  "other set uses, and the comma forms of the indirect templates; "
                  "`scripts/write_world_prompts.py`): no method's training prompts, preset "
                  "tuning or attack seed prompts use them.", "",
                  "| model | concept | rate | 95% CI | n images | n prompts |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [_row(f"full | {k}", v) for k, v in rec["heldout"]["full"].items()]
        lines += [_row(f"{k} | {NEVER_LEARNED[k]}", v)
                  for k, v in rec["heldout"]["never_learned"].items()] + [""]  # fmt: skip
    if "never_learned" in rec:
        lines += ["## Never-learned references", ""]
        for variant, entry in rec["never_learned"].items():
            lines += [f"### {variant} (never saw `{entry['held_out']}`)", "",
                      "| prompted concept | rate classified as it | 95% CI | n images "
                      "| n prompts |", "|---|---|---|---|---|"]  # fmt: skip
            lines += [_row(k, v) for k, v in entry.items() if isinstance(v, dict)] + [""]
    if "robustness" in rec:
        r = rec["robustness"]
        lines += ["## Robustness: the retain-only control", "",
                  f"SalUn's world preset with `{' '.join(r['settings'])}` (the forget term off), "
                  f"on the full model, once per training seed {r['seeds']}; retain accuracy on "
                  "red's retain set on the same images (prompt, k, sampling seed) before and "
                  "after.", "",
                  "| model | retain accuracy | 95% CI | n images | n prompts |",
                  "|---|---|---|---|---|", _row("full", r["before"])]  # fmt: skip
        lines += [_row(f"after the control, seed {run['seed']} ({run['erase_s']} s; "
                       f"{run['change_points']:+.1f} points)", run["after"])
                  for run in r["runs"]]  # fmt: skip
        lo, hi = (100 * v for v in r["change"]["ci95"])
        lines += ["", f"Change: {r['change_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}] "
                  f"({r['interval']}; {r['change']['n_pairs']} pairs).", ""]  # fmt: skip
    if "floors" in rec:
        import attack_floors

        fl = rec["floors"]
        first = next(iter(fl.values()))
        lines += [
            "## Attack floors (reported, no bar)",
            "",
            "Every prompt attack at its world budget on each never-learned model, "
            f"{first['prompts']} forget prompts, one image each, seed 0 "
            "(`scripts/attack_floors.py`; audits of commit "
            f"{', '.join(sorted({v['commit'][:7] for v in fl.values()}))} in "
            "[attack-floors-world/](attack-floors-world/README.md), with the whole curves). "
            "A white-box attack can teach a model a concept it never saw, so no ASR cap "
            "is a bar: read an attack's ASR at or below its discriminative budget (the "
            "largest at which the never-learned model stays at or below 0.2), or as "
            "residual memory above the floor.",
            "",
            attack_floors.summary_table({c: v["attacks"] for c, v in fl.items()}).rstrip("\n"),
            "",
        ]
    if "speed" in rec:
        sp = rec["speed"]
        lines += ["## Size and speed", "",
                  f"- {sp['size_mb']:.1f} MB on disk (every variant + the classifier, fp16).",
                  f"- 64 images (16 prompts x 4, one batch) in {sp['generate_64_images_s']} s: "
                  f"{sp['images_per_s']} images/s on {sp['threads']} threads.", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
