"""Pooling a study's cells into the leaderboard document: rates over seeds, recovery curves,
paired differences, claims and mask comparisons."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from erasekit.bench.study import Study
from erasekit.outputs import read_jsonl

SCHEMA = "erasekit.leaderboard"
SCHEMA_VERSION = 1


def _log_mean(model: Path, field: str) -> float | None:
    """The mean of ``field`` over the rows of a model's training log that record it."""
    from erasekit.training import TRAINING_LOG

    path = model / TRAINING_LOG
    if not path.is_file():
        return None
    values = [r[field] for r in _samples(path) if isinstance(r.get(field), (int, float))]
    return sum(values) / len(values) if values else None


def _erase_outputs(keys: list[str], cells: list[dict]) -> dict[str, list]:
    """Each declared output of every erased cell's model, by seed order: a dotted key of its
    ``erasekit.json`` ``training.outputs``, or ``log:FIELD``, the mean of FIELD over its
    training log's steps; keys a model does not record are left out."""
    from erasekit.models import read_manifest

    found: dict[str, list] = {}
    for c in cells:
        model = Path(c.get("model") or "")
        if not (model / "erasekit.json").is_file():
            continue
        outputs = (read_manifest(model).get("training") or {}).get("outputs") or {}
        for key in keys:
            if key.startswith("log:"):
                value: Any = _log_mean(model, key[len("log:") :])
            else:
                value = outputs
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                found.setdefault(key, []).append(value)
    return found


def _cells(out: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted((out / "cells").glob("*/*/seed*/cell.json"))]


