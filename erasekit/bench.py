"""`erasekit bench`: a declarative study (models x concepts x seeds, each audited with the same
settings and attacks) and its leaderboard, pooled from the result files.

A study file (YAML)::

    name: world-quick
    base: world:full                 # a model folder, or world:<variant>
    concepts: [red]
    seeds: [0, 1]
    models:
      original: original             # the base model itself
      never-learned: never-learned   # the concept's never-learned model (its spec names it)
      salun: {erase: salun}          # erased from the base (its presets apply), once per seed
      esd-fast: {erase: esd, set: {steps: 50}}
      resalign-over-salun: {erase: resalign, from: salun}   # erased from another row's model
      mine: {path: models/my-erased} # a folder as it is
      circle-after-red: {erase: salun, concept: circle, from: salun}  # another concept erased
      words-negative: {guide: {mode: negative-prompt}, from: salun}    # inference-time guidance
      cstar: {erase: negative-embedding, from: salun}
      cstar-sld: {guide: {mode: sld, sld: medium, embedding: cstar}, from: salun}
    audit: {n_per_prompt: 2, limit: 8}   # erasekit.audit's settings
    attacks: {finetune: {steps: 50, eval_every: 25}}
    compare: [[salun, original]]     # paired differences
    outputs: [kappa_final.immunization_ratio]   # erasekit.json training.outputs to tabulate
    masks: [[lcodec, salun]]         # SalUn-style masks of two rows compared, seed by seed

A ``guide`` row renders its ``from`` row's weights (linked, not copied) with a ``guidance.json``:
``mode`` negative-prompt or sld, ``concept`` the negative prompt / safety concept (default: the
concept's words), ``sld`` a preset or the five numbers, ``embedding`` a negative-embedding row
whose learned token becomes the concept (its own token; e.g. the c* of another model: transfer).

Every cell (concept, model, seed) goes through ``erasekit.erase`` and ``erasekit.audit`` (the
model as the audited role, no other role: each row is measured alone). Erased models are cached
under OUT/models by content (base content hash, concept spec hash, method, settings, seed and the
model it starts from), audits under OUT/cells with the key they were run with, so an
interrupted or extended study redoes only what changed. A cell that fails is recorded as failed
with its error, and the study goes on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasekit.distributed import process_state
from erasekit.errors import ErasekitError, first_line
from erasekit.outputs import atomic_file, output_lock, read_jsonl, write_json

SCHEMA = "erasekit.leaderboard"
SCHEMA_VERSION = 1
STUDY_KEYS = {"name", "base", "concepts", "seeds", "models", "audit", "attacks", "compare",
              "columns", "description", "profiles", "detectors", "claims", "outputs",
              "masks"}  # fmt: skip
AUDIT_KEYS = {"n_per_prompt", "limit", "steps", "batch_size", "guidance", "dtype", "device",
              "captions", "fid_images"}  # fmt: skip


@dataclass(frozen=True)
class ModelRow:
    """One row of the study: ``kind`` original | never-learned | path | erase | guide."""

    name: str
    kind: str
    method: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    start: str | None = None  # ``from``: the row whose model this one is erased from
    concept: str | None = None  # erase this concept instead of the cell's (audit: the cell's)
    guide: dict[str, Any] | None = None  # a guide row's guidance.json (``embedding``: a row)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "erase":
            out.update(method=self.method, settings=self.settings, start=self.start or "base")
            if self.concept:
                out["concept"] = self.concept
        if self.kind == "guide":
            out.update(guidance=self.guide, start=self.start or "base")
        if self.path:
            out["path"] = self.path
        return out


@dataclass(frozen=True)
class Study:
    name: str
    base: str
    concepts: list[str]
    seeds: list[int]
    models: dict[str, ModelRow]
    audit: dict[str, Any]
    attacks: dict[str, dict[str, Any]]
    compare: list[tuple[str, str]]
    columns: list[str] | None
    source: str
    sha256: str
    description: str = ""
    profile: str | None = None
    detectors: dict[str, Any] = field(default_factory=dict)  # DetectorOptions' fields
    # orderings to check: a is better than b on metric (by its higher_is_better)
    claims: list[dict[str, str]] = field(default_factory=list)
    # dotted paths into each erased model's erasekit.json training.outputs, tabulated per seed
    outputs: list[str] = field(default_factory=list)
    # pairs of rows whose SalUn-style masks are compared (overlap, Jaccard, cost) seed by seed
    masks: list[tuple[str, str]] = field(default_factory=list)


def _fail(path: Path, what: str) -> ErasekitError:
    return ErasekitError(f"{path}: {what}")


def _model_row(path: Path, name: str, value: Any, earlier: list[str]) -> ModelRow:
    if value in ("original", "never-learned"):
        return ModelRow(name, value)
    if not isinstance(value, dict):
        raise _fail(path, f"model {name!r}: original, never-learned, {{erase: METHOD}}, "
                    "{guide: {...}} or {path: FOLDER}")  # fmt: skip
    if "path" in value:
        if set(value) != {"path"}:
            raise _fail(path, f"model {name!r}: a path row takes only 'path'")
        folder = Path(str(value["path"]))
        return ModelRow(name, "path", path=str(folder if folder.is_absolute()
                                               else path.parent / folder))  # fmt: skip
    start = value.get("from")
    if start is not None and start not in earlier:
        raise _fail(path, f"model {name!r}: 'from: {start}' must name a row listed before it")
    if "guide" in value:
        return _guide_row(path, name, value, earlier)
    unknown = sorted(set(value) - {"erase", "set", "from", "concept"})
    if "erase" not in value or unknown:
        extra = f" (unknown: {', '.join(unknown)})" if unknown else ""
        raise _fail(path, f"model {name!r}: an erased row is {{erase: METHOD, set: {{...}}, "
                    f"from: ROW, concept: CONCEPT}}{extra}")  # fmt: skip
    settings = value.get("set") or {}
    if not isinstance(settings, dict):
        raise _fail(path, f"model {name!r}: 'set' must be a mapping of settings")
    concept = value.get("concept")
    if concept is not None:
        if not isinstance(concept, str) or not concept:
            raise _fail(path, f"model {name!r}: 'concept' must be a concept name or spec file")
        concept = _concept_arg(path, concept)
    from dataclasses import fields

    from erasekit.methods import get_method

    method = get_method(str(value["erase"]))  # an unknown method fails here, naming them
    unknown = sorted(set(settings) - {f.name for f in fields(method.Config)})
    if unknown:  # before any cell runs, not as a failed cell hours later
        raise _fail(path, f"model {name!r}: unknown {method.name} settings: "
                    f"{', '.join(unknown)}")  # fmt: skip
    return ModelRow(name, "erase", method=str(value["erase"]), settings=dict(settings),
                    start=start, concept=concept)  # fmt: skip


def _guide_row(path: Path, name: str, value: dict, earlier: list[str]) -> ModelRow:
    from erasekit.guidance import parse_guidance

    guide = value["guide"]
    unknown = sorted(set(value) - {"guide", "from"})
    if unknown or not isinstance(guide, dict):
        raise _fail(path, f"model {name!r}: a guide row is {{guide: {{mode: ..., concept: ..., "
                    "sld: ..., embedding: ROW}, from: ROW}")  # fmt: skip
    source = f"{path}: model {name!r}"
    embedding = guide.get("embedding")
    if embedding is not None and embedding not in earlier:
        raise _fail(path, f"model {name!r}: 'embedding: {embedding}' must name a row listed "
                    "before it (a negative-embedding row)")  # fmt: skip
    # checked now with stand-ins for what the cell fills in (the concept's words, the token)
    parse_guidance({"concept": "x", **{k: v for k, v in guide.items() if k != "embedding"}},
                   source=source)  # fmt: skip
    return ModelRow(name, "guide", start=value.get("from"), guide=dict(guide))


def _concept_arg(path: Path, concept: str) -> str:
    """A concept name, or a spec file given relative to the study's folder."""
    relative = concept.endswith((".yaml", ".yml")) and not Path(concept).is_absolute()
    return str(path.parent / concept) if relative else concept


