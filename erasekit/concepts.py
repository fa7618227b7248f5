"""Prompt sets (plain text, I2P CSV, UnlearnDiffAtk CSV) and concept specs (YAML)."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from erasekit.errors import ErasekitError, UnknownNameError
from erasekit.provenance import sha256_bytes
from erasekit.registry import suggest

PROMPTS_DIR = Path(__file__).parent / "prompts"
CONCEPTS_DIR = PROMPTS_DIR / "concepts"

# Column names of the public formats. I2P: prompt, sd_seed, sd_guidance_scale, categories,
# nudity_percentage, ...; UnlearnDiffAtk: prompt, evaluation_seed, evaluation_guidance, case_number;
# COCO captions (ESD/UCE's coco_30k.csv): image_id, source, prompt, evaluation_seed; a raw COCO
# caption export names its text column "caption".
_SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
_GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance")
_ID_COLUMNS = ("case_number", "image_id", "id")
_PROMPT_COLUMNS = ("prompt", "caption")
_PROMPT_FILE_SUFFIXES = (".txt", ".csv")
KINDS = ("nudity", "object", "style", "attribute")
SCALES = ("real", "world")


@dataclass(frozen=True)
class PromptEntry:
    """One prompt; seed and guidance are set when the prompt set prescribes them."""

    prompt: str
    id: str
    seed: int | None = None
    guidance: float | None = None
    categories: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSet:
    name: str
    source: str  # file path, or "inline"
    format: str  # text | csv | i2p | unlearndiffatk | coco | inline
    sha256: str  # of the file's bytes, or of the inline prompts joined by newlines
    entries: tuple[PromptEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.entries]

    def limit(self, n: int | None) -> PromptSet:
        """The first n prompts (a quick run); the hash and name say it is a subset."""
        if n is None or n >= len(self.entries):
            return self
        if n < 1:
            raise ErasekitError(f"--limit must be at least 1, got {n}")
        return PromptSet(
            f"{self.name}[:{n}]", self.source, self.format, self.sha256, self.entries[:n]
        )

    def describe(self) -> dict[str, Any]:
        """The fields every result records about its prompt set."""
        return {
            "name": self.name,
            "source": self.source,
            "format": self.format,
            "sha256": self.sha256,
            "n_prompts": len(self.entries),
        }


def prompt_set_from_list(prompts: list[str], name: str = "inline") -> PromptSet:
    cleaned = [p.strip() for p in prompts]
    if not cleaned or any(not p for p in cleaned):
        raise ErasekitError(f"prompt set {name!r} is empty or holds an empty prompt")
    digest = sha256_bytes("\n".join(cleaned).encode())
    entries = tuple(PromptEntry(prompt=p, id=str(i)) for i, p in enumerate(cleaned))
    return PromptSet(name, "inline", "inline", digest, entries)


def _first(row: dict[str, str], columns: tuple[str, ...]) -> tuple[str | None, str | None]:
    for c in columns:
        if c in row and row[c] is not None and row[c].strip() != "":
            return c, row[c].strip()
    return None, None


MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes without wrapping


def check_seed(seed: Any, what: str = "seed") -> int:
    """A seed in [0, MAX_SEED], else one clear line."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ErasekitError(f"{what} must be an integer in [0, 2^63-1], got {seed!r}")
    return seed


