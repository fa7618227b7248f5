"""The models an audit compares (roles) and how one model is measured: its prompt sets
rendered through the one generate path and judged, with the set-level degeneracy check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.concepts import Concept, PromptSet
from erasekit.errors import ErasekitError
from erasekit.evaluation import (
    Judges,
    evaluate_prompt_set,
    set_metrics,
    union_metrics,
)
from erasekit.models import read_manifest
from erasekit.provenance import (
    model_content_hash,
)
from erasekit.sampling import SamplerSettings, check_image_set

CAPTIONS = "captions"  # the benign caption set's name in an audit (no retain accuracy there)


@dataclass(frozen=True)
class AuditSettings:
    n_per_prompt: int = 1
    seed: int = 0
    limit: int | None = None
    batch_size: int = 8
    steps: int | None = None
    guidance: float | None = None
    dtype: str = "fp32"
    device: str | None = None
    captions: str | None = None  # a caption prompt file (e.g. coco_30k.csv): CLIP score, FID
    fid_images: str | None = None  # FID/KID against this image folder, not the reference model


def audit_prompt_sets(
    concept: Concept, limit: int | None = None, captions: PromptSet | None = None
) -> list[tuple[PromptSet, bool]]:
    """The concept's evaluation sets, its forget set and its retain set, each once (a set
    listed under two names is rendered once, under its evaluation name); the flag marks the
    utility sets, where retain accuracy (the retain set), CLIP score and FID are measured.
    Combined concepts: each part's sets as ``<part>/<set>``, and the combined retain set.
    ``captions``: a benign caption set (e.g. COCO) rendered last as the utility set
    ``captions``."""
    named: list[tuple[str, PromptSet]] = [*concept.evaluation.items()]
    # combined concepts: each part's forget set (the union mixes the parts' detectors)
    forget = [(f"{p.name}/forget", p.forget) for p in concept.parts] or [("forget", concept.forget)]
    named += [*forget, ("retain", concept.retain)]
    seen: dict[tuple, str] = {}
    out = []
    for name, ps in named:
        key = (ps.sha256, tuple(ps.prompts))
        if key in seen:
            continue
        seen[key] = name
        utility = key == (concept.retain.sha256, tuple(concept.retain.prompts))
        # Named by its role in the audit; a --limit subset keeps the name (the evaluation
        # records the limit and every metric its n_prompts).
        entries = ps.entries[:limit] if limit else ps.entries
        out.append((PromptSet(name, ps.source, ps.format, ps.sha256, entries), utility))
    if captions is not None:
        entries = captions.entries[:limit] if limit else captions.entries
        out.append((PromptSet(CAPTIONS, captions.source, captions.format, captions.sha256,
                              entries), True))  # fmt: skip
    return out


def never_learned_model(concept: Concept) -> Path | None:
    """The never-learned model the concept's spec names (``world:<model>``: a shipped
    ShapesWorld model), or None."""
    ref = concept.never_learned
    if ref is None:
        return None
    if ref.startswith("world:"):
        from erasekit.world import world_path

        return world_path(ref.split(":", 1)[1])
    return Path(ref)


def resolve_roles(
    model: str | Path,
    concept: Concept,
    roles: Mapping[str, str | Path | None] | None = None,
) -> dict[str, Path | None]:
    """Role -> model path: ``audited`` (the model), ``reference`` (default: the base model in
    its manifest) and ``never-learned`` (default: the one the concept's spec names), then
    ``roles`` over them: a path replaces or adds a role, None drops it (e.g. a study's
    ``{"esd-seed1": path, ...}``)."""
    model = Path(model)
    if not model.exists():
        raise ErasekitError(f"model not found: {model}")
    roles = dict(roles or {})
    if "audited" in roles:
        raise ErasekitError("role 'audited' is the audited model itself; name other roles")
    out: dict[str, Path | None] = {"audited": model}
    if "reference" not in roles:
        base = (read_manifest(model) if model.is_dir() else {}).get("base_model") or {}
        out["reference"] = Path(base["path"]) if base.get("path") else None
        if out["reference"] is not None and not out["reference"].exists():
            raise ErasekitError(
                f"the manifest's base model {out['reference']} is not here; pass "
                "--reference PATH, or --reference none to audit without one"
            )
    if "never-learned" not in roles:
        out["never-learned"] = never_learned_model(concept)
    for role, path in roles.items():
        if not role or ":" in role:
            raise ErasekitError(f"role names are plain words (no ':'), got {role!r}")
        out[role] = Path(path) if path is not None else None
    for role, path in out.items():
        if path is not None and not path.exists():
            raise ErasekitError(f"{role} model not found: {path}")
    return out


def guidance_baselines(concept: Concept, own=None) -> dict[str, Any]:
    """Baseline role -> the guidance it renders the audited weights with (None: none).
    SLD uses the folder's own SLD settings when it has them, else the medium preset."""
    from erasekit.guidance import SLD_PRESETS, Guidance

    words = concept.phrase
    sld = own.sld if own is not None and own.sld is not None else SLD_PRESETS["medium"]
    out: dict[str, Any] = {"baseline-unguided": None} if own is not None else {}
    out["baseline-negative-prompt"] = Guidance("negative-prompt", words)
    out["baseline-sld"] = Guidance("sld", words, sld)
    return out


def describe_model(path: Path, manifest_base: dict | None = None) -> dict[str, Any]:
    from erasekit.guidance import read_guidance

    manifest = read_manifest(path) if path.is_dir() else {}
    guidance = read_guidance(path) if path.is_dir() else None
    info: dict[str, Any] = {
        "path": str(path.resolve()),
        "sha256": model_content_hash(path),
        "method": (manifest.get("method") or {}).get("name"),
        "method_config": (manifest.get("method") or {}).get("config"),
        "concept": (manifest.get("concept") or {}).get("name")
        if isinstance(manifest.get("concept"), dict)
        else manifest.get("concept"),
        "base_model": manifest.get("base_model"),
        "created": manifest.get("created"),
        "erasekit_version": manifest.get("erasekit_version"),
        "guidance": guidance.describe() if guidance is not None else None,
    }
    if manifest_base:
        info["matches_manifest_base"] = info["sha256"] == manifest_base.get("sha256")
    return info


def evaluate_model(
    pipe,
    model_path: Path,
    role: str,
    sets: list[tuple[PromptSet, bool]],
    judges: Judges,
    root: Path,
    settings: SamplerSettings,
    audit: AuditSettings,
) -> tuple[list[dict], dict[str, dict], dict[str, dict]]:
    """One model on every prompt set: (samples, metrics by key, breakdowns by set); combined
    concepts also the union of their concept rates."""
    samples, metrics, breakdowns = [], {}, {}
    for prompt_set, utility in sets:
        judge = judges.for_set(prompt_set.name)
        part = evaluate_prompt_set(pipe, prompt_set, root, f"images/{role}/{prompt_set.name}",
                                   judge, model_path=model_path, settings=settings,
                                   n_per_prompt=audit.n_per_prompt, seed=audit.seed,
                                   batch_size=audit.batch_size)  # fmt: skip
        part = [{"model": role, **s} for s in part]
        m, b = set_metrics(part, prompt_set, judge, seed=audit.seed, utility=utility,
                           retain=prompt_set.name != CAPTIONS)  # fmt: skip
        samples += part
        metrics.update(m)
        if b:
            breakdowns[prompt_set.name] = b
    check_image_set(root, samples)  # a collapsed model's "no concept" is not a measurement
    metrics.update(union_metrics(samples, sets, judges, seed=audit.seed))
    return samples, metrics, breakdowns