def _value_text(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _erase_outputs(keys: list[str], cells: list[dict]) -> dict[str, list]:
    """Each declared ``training.outputs`` key (dotted) of every erased cell's model, by seed
    order; keys a model does not record are left out."""
    from erasekit.models import read_manifest

    found: dict[str, list] = {}
    for c in cells:
        model = Path(c.get("model") or "")
        if not (model / "erasekit.json").is_file():
            continue
        outputs = (read_manifest(model).get("training") or {}).get("outputs") or {}
        for key in keys:
            value: Any = outputs
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                found.setdefault(key, []).append(value)
    return found


def load_study(path: str | Path, profile: str | None = None) -> Study:
    """Read and check a study file; every mistake is one line naming the file. ``profile``:
    one of the file's ``profiles`` (a mapping of top-level keys that replace the study's, e.g.
    ``quick: {concepts: [red], seeds: [0]}``)."""
    import yaml

    from erasekit.provenance import sha256_bytes

    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"study file not found: {path}")
    data = path.read_bytes()
    try:
        spec = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise _fail(path, f"invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise _fail(path, "a study must be a YAML mapping")
    unknown = sorted(set(spec) - STUDY_KEYS)
    if unknown:
        raise _fail(
            path, f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(STUDY_KEYS))})"
        )
    profiles = spec.pop("profiles", None) or {}
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(profiles) or "none"
            raise _fail(path, f"no profile {profile!r} (profiles: {known})")
        override = profiles[profile]
        if not isinstance(override, dict) or set(override) - (STUDY_KEYS - {"profiles"}):
            raise _fail(path, f"profile {profile!r} must map study keys to their values")
        spec = {**spec, **override, "name": f"{spec.get('name')} ({profile})"}
    for key in ("name", "base", "concepts", "models"):
        if not spec.get(key):
            raise _fail(path, f"'{key}' is missing or empty")
    concepts = spec["concepts"]
    if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
        raise _fail(path, "'concepts' must be a list of concept names or spec files")
    # spec files and attack inputs given relative to the study's folder
    concepts = [_concept_arg(path, c) for c in concepts]
    seeds = spec.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise _fail(path, "'seeds' must be a non-empty list of integers >= 0")
    if not isinstance(spec["models"], dict):
        raise _fail(path, "'models' must map row names to models")
    models: dict[str, ModelRow] = {}
    for name, value in spec["models"].items():
        models[str(name)] = _model_row(path, str(name), value, list(models))
    audit = spec.get("audit") or {}
    if not isinstance(audit, dict) or set(audit) - AUDIT_KEYS:
        raise _fail(path, f"'audit' takes {', '.join(sorted(AUDIT_KEYS))}")
    for key in ("captions", "fid_images"):  # local files: relative to the study's folder
        value = audit.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            audit[key] = str(path.parent / value)
    attacks = spec.get("attacks") or {}
    if not isinstance(attacks, dict) or not all(
        isinstance(v, dict | None) for v in attacks.values()
    ):
        raise _fail(path, "'attacks' must map attack names to their settings")
    for settings in attacks.values():
        for key in ("prompts", "images", "pairs"):
            value = (settings or {}).get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                settings[key] = str(path.parent / value)
    compare = spec.get("compare") or []
    pairs = []
    for pair in compare:
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in models for p in pair)):
            raise _fail(path, f"'compare' entries are [ROW, ROW] of listed rows, got {pair!r}")
        pairs.append((pair[0], pair[1]))
    claims = spec.get("claims") or []
    for claim in claims:
        if not (isinstance(claim, dict) and set(claim) <= {"a", "b", "metric", "says"}
                and {"a", "b", "metric"} <= set(claim) and claim["a"] in models
                and claim["b"] in models):  # fmt: skip
            raise _fail(path, "'claims' entries are {a: ROW, b: ROW, metric: KEY, says: TEXT}"
                        f" with listed rows, got {claim!r}")  # fmt: skip
    detectors = spec.get("detectors") or {}
    from dataclasses import fields

    from erasekit.detectors import DetectorOptions

    known = {f.name for f in fields(DetectorOptions)} - {"device"}
    if not isinstance(detectors, dict) or set(detectors) - known:
        raise _fail(path, f"'detectors' takes {', '.join(sorted(known))}")
    for key in (
        "nudenet_model",
        "clip_weights",
        "world_classifier",
        "clip_model",
        "inception_weights",
    ):
        value = detectors.get(key)  # local files: relative to the study's folder
        if (
            isinstance(value, str)
            and not Path(value).is_absolute()
            and (key != "clip_model" or value.endswith(".json"))
        ):
            detectors[key] = str(path.parent / value)
    columns = spec.get("columns")
    if columns is not None and not (
        isinstance(columns, list) and all(isinstance(c, str) for c in columns)
    ):
        raise _fail(path, "'columns' must be a list of metric keys")
    outputs = spec.get("outputs") or []
    if not (isinstance(outputs, list) and all(isinstance(o, str) and o for o in outputs)):
        raise _fail(path, "'outputs' must be a list of dotted keys of training.outputs")
    masks = []
    for pair in spec.get("masks") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in models for p in pair)):
            raise _fail(path, f"'masks' entries are [ROW, ROW] of listed rows, got {pair!r}")
        masks.append((pair[0], pair[1]))
    return Study(name=str(spec["name"]), base=str(spec["base"]), concepts=concepts, seeds=seeds,
                 models=models, audit=dict(audit),
                 attacks={k: dict(v or {}) for k, v in attacks.items()}, compare=pairs,
                 columns=columns, source=str(path), sha256=sha256_bytes(data),
                 description=str(spec.get("description", "")).strip(),
                 profile=profile, detectors=dict(detectors), claims=list(claims),
                 outputs=list(outputs), masks=masks)  # fmt: skip