def _csv_seed(text: str, where: str) -> int:
    """A CSV seed: an integer, or a float with an integral value ("42.0"), in range."""
    try:
        return check_seed(int(text), where)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ErasekitError(f"{where} is not a number: {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise ErasekitError(f"{where} must be an integer in [0, 2^63-1], got {text!r}")
    return check_seed(int(value), where)


def _read_csv(path: Path, text: str) -> tuple[str, list[PromptEntry]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    text_column = next((c for c in _PROMPT_COLUMNS if c in columns), None)
    if text_column is None:
        raise ErasekitError(f"{path}: CSV has no 'prompt' (or 'caption') column (columns: "
                            f"{', '.join(columns)})")  # fmt: skip
    if "evaluation_seed" in columns and "case_number" in columns:
        fmt = "unlearndiffatk"
    elif "sd_seed" in columns or "sd_guidance_scale" in columns:
        fmt = "i2p"
    elif "image_id" in columns:
        fmt = "coco"
    else:
        fmt = "csv"
    entries = []
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v if isinstance(v, str) else "") for k, v in raw.items()}
        prompt = row.get(text_column, "").strip()
        if not prompt:
            raise ErasekitError(f"{path}:{line}: empty prompt")
        seed_col, seed = _first(row, _SEED_COLUMNS)
        guid_col, guidance = _first(row, _GUIDANCE_COLUMNS)
        _, ident = _first(row, _ID_COLUMNS)
        where = f"{path}:{line}"
        seed_value = _csv_seed(seed, f"{where}: {seed_col}") if seed is not None else None
        guidance_value = None
        if guidance is not None:
            try:
                guidance_value = float(guidance)
            except ValueError:
                raise ErasekitError(f"{where}: {guid_col} is not a number: {guidance!r}") from None
            if not math.isfinite(guidance_value):
                raise ErasekitError(f"{where}: {guid_col} must be finite, got {guidance!r}")
        cats = tuple(c.strip() for c in row.get("categories", "").split(",") if c.strip())
        used = {text_column, "categories", *_SEED_COLUMNS, *_GUIDANCE_COLUMNS, *_ID_COLUMNS}
        extra = {k: v for k, v in row.items() if k and k not in used}
        entries.append(
            PromptEntry(
                prompt=prompt,
                id=ident if ident is not None else str(line - 2),
                seed=seed_value,
                guidance=guidance_value,
                categories=cats,
                extra=extra,
            )
        )
    return fmt, entries


def read_prompt_set(path: str | Path, name: str | None = None) -> PromptSet:
    """Read a prompt file: .txt (one prompt per line; blank lines and '#' lines skipped) or .csv."""
    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"prompt file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ErasekitError(f"{path}: not UTF-8 text") from None
    if "\x00" in text:
        raise ErasekitError(f"{path}: not a text file (it contains NUL bytes)")
    if path.suffix.lower() == ".csv":
        fmt, entries = _read_csv(path, text)
    else:
        fmt = "text"
        lines = [ln.strip() for ln in text.splitlines()]
        prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        entries = [PromptEntry(prompt=p, id=str(i)) for i, p in enumerate(prompts)]
    if not entries:
        raise ErasekitError(f"prompt file is empty: {path}")
    return PromptSet(name or path.stem, str(path), fmt, sha256_bytes(data), tuple(entries))


def resolve_prompts(arg: str) -> PromptSet:
    """The CLI's FILE_OR_TEXT: an existing file is read; anything else is one literal prompt."""
    candidate = Path(arg)
    if candidate.is_file():
        return read_prompt_set(candidate)
    if candidate.is_dir():
        raise ErasekitError(f"--prompts {arg} is a folder; give a prompt file (.txt/.csv) or a"
                            " prompt")  # fmt: skip
    if candidate.suffix.lower() in _PROMPT_FILE_SUFFIXES and "\n" not in arg:
        raise ErasekitError(f"prompt file not found: {arg}")
    return prompt_set_from_list([arg], name="inline")


# ----------------------------------------------------------------------------- concept specs