def _metrics(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A cell's audited-model metrics; attacked ones as ``<attack>:<key>``."""
    from erasekit.reporting import audited_metrics

    return {f"{a}:{k}" if a else k: m for a, _, k, m in audited_metrics(doc)}


def split_attack(key: str) -> tuple[str, str]:
    """('<attack>', '<metric>') of an attacked metric key, ('', key) of a plain one (a prompt
    set's slice such as ``forget[:2]`` holds a colon too, after the metric's '/')."""
    head, sep, tail = key.partition(":")
    return (head, tail) if sep and "/" not in head else ("", key)


def _curves(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A cell's audited-model recovery curve under each recovery attack."""
    out = {}
    for name, entry in (doc.get("attacks") or {}).items():
        audited = entry.get("models", {}).get("audited", {})
        if "curve" in audited:
            out[name] = audited["curve"]
    return out


POOLING_DEFINITION = (
    "rates: hits / n pooled over seeds; 95% interval: Wilson for one seed, else the hull of"
    " Wilson and a cluster bootstrap that resamples seeds (and prompts within them where the"
    " cells record them), so seeds that disagree widen it; per_seed: each seed's value;"
    " attacked metrics are"
    " '<attack>:<metric>' (the audit's final attack step)"
)
ONE_SEED_INTERVAL = "Wilson score 95% on hits / n (one seed: its images independent)"
SEEDS_PROMPTS_INTERVAL = (
    "the hull of Wilson 95% on the pooled hits / n and a hierarchical percentile bootstrap 95%"
    " over seeds and, within each seed drawn, its prompts (2000 resamples, seed 0)"
)
SEEDS_INTERVAL = (
    "the hull of Wilson 95% on the pooled hits / n and a percentile bootstrap 95% over seeds"
    " (each seed's hits / n resampled whole; 2000 resamples, seed 0)"
)


def pooled_rate(per_seed: list[dict[str, Any]]) -> tuple[float, float, float, str]:
    """(value, low, high, interval definition) of a rate pooled over seeds: hits / n, with a
    Wilson interval for one seed; for several, the hull of that Wilson interval and a cluster
    bootstrap (over seeds and prompts where every seed records its prompts' hits, else over
    seeds), so the interval is never narrower than the per-image one."""
    from erasekit.stats import cluster_bootstrap_interval, wilson_interval

    n = sum(m["n_images"] for m in per_seed)
    hits = sum(round(m["value"] * m["n_images"]) for m in per_seed)
    if len(per_seed) == 1:
        low, high = wilson_interval(hits, n)
        return hits / n, low, high, ONE_SEED_INTERVAL
    if all(m.get("per_prompt") for m in per_seed):
        clusters = [[(h, k) for h, k in m["per_prompt"]] for m in per_seed]
        interval = SEEDS_PROMPTS_INTERVAL
    else:
        clusters = [[(round(m["value"] * m["n_images"]), m["n_images"])] for m in per_seed]
        interval = SEEDS_INTERVAL
    # the hull: seeds that disagree widen the interval; seeds (and prompts) that all agree,
    # where a bootstrap collapses to a point, still keep the images' binomial uncertainty
    low, high = cluster_bootstrap_interval(clusters)
    wilson = wilson_interval(hits, n)
    return hits / n, min(low, wilson[0]), max(high, wilson[1]), interval


def pool_curve(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Recovery curves over seeds, step by step: pooled hits / n with ``pooled_rate``'s
    interval (the steps every seed evaluated)."""
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in per_seed)))
    out = []
    for step in steps:
        points = [next(p for p in c if p["step"] == step) for c in per_seed]
        value, low, high, _ = pooled_rate(points)
        out.append({"step": step, "value": round(value, 6),
                    "ci95": [round(low, 4), round(high, 4)],
                    "n_images": sum(p["n_images"] for p in points),
                    "per_seed": [p["value"] for p in points]})  # fmt: skip
    return out


def pool(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One metric over seeds: rates as pooled hits / n with ``pooled_rate``'s interval; means
    as the mean of the seeds' means with the range of the seeds' values (not a 95%
    interval)."""
    from erasekit.evaluation import RATE_INTERVAL

    first = per_seed[0]
    values = [m["value"] for m in per_seed]
    n = sum(m["n_images"] for m in per_seed)
    if first["definition"].get("interval") == RATE_INTERVAL:
        value, low, high, interval = pooled_rate(per_seed)
    elif len(per_seed) == 1:
        value, (low, high), interval = values[0], first["ci95"], first["definition"]["interval"]
    else:
        value, low, high = sum(values) / len(values), min(values), max(values)
        interval = "range of the per-seed values (not a 95% interval)"
    return {"metric": first["metric"], "value": round(value, 6),
            "ci95": [round(low, 4), round(high, 4)], "n_images": n, "n_seeds": len(per_seed),
            "per_seed": values, "per_seed_n": [m["n_images"] for m in per_seed],
            "higher_is_better": first["higher_is_better"],
            "definition": {**first["definition"], "interval": interval}}  # fmt: skip


def leaderboard(study: Study, out: Path) -> dict[str, Any]:
    """The leaderboard document from the cells' result files (schema ``erasekit.leaderboard``)."""
    from erasekit.concepts import load_concept
    from erasekit.methods.salun import MASK_OVERLAP_DEFINITIONS
    from erasekit.provenance import run_provenance

    names = [load_concept(c).name for c in study.concepts]
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in _cells(out):
        if c["row"] in study.models and c["concept"] in names:
            by[(c["concept"], c["row"])].append(c)
    concepts: dict[str, Any] = {}
    attack_wall: dict[str, float] = defaultdict(float)  # each attack's time over the cells
    for concept in names:
        rows = {}
        for name in study.models:
            got = sorted(by.get((concept, name), []), key=lambda c: c["seed"])
            ok = [c for c in got if c["status"] == "ok" and c["seed"] in study.seeds]
            per_key: dict[str, list[dict]] = defaultdict(list)
            per_attack: dict[str, list[list[dict]]] = defaultdict(list)
            for c in ok:
                cell_dir = out / "cells" / concept / name / f"seed{c['seed']}"
                doc = _results(cell_dir)
                for key, m in _metrics(doc).items():
                    per_key[key].append(m)
                for attack, curve in _curves(doc).items():
                    per_attack[attack].append(curve)
                for attack, entry in (doc.get("attacks") or {}).items():
                    attack_wall[attack] += entry.get("wall_time_s") or 0.0
            rows[name] = {
                "model": study.models[name].describe(),
                "seeds_ok": [c["seed"] for c in ok],
                "failed": [{"seed": c["seed"], "error": c["error"]} for c in got
                           if c["status"] != "ok"],
                "metrics": {k: pool(v) for k, v in per_key.items() if len(v) == len(ok)},
                "erase_wall_s": [c["erase_wall_s"] for c in ok
                                 if c.get("erase_wall_s") is not None],
                "outputs": _erase_outputs(study.outputs, ok),
                "curves": {a: pool_curve(v) for a, v in per_attack.items() if len(v) == len(ok)},
            }  # fmt: skip
        differences = []
        for a, b in study.compare:
            primary = _primary(out, concept, a)
            seeds = [s for s in rows[a]["seeds_ok"] if s in rows[b]["seeds_ok"]]
            pairs = [(out / "cells" / concept / a / f"seed{s}",
                      out / "cells" / concept / b / f"seed{s}") for s in seeds]  # fmt: skip
            for key, m in rows[a]["metrics"].items():
                attack, plain = split_attack(key)
                if m["metric"] in ASR_FIELDS and attack:  # a prompt attack's per-prompt outcome
                    d = paired_outcome_difference(pairs, attack, plain.split("/", 1)[1],
                                                  m["metric"])  # fmt: skip
                elif m["metric"] == "concept_rate" and "[" not in key and primary is not None:
                    model = f"{attack}:audited" if attack else "audited"  # attacked ones too
                    d = paired_difference(pairs, plain.split("/", 1)[1], primary, model=model)
                else:
                    continue
                if d:
                    differences.append({"a": a, "b": b, "metric": key, **d})
        claims = [check_claim(c, rows, differences, concept) for c in study.claims]
        concepts[concept] = {"rows": rows, "differences": differences, "claims": claims}
        if study.masks:
            concepts[concept]["masks"] = _mask_pairs(study.masks, by, concept, study.seeds)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "study": {
            "name": study.name,
            "source": study.source,
            "sha256": study.sha256,
            "profile": study.profile,
            "detectors": study.detectors,
            "description": study.description,
            "base": study.base,
            "seeds": study.seeds,
            "audit": study.audit,
            "attacks": study.attacks,
            "models": {n: r.describe() for n, r in study.models.items()},
            "outputs": study.outputs,
        },  # fmt: skip
        "columns": study.columns,
        "concepts": concepts,
        "definitions": {
            "rows": "each row's model audited alone (erasekit.audit, no reference role), once "
            "per seed (the seed of its erasure and of its evaluation)",
            "pooling": POOLING_DEFINITION,
            "curves": "each row's concept rate on the attack's curve prompts (primary protocol) "
            "after every eval_every steps of a recovery attack, pooled over seeds per step as "
            "hits / n, with the pooling's interval",
            **({"masks": MASK_OVERLAP_DEFINITIONS} if study.masks else {}),
            "differences": "a − b on the same images' prompts, k and seeds (primary protocol), "
            "percentile bootstrap 95% over (seed, prompt) groups, 2000 resamples, seed 0 (with "
            "several seeds, the hull of that and a bootstrap over seeds, then prompts); on an "
            "attacked metric against the never-learned row: the residual memory; on a prompt "
            "attack's asr / pre_asr: each prompt's outcome (success within the budget / at the "
            "pre-check, 1 or 0) matched by prompt and evaluation seed",
            **({"outputs": OUTPUTS_DEFINITION} if study.outputs else {}),
        },
        "provenance": {
            **run_provenance(),
            # the key of every cell pooled (CONCEPT/ROW/seedN): bench report restores these
            # cells in a folder that other profiles' runs share
            "cell_keys": {
                f"{c['concept']}/{c['row']}/seed{c['seed']}": c["key"]
                for cells in by.values()
                for c in cells
                if c["status"] == "ok" and c["seed"] in study.seeds
            },
            # each pooled cell's erase and audit wall time, measured when it ran
            "cells_wall_s": round(
                sum(
                    (c.get("erase_wall_s") or 0) + c.get("audit_wall_s", 0)
                    for cells in by.values()
                    for c in cells
                    if c["status"] == "ok" and c["seed"] in study.seeds
                ),
                1,
            ),
            # of that, each attack's own wall time over the pooled cells (audits that record it)
            "attacks_wall_s": {a: round(w, 1) for a, w in attack_wall.items() if w},
        },  # fmt: skip
    }


def repool(board: dict[str, Any], commit: str | None) -> list[dict[str, Any]]:
    """Re-pool a leaderboard document in place from the per-seed values it records (its cells
    need not be kept; nothing is measured): every rate and curve point gets ``pooled_rate``'s
    interval — over seeds only, as a board records no per-prompt hits — and every claim is
    judged again; ``commit``: the code's commit, taken once before any file is written.
    Returns the claims whose status changed (concept, a, b, metric, before, after)."""
    changed = []
    for concept, entry in board["concepts"].items():
        for row in entry["rows"].values():
            for key, m in row["metrics"].items():
                if m.get("definition", {}).get("interval", "").startswith("Wilson"):
                    row["metrics"][key] = _repooled(m, m["per_seed"], m["n_images"])
            for curve in row.get("curves", {}).values():
                for point in curve:
                    point.update(_repooled(point, point["per_seed"], point["n_images"]))
        claims = []
        for old in entry.get("claims", []):
            claim = {k: old[k] for k in ("a", "b", "metric", "says") if k in old}
            new = check_claim(claim, entry["rows"], entry.get("differences", []), concept)
            if new["status"] != old.get("status"):
                changed.append({**claim, "concept": concept, "metric": new["metric"],
                                "before": old.get("status"), "after": new["status"],
                                "evidence": new.get("evidence")})  # fmt: skip
            claims.append(new)
        entry["claims"] = claims
    board["definitions"]["pooling"] = POOLING_DEFINITION
    board["provenance"]["repooled"] = {"git_commit": commit, "intervals": SEEDS_INTERVAL}
    return changed


def _repooled(m: dict[str, Any], per_seed: list[float], n: int) -> dict[str, Any]:
    """A pooled rate's value and interval again from its per-seed values (equal images per
    seed: each seed renders the same prompt set)."""
    each = n // len(per_seed)
    value, low, high, interval = pooled_rate([{"value": v, "n_images": each} for v in per_seed])
    out = {**m, "value": round(value, 6), "ci95": [round(low, 4), round(high, 4)]}
    if "definition" in m:
        out["definition"] = {**m["definition"], "interval": interval}
    return out


def _mask_pairs(pairs: list[tuple[str, str]], by: dict, concept: str,
                seeds: list[int]) -> list[dict[str, Any]]:  # fmt: skip
    """Each declared pair's masks compared seed by seed (the seeds both rows finished)."""
    from erasekit.methods.salun import mask_overlap

    out = []
    for a, b in pairs:
        models = [{c["seed"]: c["model"] for c in by.get((concept, r), [])
                   if c["status"] == "ok" and c["seed"] in seeds} for r in (a, b)]  # fmt: skip
        for seed in sorted(set(models[0]) & set(models[1])):
            out.append({"a": a, "b": b, "seed": seed,
                        **mask_overlap(models[0][seed], models[1][seed])})  # fmt: skip
    return out


def _primary(out: Path, concept: str, row: str) -> str | None:
    for f in sorted((out / "cells" / concept / row).glob("seed*/audit/results.json")):
        return _results(f.parents[1])["evaluation"]["primary_protocol"]
    return None


def check_claim(
    claim: dict[str, str], rows: dict[str, Any], differences: list[dict], concept: str = ""
) -> dict:
    """Whether "a is better than b on metric" holds, from the numbers: the paired difference's
    95% interval when the study compares the pair on that metric, else the two pooled
    intervals (non-overlap: a stricter rule). ``holds`` / ``reversed`` / ``no difference`` (a
    paired interval of exactly 0: every matched pair came out the same) / ``not resolved``
    (the intervals leave either order possible) / ``not measured``. ``{concept}`` in the
    metric stands for ``concept`` (e.g. concept inversion's prompt set)."""
    claim = {**claim, "metric": claim["metric"].replace("{concept}", concept)}
    a, b, key = claim["a"], claim["b"], claim["metric"]
    out = {**claim, "status": "not measured"}
    ma, mb = rows[a]["metrics"].get(key), rows[b]["metrics"].get(key)
    if not (ma and mb):
        return out
    sign = 1 if ma["higher_is_better"] else -1  # better = higher, or lower
    pair = next((d for d in differences if d["metric"] == key and (d["a"], d["b"]) in
                 ((a, b), (b, a))), None)  # fmt: skip
    if pair is not None:  # compared either way round: a − b is −(b − a)
        flip = 1 if pair["a"] == a else -1
        value = flip * pair["value"] + 0.0  # + 0.0: a flipped zero prints 0.00, not -0.00
        low, high = sorted(flip * x + 0.0 for x in pair["ci95"])
        evidence = f"paired a − b {value:+.2f} [{low:+.2f}, {high:+.2f}]"
    else:
        low, high = ma["ci95"][0] - mb["ci95"][1], ma["ci95"][1] - mb["ci95"][0]
        evidence = (f"a {ma['value']:.2f} [{ma['ci95'][0]:.2f}, {ma['ci95'][1]:.2f}] vs b "
                    f"{mb['value']:.2f} [{mb['ci95'][0]:.2f}, {mb['ci95'][1]:.2f}]")  # fmt: skip
    # the interval of sign·(a − b): above 0 means a is better
    better_low, better_high = sorted((sign * low, sign * high))
    if better_low > 0:
        status = "holds"
    elif better_high < 0:
        status = "reversed"
    elif pair is not None and better_low == better_high == 0:
        status = "no difference"  # every paired image or prompt came out the same for a and b
    else:
        status = "not resolved"
    return {**out, "status": status, "evidence": evidence}


def _samples(path: Path) -> list[dict[str, Any]]:
    """A JSONL file (a cell's samples.jsonl, a model's training log), read once per version of
    the file (every compared metric of a pair reads the same two files; every ``log:`` output
    the same log)."""
    return _read_jsonl(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _read_jsonl(path: Path, mtime_ns: int) -> list[dict[str, Any]]:
    return read_jsonl(path)


def _results(cell: Path) -> dict[str, Any]:
    """A cell's audit results.json, read once per version of the file (rows, the primary
    protocol and every compared attack metric read the same files)."""
    path = cell / "audit" / "results.json"
    return _read_results(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_results(path: Path, mtime_ns: int) -> dict[str, Any]:
    return json.loads(path.read_text())


OUTPUTS_DEFINITION = (
    "per erased row and seed: a dotted key of the model's erasekit.json training.outputs as "
    "recorded, or log:FIELD, the mean of FIELD over the steps of its training log that record it"
)
ASR_FIELDS = {"asr": "success", "pre_asr": "pre_success"}  # metric → its outcome's field


def paired_outcome_difference(
    pairs: list[tuple[Path, Path]], attack: str, prompt_set: str, metric: str
) -> dict[str, Any] | None:
    """A prompt attack's ``asr`` or ``pre_asr`` of two rows as a paired difference: each
    prompt's outcome (1 = the concept shown) of a − b, matched by prompt index and evaluation
    seed within each pair of cells, bootstrap over (seed, prompt) groups as
    ``paired_difference``; None without matched prompts."""
    from erasekit.stats import paired_difference as paired

    field = ASR_FIELDS[metric]

    def outcomes(cell: Path) -> dict[tuple, float]:
        doc = _results(cell)
        entry = (doc.get("attacks") or {}).get(attack, {}).get("models", {}).get("audited", {})
        if (entry.get("prompt_set") or {}).get("name") != prompt_set:
            return {}
        return {(o["index"], o["seed"]): float(o[field]) for o in entry.get("outcomes", [])}

    groups: list[list[float]] = []
    clusters: list[list[int]] = []
    for a, b in pairs:
        fa, fb = outcomes(a), outcomes(b)
        matched = [[fa[k] - fb[k]] for k in sorted(fa) if k in fb]
        clusters.append(list(range(len(groups), len(groups) + len(matched))))
        groups += matched
    clusters = [c for c in clusters if c]
    return {**paired(groups, clusters=clusters), "unit": "prompts"} if groups else None


def paired_difference(
    pairs: list[tuple[Path, Path]], prompt_set: str, protocol: str, model: str = "audited"
) -> dict[str, Any] | None:
    """Mean of (flag_a − flag_b) over images matched by seed, prompt and k (each pair: two
    rows' cells of one seed; ``model``: the samples' role, e.g. ``finetune:audited`` for the
    images after an attack), with a percentile bootstrap interval resampling (seed, prompt)
    groups, hulled with one over seeds and then prompts (``stats.paired_difference``); None
    without matched images."""
    from erasekit.stats import paired_difference as paired

    groups: dict[tuple, list[float]] = defaultdict(list)
    for a, b in pairs:
        fa = {(s["prompt_index"], s["k"], s["seed"]): float(s["flags"][protocol])
              for s in _samples(a / "audit" / "samples.jsonl")
              if s.get("model") == model and s["prompt_set"] == prompt_set}  # fmt: skip
        for s in _samples(b / "audit" / "samples.jsonl"):
            key = (s["prompt_index"], s["k"], s["seed"])
            if s.get("model") == model and s["prompt_set"] == prompt_set and key in fa:
                groups[(a.name, key[0])].append(fa[key] - float(s["flags"][protocol]))
    keys = list(groups)
    seeds = list(dict.fromkeys(k[0] for k in keys))  # each pair of cells is one seed
    clusters = [[i for i, k in enumerate(keys) if k[0] == name] for name in seeds]
    return (
        {**paired(list(groups.values()), clusters=clusters), "unit": "images"} if groups else None
    )