def resolve_base(base: str, study_path: str) -> Path:
    if base.startswith("world:"):
        from erasekit.world import world_path

        return world_path(base.split(":", 1)[1])
    folder = Path(base)
    return folder if folder.is_absolute() else Path(study_path).parent / folder


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Runner:
    """Runs a study's cells into ``out`` (resumable) and writes its leaderboard."""

    def __init__(self, study: Study, out: str | Path, *, progress: bool = True) -> None:
        self.study, self.out, self.progress = study, Path(out), progress
        self.base = resolve_base(study.base, study.source)
        if not self.base.exists():
            raise ErasekitError(f"base model not found: {self.base}")
        self.built: dict[tuple[str, str, int], tuple[Path, str]] = {}
        self.hashes: dict[Path, str] = {}

    def content_hash(self, path: Path) -> str:
        from erasekit.provenance import model_content_hash

        if path not in self.hashes:
            self.hashes[path] = model_content_hash(path)
        return self.hashes[path]

    def model(self, row: ModelRow, concept, seed: int) -> tuple[Path, str]:
        """The row's model folder for (concept, seed) and its content key; builds erasures."""
        from erasekit.api import erase
        from erasekit.auditing import never_learned_model
        from erasekit.concepts import load_concept

        cached = self.built.get((row.name, concept.name, seed))
        if cached:
            return cached
        if row.kind == "original":
            path = self.base
        elif row.kind == "path":
            path = Path(str(row.path))
        elif row.kind == "never-learned":
            path = never_learned_model(concept)
            if path is None:
                raise ErasekitError(f"concept {concept.name!r} names no never-learned model")
        if row.kind not in ("erase", "guide"):
            if not path.exists():
                raise ErasekitError(f"{row.name}: model not found: {path}")
            result = (path, self.content_hash(path))
        else:
            if row.start:
                start_path, start_key = self.model(self.study.models[row.start], concept, seed)
            else:
                start_path, start_key = self.base, self.content_hash(self.base)
            if row.kind == "guide":
                result = self.guided(row, concept, seed, start_path, start_key)
            else:
                target = load_concept(row.concept) if row.concept else concept
                parts = [start_key, target.sha256, row.method, row.settings, seed]
                n = process_state().num_processes
                if n > 1:  # the global batch grows with the processes: another model
                    parts.append(f"processes={n}")
                key = _key(*parts)
                folder = self.out / "models" / f"{row.name}-{concept.name}-seed{seed}-{key}"
                if not (folder / "erasekit.json").is_file():  # erase writes it atomically
                    erase(start_path, target, str(row.method), folder,
                          settings={"seed": seed, **row.settings}, cache_dir=self.out / "cache",
                          progress=False)  # fmt: skip
                result = (folder, key)
        self.built[(row.name, concept.name, seed)] = result
        return result

    def guided(self, row: ModelRow, concept, seed: int, start: Path, start_key: str):
        """A guide row's folder: the start model's weights with the row's guidance.json."""
        from erasekit.guidance import read_guidance, write_guided_model

        guidance = {k: v for k, v in (row.guide or {}).items() if k != "embedding"}
        embedding = embedding_key = None
        if row.guide and row.guide.get("embedding"):
            name = row.guide["embedding"]
            source, embedding_key = self.model(self.study.models[name], concept, seed)
            learned = read_guidance(source)
            if learned is None or learned.embedding is None:
                raise ErasekitError(f"{row.name}: row {name!r} holds no learned embedding "
                                    "(a negative-embedding row does)")  # fmt: skip
            embedding = source / learned.embedding
            guidance = {"concept": learned.concept, **guidance, "embedding": learned.embedding}
        guidance.setdefault("concept", concept.phrase)
        key = _key(start_key, guidance, embedding_key)
        folder = self.out / "models" / f"{row.name}-{concept.name}-seed{seed}-{key}"
        state = process_state()
        if state.is_main_process and not folder.is_dir():
            write_guided_model(start, folder, guidance, embedding)
        state.wait_for_everyone()
        return folder, key

    def cell(self, row: ModelRow, concept, seed: int) -> dict[str, Any]:
        """Build and audit one cell, or reuse it when its key is unchanged."""
        from erasekit.api import audit
        from erasekit.detectors import DetectorOptions
        from erasekit.models import read_manifest

        folder = self.out / "cells" / concept.name / row.name / f"seed{seed}"
        record_file = folder / "cell.json"
        try:
            path, model_key = self.model(row, concept, seed)
            key = _key(
                model_key,
                concept.sha256,
                self.study.audit,
                self.study.attacks,
                self.study.detectors,
                seed,
            )
            if record_file.is_file():
                old = json.loads(record_file.read_text())
                if old.get("key") == key and old.get("status") == "ok":
                    return old
            started = time.perf_counter()
            audit(path, concept, folder / "audit", seed=seed, overwrite=True,
                  roles={"reference": None, "never-learned": None},
                  attacks=self.study.attacks or None, original=self.base, progress=False,
                  detectors=DetectorOptions(**self.study.detectors),
                  invocation={"bench": {"study": self.study.source, "row": row.name,
                                        "concept": concept.name, "seed": seed}},
                  **self.study.audit)  # fmt: skip
            record = {"status": "ok", "key": key, "model": str(path),
                      "audit_wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip
            if row.kind == "erase":  # the erasure's own wall time, as its manifest records it
                record["erase_wall_s"] = read_manifest(path).get("wall_time_s")
        except Exception as e:  # recorded, and the study goes on (Ctrl-C still stops it)
            record = {"status": "failed", "error": f"{type(e).__name__}: {first_line(e)}",
                      "traceback": traceback.format_exc(limit=5)}  # fmt: skip
        state = process_state()
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(record_file) as tmp:
                write_json(tmp, {"row": row.name, "concept": concept.name, "seed": seed,
                                 **record})  # fmt: skip
        state.wait_for_everyone()
        return record

    def run(self) -> dict[str, Any]:
        from erasekit.concepts import load_concept

        # Under accelerate launch / torchrun every process takes part in every cell: the
        # erasure trains data-parallel, the audit and its attacks share prompts and batches.
        main = process_state().is_main_process
        concepts = [load_concept(c) for c in self.study.concepts]
        cells = [(c, row, s) for c in concepts for s in self.study.seeds
                 for row in self.study.models.values()]  # fmt: skip
        started = time.perf_counter()
        with output_lock(self.out, enabled=main):
            for i, (concept, row, seed) in enumerate(cells, start=1):
                record = self.cell(row, concept, seed)
                if self.progress and main:
                    spent = time.perf_counter() - started
                    eta = spent / i * (len(cells) - i)
                    status = "ok" if record["status"] == "ok" else f"FAILED ({record['error']})"
                    print(f"bench: [{i}/{len(cells)}] {concept.name} {row.name} seed {seed}: "
                          f"{status}; {spent:.0f} s, about {eta:.0f} s left",
                          file=sys.stderr)  # fmt: skip
            board = leaderboard(self.study, self.out)
            # this run only: cells reused from earlier runs cost nothing here (cells_wall_s
            # sums every cell's own erase and audit time)
            board["provenance"]["last_run_wall_s"] = round(time.perf_counter() - started, 1)
            board["provenance"]["last_run_processes"] = process_state().num_processes
            if main:
                write_leaderboard(board, self.out)
        return board


# ----------------------------------------------------------------------------- pooling


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


def pool_curve(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Recovery curves over seeds, step by step: pooled hits / n with a Wilson interval (the
    steps every seed evaluated)."""
    from erasekit.stats import wilson_interval

    steps = sorted(set.intersection(*({p["step"] for p in c} for c in per_seed)))
    out = []
    for step in steps:
        points = [next(p for p in c if p["step"] == step) for c in per_seed]
        n = sum(p["n_images"] for p in points)
        hits = sum(round(p["value"] * p["n_images"]) for p in points)
        low, high = wilson_interval(hits, n)
        out.append({"step": step, "value": round(hits / n, 6),
                    "ci95": [round(low, 4), round(high, 4)], "n_images": n,
                    "per_seed": [p["value"] for p in points]})  # fmt: skip
    return out


def pool(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One metric over seeds: rates as pooled hits / n with a Wilson interval; means as the
    mean of the seeds' means with the range of the seeds' values (not a 95% interval)."""
    from erasekit.evaluation import RATE_INTERVAL
    from erasekit.stats import wilson_interval

    first = per_seed[0]
    values = [m["value"] for m in per_seed]
    n = sum(m["n_images"] for m in per_seed)
    if first["definition"].get("interval") == RATE_INTERVAL:
        hits = sum(round(m["value"] * m["n_images"]) for m in per_seed)
        low, high = wilson_interval(hits, n)
        value, interval = hits / n, "Wilson score 95% on hits / n pooled over seeds"
    elif len(per_seed) == 1:
        value, (low, high), interval = values[0], first["ci95"], first["definition"]["interval"]
    else:
        value, low, high = sum(values) / len(values), min(values), max(values)
        interval = "range of the per-seed values (not a 95% interval)"
    return {"metric": first["metric"], "value": round(value, 6),
            "ci95": [round(low, 4), round(high, 4)], "n_images": n, "n_seeds": len(per_seed),
            "per_seed": values, "higher_is_better": first["higher_is_better"],
            "definition": {**first["definition"], "interval": interval}}  # fmt: skip


def leaderboard(study: Study, out: Path) -> dict[str, Any]:
    """The leaderboard document from the cells' result files (schema ``erasekit.leaderboard``)."""
    from erasekit.concepts import load_concept
    from erasekit.methods.salun import MASK_OVERLAP_DEFINITIONS
    from erasekit.provenance import git_commit, library_versions

    names = [load_concept(c).name for c in study.concepts]
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in _cells(out):
        if c["row"] in study.models and c["concept"] in names:
            by[(c["concept"], c["row"])].append(c)
    concepts: dict[str, Any] = {}
    for concept in names:
        rows = {}
        for name in study.models:
            got = sorted(by.get((concept, name), []), key=lambda c: c["seed"])
            ok = [c for c in got if c["status"] == "ok" and c["seed"] in study.seeds]
            per_key: dict[str, list[dict]] = defaultdict(list)
            per_attack: dict[str, list[list[dict]]] = defaultdict(list)
            for c in ok:
                cell_dir = out / "cells" / concept / name / f"seed{c['seed']}"
                doc = json.loads((cell_dir / "audit" / "results.json").read_text())
                for key, m in _metrics(doc).items():
                    per_key[key].append(m)
                for attack, curve in _curves(doc).items():
                    per_attack[attack].append(curve)
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
            for key, m in rows[a]["metrics"].items():
                if m["metric"] != "concept_rate" or "[" in key or primary is None:
                    continue  # primary-protocol concept rates, attacked ones included
                attack, plain = split_attack(key)
                prompt_set = plain.split("/", 1)[1]
                seeds = [s for s in rows[a]["seeds_ok"] if s in rows[b]["seeds_ok"]]
                pairs = [(out / "cells" / concept / a / f"seed{s}",
                          out / "cells" / concept / b / f"seed{s}") for s in seeds]  # fmt: skip
                model = f"{attack}:audited" if attack else "audited"
                d = paired_difference(pairs, prompt_set, primary, model=model)
                if d:
                    differences.append({"a": a, "b": b, "metric": key, **d})
        claims = [check_claim(c, rows, differences) for c in study.claims]
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
            "pooling": "rates: hits / n pooled over seeds, Wilson 95%; per_seed: each seed's "
            "value; attacked metrics are '<attack>:<metric>' (the audit's final attack step)",
            "curves": "each row's concept rate on the attack's curve prompts (primary protocol) "
            "after every eval_every steps of a recovery attack, pooled over seeds per step as "
            "hits / n, Wilson 95%",
            **({"masks": MASK_OVERLAP_DEFINITIONS} if study.masks else {}),
            "differences": "a − b on the same images' prompts, k and seeds (primary protocol), "
            "percentile bootstrap 95% over (seed, prompt) groups, 2000 resamples, seed 0; on an "
            "attacked metric against the never-learned row: the residual memory",
        },
        "provenance": {
            "erasekit_version": library_versions()["erasekit"],
            "git_commit": git_commit(),
            # each cell's erase and audit wall time, measured when it ran (resumes included)
            "cells_wall_s": round(
                sum(
                    (c.get("erase_wall_s") or 0) + c.get("audit_wall_s", 0)
                    for cells in by.values()
                    for c in cells
                    if c["status"] == "ok"
                ),
                1,
            ),
        },  # fmt: skip
    }


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
        return json.loads(f.read_text())["evaluation"]["primary_protocol"]
    return None