@dataclass(frozen=True)
class Concept:
    """What to erase and how to judge it: prompt sets plus the detector protocol."""

    name: str
    kind: str
    description: str
    forget: PromptSet
    surrogate: str
    retain: PromptSet
    evaluation: dict[str, PromptSet]
    detector: dict[str, Any]
    path: str
    sha256: str
    # benign prompts for simulated downstream fine-tuning (ResAlign): NOT the retain set the
    # audit's fine-tuning attack trains on, so a defence is not tested on its training data
    benign: PromptSet | None = None
    # Ring-A-Bell's concept vector: a CSV of prompt pairs with / without the concept
    pairs: str | None = None
    # "world": a ShapesWorld concept (methods and attacks pick world-scale presets), else "real"
    scale: str = "real"
    # reports censor images a detector flags for it (spec default: true)
    sensitive: bool = True
    # a model that never learned the concept (a path, or world:<model> for a shipped world model)
    never_learned: str | None = None
    # several concepts erased together (``combine_concepts``): each one's spec, in order
    parts: tuple[Concept, ...] = ()
    # the phrasings presets are chosen on and methods validate on (``concept`` and ``retain``
    # sets): no reported metric uses them, so a number is never measured where it was tuned
    tuning: dict[str, PromptSet] = field(default_factory=dict)

    @property
    def words(self) -> list[str]:
        """The concept's name, or each combined concept's."""
        return [p.name for p in self.parts] or [self.name]

    @property
    def phrase(self) -> str:
        """The concept's words as a hand-written negative prompt would name them."""
        return ", ".join(w.replace("-", " ").replace("_", " ") for w in self.words)

    def describe(self) -> dict[str, Any]:
        if self.parts:
            return {"name": self.name, "kind": self.kind, "combined": True,
                    "forget": self.forget.describe(), "retain": self.retain.describe(),
                    "evaluation": {k: v.describe() for k, v in self.evaluation.items()},
                    "scale": self.scale, "sensitive": self.sensitive,
                    "parts": [p.describe() for p in self.parts]}  # fmt: skip
        return {
            "name": self.name,
            "kind": self.kind,
            "spec": self.path,
            "spec_sha256": self.sha256,
            "surrogate": self.surrogate,
            "detector": self.detector,
            "forget": self.forget.describe(),
            "retain": self.retain.describe(),
            "evaluation": {k: v.describe() for k, v in self.evaluation.items()},
            "benign": self.benign.describe() if self.benign is not None else None,
            "pairs": self.pairs,
            "scale": self.scale,
            "sensitive": self.sensitive,
            "never_learned": self.never_learned,
            "tuning": {k: v.describe() for k, v in self.tuning.items()},
        }


def available_concepts() -> list[str]:
    return sorted(p.stem for p in CONCEPTS_DIR.glob("*.yaml"))


def _resolve_prompt_file(spec_path: Path, value: str) -> Path:
    file = Path(value)
    if not file.is_absolute():
        local = spec_path.parent / file
        file = local if local.exists() else PROMPTS_DIR / file
    return file


def expand_templates(templates: PromptSet, fill: list[str], name: str) -> PromptSet:
    """Every template ("{}" marks the slot) filled with every value, templates outermost."""
    if not fill or any(not isinstance(v, str) or not v.strip() for v in fill):
        raise ErasekitError(f"{name}: 'fill' must be a non-empty list of words")
    missing = [t for t in templates.prompts if "{}" not in t]
    if missing:
        raise ErasekitError(f"{templates.source}: template without '{{}}': {missing[0]!r}")
    prompts = [t.replace("{}", v.strip()) for t in templates.prompts for v in fill]
    expanded = prompt_set_from_list(prompts, name=name)
    source = f"{templates.source} (sha256 {templates.sha256[:12]}) filled with {fill}"
    return PromptSet(name, source, "template", expanded.sha256, expanded.entries)


def _prompt_set_field(spec_path: Path, key: str, value: Any) -> PromptSet:
    name = f"{spec_path.stem}/{key}"
    if isinstance(value, dict):
        if set(value) != {"template", "fill"}:
            raise ErasekitError(f"{spec_path}: '{key}' as a mapping needs exactly 'template' "
                                "(a template file) and 'fill' (a word or a list)")  # fmt: skip
        fill = value["fill"] if isinstance(value["fill"], list) else [value["fill"]]
        templates = read_prompt_set(_resolve_prompt_file(spec_path, str(value["template"])))
        return expand_templates(templates, fill, name)
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ErasekitError(f"{spec_path}: '{key}' must be a list of prompt strings")
        return prompt_set_from_list(value, name=name)
    if isinstance(value, str):
        return read_prompt_set(_resolve_prompt_file(spec_path, value), name=name)
    raise ErasekitError(
        f"{spec_path}: '{key}' must be a prompt file path, a list of prompts or a "
        "{template, fill} mapping"
    )


def is_world_concept(concept: Concept | None) -> bool:
    """Whether the spec declares ``scale: world`` (ShapesWorld presets apply)."""
    return concept is not None and concept.scale == "world"


