"""Study files: their rows, settings and checks (one-line errors naming the file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError

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


def _row_pairs(path: Path, key: str, value: Any, models: dict) -> list[tuple[str, str]]:
    """A study key listing [ROW, ROW] pairs of listed rows (``compare``, ``masks``)."""
    pairs = []
    for pair in value if isinstance(value, list) else [value]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in models for p in pair)):
            raise _fail(path, f"'{key}' entries are [ROW, ROW] of listed rows, got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _concept_arg(path: Path, concept: str) -> str:
    """A concept name, or a spec file given relative to the study's folder."""
    relative = concept.endswith((".yaml", ".yml")) and not Path(concept).is_absolute()
    return str(path.parent / concept) if relative else concept


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
        from erasekit.registry import suggest

        hint = suggest(str(unknown[0]), sorted(STUDY_KEYS))
        raise _fail(path, f"unknown keys {', '.join(map(str, unknown))}{';' if hint else ''}"
                    f"{hint} (known: {', '.join(sorted(STUDY_KEYS))})")  # fmt: skip
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
    pairs = _row_pairs(path, "compare", compare, models)
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
    if (detectors.get("inception_weights") or detectors.get("fid_features") == "world") and not (
        audit.get("fid_images")
    ):  # a cell is audited without the reference model, so FID/KID need a folder of images
        raise _fail(path, "FID/KID in a study need audit: {fid_images: DIR} (its cells are "
                    "audited without the reference model)")  # fmt: skip
    columns = spec.get("columns")
    if columns is not None and not (
        isinstance(columns, list) and all(isinstance(c, str) for c in columns)
    ):
        raise _fail(path, "'columns' must be a list of metric keys")
    outputs = spec.get("outputs") or []
    if not (isinstance(outputs, list) and all(isinstance(o, str) and o for o in outputs)):
        raise _fail(
            path, "'outputs' must be a list of dotted keys of training.outputs or log:FIELD"
        )
    masks = _row_pairs(path, "masks", spec.get("masks") or [], models)
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