def check_claim(claim: dict[str, str], rows: dict[str, Any], differences: list[dict]) -> dict:
    """Whether "a is better than b on metric" holds, from the numbers: the paired difference's
    95% interval when the study compares the pair on that metric, else the two pooled
    intervals (non-overlap: a stricter rule). ``holds`` / ``reversed`` / ``not resolved``
    (the intervals leave either order possible) / ``not measured``."""
    a, b, key = claim["a"], claim["b"], claim["metric"]
    out = {**claim, "status": "not measured"}
    ma, mb = rows[a]["metrics"].get(key), rows[b]["metrics"].get(key)
    if not (ma and mb):
        return out
    sign = 1 if ma["higher_is_better"] else -1  # better = higher, or lower
    pair = next((d for d in differences if (d["a"], d["b"], d["metric"]) == (a, b, key)), None)
    if pair is not None:
        low, high = pair["ci95"]
        evidence = f"paired a − b {pair['value']:+.2f} [{low:+.2f}, {high:+.2f}]"
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
    else:
        status = "not resolved"
    return {**out, "status": status, "evidence": evidence}


def _samples(path: Path) -> list[dict[str, Any]]:
    """A cell's samples.jsonl, read once per version of the file (every compared metric of a
    pair reads the same two files)."""
    return _read_samples(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _read_samples(path: Path, mtime_ns: int) -> list[dict[str, Any]]:
    return read_jsonl(path)


def paired_difference(
    pairs: list[tuple[Path, Path]], prompt_set: str, protocol: str, model: str = "audited"
) -> dict[str, Any] | None:
    """Mean of (flag_a − flag_b) over images matched by seed, prompt and k (each pair: two
    rows' cells of one seed; ``model``: the samples' role, e.g. ``finetune:audited`` for the
    images after an attack), with a percentile bootstrap interval resampling (seed, prompt)
    groups; None without matched images."""
    from erasekit.stats import bootstrap_interval

    groups: dict[tuple, list[float]] = defaultdict(list)
    for a, b in pairs:
        fa = {(s["prompt_index"], s["k"], s["seed"]): float(s["flags"][protocol])
              for s in _samples(a / "audit" / "samples.jsonl")
              if s.get("model") == model and s["prompt_set"] == prompt_set}  # fmt: skip
        for s in _samples(b / "audit" / "samples.jsonl"):
            key = (s["prompt_index"], s["k"], s["seed"])
            if s.get("model") == model and s["prompt_set"] == prompt_set and key in fa:
                groups[(a.name, key[0])].append(fa[key] - float(s["flags"][protocol]))
    diffs = [d for g in groups.values() for d in g]
    if not diffs:
        return None
    low, high = bootstrap_interval(list(groups.values()), 2000, seed=0)
    return {"value": round(sum(diffs) / len(diffs), 6), "ci95": [round(low, 4), round(high, 4)],
            "n_pairs": len(diffs)}  # fmt: skip


# ----------------------------------------------------------------------------- rendering


def _fmt(m: dict[str, Any] | None) -> str:
    if not m:
        return "—"
    seeds = "/".join(f"{v:.2f}" for v in m["per_seed"]) if m["n_seeds"] > 1 else ""
    return (f"{m['value']:.2f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] (n={m['n_images']}"
            f"{'; ' + seeds if seeds else ''})")  # fmt: skip


def _columns(board: dict[str, Any], rows: dict[str, Any]) -> list[str]:
    """The study's ``columns``, else every metric key the rows have, in order of appearance."""
    return board["columns"] or list(dict.fromkeys(k for r in rows.values() for k in r["metrics"]))


def render_markdown(board: dict[str, Any]) -> str:
    study = board["study"]
    lines = [f"# Leaderboard: {study['name']} (generated by erasekit bench from "
             f"{Path(study['source']).name}, sha256 {study['sha256'][:12]})", ""]  # fmt: skip
    if study["description"]:
        lines += [study["description"], ""]
    lines += [f"Base model: `{study['base']}`; seeds {study['seeds']}; audit settings "
              f"`{json.dumps(study['audit'], sort_keys=True)}`; attacks "
              f"`{json.dumps(study['attacks'], sort_keys=True)}`.", ""]  # fmt: skip
    for concept, entry in board["concepts"].items():
        rows = entry["rows"]
        keys = _columns(board, rows)
        lines += [f"## {concept}", "", "| model | " + " | ".join(keys) + " | erase wall s |",
                  "|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
        for name, row in rows.items():
            wall = row["erase_wall_s"]
            cells = " | ".join(_fmt(row["metrics"].get(k)) for k in keys)
            failed = (
                f" (FAILED seeds {[f['seed'] for f in row['failed']]})" if row["failed"] else ""
            )
            walls = "/".join(f"{w:.0f}" if w >= 10 else f"{w:.1f}" for w in wall) or "—"
            lines.append(f"| {name}{failed} | {cells} | {walls} |")
        lines.append("")
        declared = study.get("outputs") or []
        if any(row.get("outputs") for row in rows.values()):
            lines += ["Erasure outputs (each erased model's `erasekit.json` training.outputs; one"
                      " value per seed):", "", "| model | " + " | ".join(declared) + " |",
                      "|---|" + "---|" * len(declared)]  # fmt: skip
            for name, row in rows.items():
                if row.get("outputs"):
                    values = [row["outputs"].get(k) for k in declared]
                    lines.append(
                        f"| {name} | "
                        + " | ".join(
                            "/".join(_value_text(x) for x in v) if v else "—" for v in values
                        )
                        + " |"
                    )
            lines.append("")
        for attack in _attacks_with_curves(rows):
            steps = sorted({p["step"] for r in rows.values() for p in r["curves"].get(attack, [])})
            lines += [f"Recovery under `{attack}` (concept rate after each number of steps):", "",
                      "| model | " + " | ".join(str(s) for s in steps) + " |",
                      "|---|" + "---|" * len(steps)]  # fmt: skip
            for name, row in rows.items():
                at = {p["step"]: p for p in row["curves"].get(attack, [])}
                lines.append(f"| {name} | " + " | ".join(
                    f"{at[s]['value']:.2f} [{at[s]['ci95'][0]:.2f}, {at[s]['ci95'][1]:.2f}]"
                    if s in at else "—" for s in steps) + " |")  # fmt: skip
            lines.append("")
        if entry.get("masks"):
            lines += ["Masks compared (A against B, one line per seed; overlap = share of A's "
                      "weights B also selects, chance = B's density; seconds: each mask's own "
                      "cost):", "", f"| {' | '.join(MASK_HEADER)} |",
                      "|---" * len(MASK_HEADER) + "|"]  # fmt: skip
            lines += [f"| {' | '.join(_mask_cells(m))} |" for m in entry["masks"]] + [""]
        if entry["differences"]:
            lines += ["Paired differences (a − b on the same images):", ""]
        for d in entry["differences"]:
            lines.append(f"- {d['a']} − {d['b']} on {d['metric']}: {d['value']:+.2f} "
                         f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] ({d['n_pairs']} paired "
                         "images)")  # fmt: skip
        if entry.get("claims"):
            lines += ["", "Orderings (from the numbers above; 95% intervals):", ""]
            for c in entry["claims"]:
                says = f" — {c['says']}" if c.get("says") else ""
                lines.append(f"- {c['a']} better than {c['b']} on {c['metric']}{says}: "
                             f"**{c['status']}**" + (f" ({c['evidence']})" if "evidence" in c
                                                     else ""))  # fmt: skip
        failures = [f"- {name} seed {f['seed']} FAILED: {f['error']}"
                    for name, row in rows.items() for f in row["failed"]]  # fmt: skip
        lines += ([""] if entry["differences"] and failures else []) + failures
        lines.append("")
    lines += ["## Definitions", ""]
    lines += [f"- {k}: {v}" for k, v in board["definitions"].items()]
    first = next((m for e in board["concepts"].values() for r in e["rows"].values()
                  for m in r["metrics"].values()), None)  # fmt: skip
    if first:
        lines.append(f"- detector: {first['definition'].get('detector')} "
                     f"({first['definition'].get('detector_version')})")  # fmt: skip
    lines += ["", "## Models (from the study file)", ""]
    lines += [f"- {n}: `{json.dumps(m, sort_keys=True)}`" for n, m in study["models"].items()]
    return "\n".join(lines) + "\n"


def _mask_cells(m: dict[str, Any]) -> list[str]:
    def num(x: Any, digits: int) -> str:
        return "—" if x is None else f"{x:.{digits}f}"

    return [m["a"], m["b"], str(m["seed"]),
            f"{m['density_a']:.3f} / {m['density_b']:.3f}", num(m["overlap"], 3),
            f"{m['chance_overlap']:.3f}", num(m["jaccard"], 3),
            f"{m['tensors_touched_a']:.2f} / {m['tensors_touched_b']:.2f}",
            "—" if m["units_a"] is None else str(m["units_a"]),
            f"{num(m['seconds_a'], 1)} / {num(m['seconds_b'], 1)}"]  # fmt: skip


MASK_HEADER = ["A", "B", "seed", "density A / B", "overlap", "chance", "Jaccard",
               "tensors touched A / B", "units A", "s A / B"]  # fmt: skip


def _attacks_with_curves(rows: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(a for r in rows.values() for a in r.get("curves", {})))


def _figures(rows: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, PNG data URI): a recovery-curve plot per recovery attack (one line per row)
    and an ASR bar plot per prompt attack (pre-ASR and ASR per row, 95% whiskers)."""
    from erasekit.reporting import bar_plot_uri, line_plot_uri

    figures = []
    for attack in _attacks_with_curves(rows):
        series = [(name, row["curves"][attack]) for name, row in rows.items()
                  if row["curves"].get(attack)]  # fmt: skip
        title = f"recovery under '{attack}' (pooled, 95% bands)"
        figures.append((f"recovery under {attack}", line_plot_uri(series, title)))
    asr = defaultdict(dict)  # attack -> (statistic, row) -> metric
    for name, row in rows.items():
        for key, m in row["metrics"].items():
            attack, plain = split_attack(key)
            statistic = plain.split("/", 1)[0]
            if attack and statistic in ("pre_asr", "asr"):
                asr[attack][(statistic, name)] = m
    for attack, found in asr.items():
        names = [n for n in rows if any((s, n) in found for s in ("pre_asr", "asr"))]
        groups = [(label, [found.get((statistic, n)) for n in names])
                  for statistic, label in (("pre_asr", "pre-ASR"), ("asr", "ASR"))]  # fmt: skip
        figures.append((f"ASR under {attack}",
                        bar_plot_uri(names, groups, "share of prompts",
                                     f"'{attack}': pre-ASR and ASR (95% intervals)")))  # fmt: skip
    return figures


_SORT_JS = """
function sortBy(table, col, dir) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const val = r => {
    const v = r.cells[col].dataset.value;
    return v === undefined || v === "" ? NaN : +v;
  };
  rows.sort((a, b) => { const x = val(a), y = val(b);
    if (isNaN(x)) return 1; if (isNaN(y)) return -1; return dir * (x - y); });
  rows.forEach(r => body.appendChild(r));
  table.dataset.sortedBy = table.tHead.rows[0].cells[col].dataset.key;
  table.dataset.sortDir = dir;
}
document.querySelectorAll("table.board").forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((th, col) => {
    if (!th.dataset.key) return;
    th.addEventListener("click", () => {
      const again = table.dataset.sortedBy === th.dataset.key;
      sortBy(table, col, again ? -table.dataset.sortDir : 1);
    });
  });
  const wanted = decodeURIComponent(location.hash.replace(/^#sort=/, ""));
  const th = Array.from(table.tHead.rows[0].cells).find(c => c.dataset.key === wanted);
  if (th) sortBy(table, th.cellIndex, 1);
});
const figures = Array.from(document.querySelectorAll("img.figure"));
Promise.all(figures.map(img => img.decode().catch(() => null))).then(() => {
  document.body.dataset.figuresShown = figures.filter(img => img.naturalWidth > 0).length;
  document.body.dataset.ready = "1";
});
"""


def render_html(board: dict[str, Any]) -> str:
    """A self-contained page: one table per concept, sortable by clicking a column (or by
    ``#sort=<metric key>`` in the address), each cell's title holding its definition; below
    it the recovery curves and ASR bars. The leaderboard shows no generated images (only
    plots of numbers), so there is nothing to censor."""
    from html import escape

    study = board["study"]
    parts = [f"<h1>Leaderboard: {escape(study['name'])}</h1>",
             f"<p>Study <code>{escape(Path(study['source']).name)}</code> (sha256 "
             f"{study['sha256'][:12]}); base <code>{escape(study['base'])}</code>; seeds "
             f"{study['seeds']}. Values: pooled over seeds [95% interval] (n images); click a "
             "column to sort.</p>"]  # fmt: skip
    for concept, entry in board["concepts"].items():
        rows = entry["rows"]
        keys = _columns(board, rows)
        head = "".join(f'<th data-key="{escape(k)}">{escape(k)}</th>' for k in keys)
        parts += [f"<h2>{escape(concept)}</h2>",
                  f'<table class="board" data-concept="{escape(concept)}">',
                  f"<thead><tr><th>model</th>{head}</tr></thead><tbody>"]  # fmt: skip
        for name, row in rows.items():
            cells = []
            for k in keys:
                m = row["metrics"].get(k)
                if m is None:
                    cells.append('<td data-value="">—</td>')
                    continue
                title = escape(json.dumps(m["definition"], sort_keys=True, default=str))
                cells.append(
                    f'<td data-value="{m["value"]}" title="{title}">{escape(_fmt(m))}</td>'
                )
            failed = " FAILED" if row["failed"] else ""
            parts.append(f'<tr data-row="{escape(name)}"><td>{escape(name)}{failed}</td>'
                         f"{''.join(cells)}</tr>")  # fmt: skip
        parts.append("</tbody></table>")
        if entry.get("masks"):
            head = "".join(f"<th>{escape(h)}</th>" for h in MASK_HEADER)
            body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in _mask_cells(m))
                           + "</tr>" for m in entry["masks"])  # fmt: skip
            parts.append(f"<p>Masks compared (overlap = share of A's weights B also selects; "
                         f"chance = B's density)</p><table class='masks'><thead><tr>{head}"
                         f"</tr></thead><tbody>{body}</tbody></table>")  # fmt: skip
        for caption, uri in _figures(rows):
            parts.append(f'<figure><img class="figure" alt="{escape(caption)}" src="{uri}">'
                         f"<figcaption>{escape(caption)} ({escape(concept)})</figcaption>"
                         "</figure>")  # fmt: skip
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
             "th{cursor:pointer}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(study['name'])}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}"
            f"<script>{_SORT_JS}</script></body></html>\n")  # fmt: skip


def write_leaderboard(board: dict[str, Any], out: Path) -> None:
    with atomic_file(out / "leaderboard.json") as tmp:
        write_json(tmp, board)
    with atomic_file(out / "leaderboard.md") as tmp:
        tmp.write_text(render_markdown(board))
    with atomic_file(out / "leaderboard.html") as tmp:
        tmp.write_text(render_html(board))


def report(out: str | Path) -> dict[str, Any]:
    """Re-pool and re-render the leaderboard of a study folder from its result files."""
    out = Path(out)
    record = out / "leaderboard.json"
    if not record.is_file():
        raise ErasekitError(f"no leaderboard.json in {out} (run 'erasekit bench run' first)")
    recorded = json.loads(record.read_text())["study"]
    study = load_study(recorded["source"], recorded.get("profile"))
    board = leaderboard(study, out)
    write_leaderboard(board, out)
    return board


def run_study(
    study: str | Path, out: str | Path, *, profile: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) a study file (or one of its profiles) into ``out``; returns the
    leaderboard document."""
    return Runner(load_study(study, profile), out, progress=progress).run()