def names_concept(prompt: str, concept: Concept) -> bool:
    """Whether ``prompt`` names ``concept``: its name or its detector's target as a word."""
    words = {concept.name, str(concept.detector.get("target") or concept.name)}
    return any(re.search(rf"\b{re.escape(w)}\b", prompt, re.IGNORECASE) for w in words)


def _union(name: str, sets: list[PromptSet], keep=lambda prompt: True) -> PromptSet:
    """The sets' prompts in order, each once (those ``keep`` accepts)."""
    prompts = list(dict.fromkeys(p for ps in sets for p in ps.prompts if keep(p)))
    if not prompts:
        raise ErasekitError(f"{name}: no prompt is left for the combined concepts")
    union = prompt_set_from_list(prompts, name=name)
    source = "union of " + ", ".join(f"{ps.name} (sha256 {ps.sha256[:12]})" for ps in sets)
    return PromptSet(name, source, "union", union.sha256, union.entries)


def combine_concepts(parts: list[Concept]) -> Concept:
    """Several concepts erased in one run (``--concept red,circle``): forget = every part's
    forget prompts; retain = every part's retain prompts that name none of the parts; each
    part's evaluation sets as ``<part>/<set>`` (its retain set replaced by the combined one).
    No model never learned them all, so none is named; no benign set or Ring-A-Bell pairs."""
    names = [p.name for p in parts]
    if len(parts) < 2:
        raise ErasekitError("combining concepts needs at least two")
    if len(set(names)) != len(names):
        raise ErasekitError(f"concept list names one concept twice: {', '.join(names)}")
    if any(p.parts for p in parts):
        raise ErasekitError("a concept list cannot hold an already combined concept")
    name = "+".join(names)
    kinds = {p.kind for p in parts}
    surrogates = {p.surrogate for p in parts}
    retain = _union(f"{name}/retain", [p.retain for p in parts],
                    keep=lambda q: not any(names_concept(q, p) for p in parts))  # fmt: skip
    evaluation = {f"{p.name}/{k}": v for p in parts for k, v in p.evaluation.items()
                  if v.sha256 != p.retain.sha256}  # fmt: skip
    evaluation["retain"] = retain
    return Concept(
        name=name,
        kind=kinds.pop() if len(kinds) == 1 else "mixed",
        description="; ".join(p.description or p.name for p in parts),
        forget=_union(f"{name}/forget", [p.forget for p in parts]),
        # one surrogate when the parts share it; else methods that need one ask for it
        surrogate=surrogates.pop() if len(surrogates) == 1 else "",
        retain=retain,
        evaluation=evaluation,
        detector=dict(parts[0].detector),
        path=",".join(p.path for p in parts),
        sha256=sha256_bytes("\n".join(p.sha256 for p in parts).encode()),
        scale="world" if all(p.scale == "world" for p in parts) else "real",
        sensitive=any(p.sensitive for p in parts),
        parts=tuple(parts),
    )


CONCEPT_KEYS = {"name", "kind", "description", "forget", "surrogate", "retain", "evaluation",
                "detector", "benign", "pairs", "scale", "sensitive", "never_learned",
                "tuning"}  # fmt: skip


def load_concept(name_or_path: str) -> Concept:
    """A built-in concept by name (see `erasekit concepts`) or a YAML spec file; a comma list
    of them (``red,circle``) is the concepts combined (``combine_concepts``)."""
    if "," in name_or_path and not Path(name_or_path).is_file():
        items = [n.strip() for n in name_or_path.split(",")]
        if not all(items):
            raise ErasekitError(f"concept list has an empty name: {name_or_path!r}")
        return combine_concepts([load_concept(n) for n in items])
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ErasekitError(f"concept spec not found: {path}")
    else:
        path = CONCEPTS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = available_concepts()
            hint = suggest(name_or_path, names)
            sep = ";" if hint else ""
            raise UnknownNameError(
                f"unknown concept {name_or_path!r}{sep}{hint} (available: {', '.join(names)};"
                " or pass a YAML spec file)"
            )
    data = path.read_bytes()
    try:
        spec = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise ErasekitError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ErasekitError(f"{path}: a concept spec must be a YAML mapping")
    unknown = sorted(str(k) for k in set(spec) - CONCEPT_KEYS)
    if unknown:
        hint = suggest(unknown[0], sorted(CONCEPT_KEYS))
        raise ErasekitError(f"{path}: unknown key {unknown[0]!r}{';' if hint else ''}{hint}"
                            f" (keys: {', '.join(sorted(CONCEPT_KEYS))})")  # fmt: skip
    missing = [
        k for k in ("name", "kind", "forget", "surrogate", "retain", "detector") if k not in spec
    ]
    if missing:
        raise ErasekitError(f"{path}: concept spec lacks {', '.join(missing)}")
    if spec["kind"] not in KINDS:
        raise ErasekitError(f"{path}: kind must be one of {', '.join(KINDS)}, got {spec['kind']!r}")
    detector = spec["detector"]
    if not isinstance(detector, dict) or "name" not in detector:
        raise ErasekitError(f"{path}: 'detector' must be a mapping with a 'name'")
    evaluation = spec.get("evaluation") or {}
    if not isinstance(evaluation, dict):
        raise ErasekitError(f"{path}: 'evaluation' must map set names to prompt files or lists")
    surrogate = spec["surrogate"]
    if not isinstance(surrogate, str) or not surrogate.strip():
        raise ErasekitError(f"{path}: 'surrogate' must be a non-empty prompt")
    scale = spec.get("scale", "real")
    if scale not in SCALES:
        raise ErasekitError(f"{path}: scale must be one of {', '.join(SCALES)}, got {scale!r}")
    sensitive = spec.get("sensitive", True)
    if not isinstance(sensitive, bool):
        raise ErasekitError(f"{path}: 'sensitive' must be true or false")
    never_learned = spec.get("never_learned")
    if never_learned is not None and (not isinstance(never_learned, str) or not never_learned):
        raise ErasekitError(f"{path}: 'never_learned' must be a model path or world:<model>")
    return Concept(
        name=str(spec["name"]),
        kind=spec["kind"],
        description=str(spec.get("description", "")).strip(),
        forget=_prompt_set_field(path, "forget", spec["forget"]),
        surrogate=surrogate.strip(),
        retain=_prompt_set_field(path, "retain", spec["retain"]),
        evaluation={k: _prompt_set_field(path, k, v) for k, v in evaluation.items()},
        detector=dict(detector),
        path=str(path),
        sha256=sha256_bytes(data),
        benign=_prompt_set_field(path, "benign", spec["benign"]) if "benign" in spec else None,
        pairs=_pairs_field(path, spec.get("pairs")),
        scale=scale,
        sensitive=sensitive,
        never_learned=_never_learned_field(path, never_learned),
        tuning=_tuning_field(path, spec.get("tuning")),
    )


TUNING_SETS = ("concept", "retain")


def _tuning_field(spec_path: Path, value: Any) -> dict[str, PromptSet]:
    """``tuning: {concept: FILE, retain: FILE}``: the phrasings presets are chosen on."""
    if value is None:
        return {}
    if not isinstance(value, dict) or set(value) != set(TUNING_SETS):
        raise ErasekitError(f"{spec_path}: 'tuning' must map {' and '.join(TUNING_SETS)} to"
                            " prompt files or lists")  # fmt: skip
    return {k: _prompt_set_field(spec_path, f"tuning-{k}", value[k]) for k in TUNING_SETS}


def _never_learned_field(spec_path: Path, value: str | None) -> str | None:
    """``world:<model>`` as given; a path relative to the spec's folder made absolute."""
    if value is None or value.startswith("world:"):
        return value
    file = Path(value)
    return str(file if file.is_absolute() else spec_path.parent / file)


def _pairs_field(spec_path: Path, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ErasekitError(f"{spec_path}: 'pairs' must be a CSV file path (columns with, without)")
    file = _resolve_prompt_file(spec_path, value)
    if not file.is_file():
        raise ErasekitError(f"{spec_path}: pairs file not found: {file}")
    return str(file)
