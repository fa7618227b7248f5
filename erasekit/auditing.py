"""`erasekit audit`: evaluate a model and its references on a concept's prompt sets, write
results.json (versioned schema), samples.jsonl, images/ and the report.

Roles: ``audited`` (the model under audit), ``reference`` (the model before erasure: the base
recorded in the audited model's manifest, or ``--reference``), ``never-learned`` (a model
trained without the concept, the gold standard: the one the concept's spec names, e.g. the
shipped ShapesWorld ``no-red``), and any further roles a caller names (a study's models). With
guidance baselines, the audited weights are also rendered as ``baseline-unguided`` (without the
folder's own guidance, when it has one), ``baseline-negative-prompt`` (the concept's words as a
hand-written negative prompt) and ``baseline-sld`` (SLD with the concept's words as the safety
concept). Later issues add attacks: each writes its own entry under ``attacks`` and its
attacked models' metrics under ``results`` with roles ``<attack>:<role>``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from erasekit.concepts import Concept, PromptSet
from erasekit.detectors import DetectorOptions
from erasekit.distributed import process_state, resolve_device
from erasekit.errors import DegenerateOutput, ErasekitError
from erasekit.evaluation import (
    PAIRED_DEFINITION,
    Judges,
    build_judges,
    distribution_metrics,
    evaluate_prompt_set,
    make_metric,
    metric_key,
    paired_differences,
    sampling_definition,
    set_metrics,
    union_metrics,
)
from erasekit.models import SDXL, pipeline_class, read_manifest
from erasekit.outputs import (
    check_not_input,
    commit_output_dir,
    discard_output_dir,
    partial_path,
    prepare_output_dir,
    write_json,
    write_jsonl,
)
from erasekit.progress import Progress, on_main, say
from erasekit.provenance import (
    git_commit,
    library_versions,
    model_content_hash,
    peak_memory,
    sha256_bytes,
    sha256_file,
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def fid_setup(audit: AuditSettings, detectors: DetectorOptions, roles: dict[str, Path | None]):
    """(Inception features, the reference image folder and its image files, or None and None
    for the reference model's images) when FID/KID are asked for (Inception weights given),
    else None; fails before rendering."""
    if not detectors.inception_weights:
        if audit.fid_images:
            raise ErasekitError("--fid-images needs --inception-weights PATH (FID/KID)")
        return None
    folder, images = None, None
    if audit.fid_images:
        folder = Path(audit.fid_images)
        if not folder.is_dir():
            raise ErasekitError(f"--fid-images: not a folder: {folder}")
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(images) < 2:
            raise ErasekitError(f"--fid-images: {folder} holds fewer than 2 images "
                                f"({', '.join(IMAGE_SUFFIXES)})")  # fmt: skip
    elif roles.get("reference") is None:
        raise ErasekitError("FID/KID need reference images: keep the reference model "
                            "(--reference PATH) or pass --fid-images DIR")  # fmt: skip
    from erasekit.detectors.inception import InceptionFeatures

    features = InceptionFeatures(detectors.inception_weights, device=detectors.device,
                                 allow_pickle=detectors.allow_pickle,
                                 batch_size=detectors.batch_size)  # fmt: skip
    return features, folder, images


FEATURE_CHUNK = 256  # images decoded at a time for Inception features


def distribution_results(
    features,
    folder: Path | None,
    images: list[Path] | None,
    samples: list[dict],
    sets,
    root: Path,
    seed: int,
) -> dict[str, dict[str, dict]]:
    """Role -> FID and KID on every utility set, against the reference model's images of the
    same prompts, or against the given image files (then the reference role is measured too)."""
    from PIL import Image

    def load(paths):
        import torch

        paths, out = list(paths), []
        for i in range(0, len(paths), FEATURE_CHUNK):  # a COCO folder need not fit in memory
            chunk = []
            for p in paths[i : i + FEATURE_CHUNK]:
                with Image.open(p) as im:
                    chunk.append(im.convert("RGB"))
            out.append(features.features(chunk))
        return torch.cat(out)

    fixed = None
    if images is not None:
        digest = sha256_bytes("\n".join(sha256_file(p) for p in images).encode())
        fixed = (load(images), list(range(len(images))),
                 {"reference": "image folder", "folder": str(folder.resolve()),
                  "folder_sha256": digest})  # fmt: skip
    results: dict[str, dict[str, dict]] = {}
    for prompt_set, utility in sets:
        if not utility:
            continue
        by_role: dict[str, list[dict]] = {}
        for s in samples:
            if s["prompt_set"] == prompt_set.name:
                by_role.setdefault(s["model"], []).append(s)
        if fixed is None:
            rows = by_role.pop("reference")
            reference = (load(root / s["image"] for s in rows), [s["prompt_index"] for s in rows],
                         {"reference": "the reference model's images of the same prompts and "
                          "seeds"})  # fmt: skip
        else:
            reference = fixed
        for role, rows in by_role.items():
            mine = load(root / s["image"] for s in rows)
            definition = {"features": features.describe(), **reference[2],
                          **sampling_definition(rows, seed)}  # fmt: skip
            metrics = distribution_metrics(mine, [s["prompt_index"] for s in rows],
                                           reference[0], reference[1], prompt_set=prompt_set,
                                           definition=definition)  # fmt: skip
            results.setdefault(role, {}).update(metrics)
    return results


def attack_configs(
    attacks: Sequence[str] | Mapping[str, Any],
    file: str | Path | None = None,
    concept: Concept | None = None,
) -> dict[str, Any]:
    """Each attack's config: its defaults (for ``concept``), then the FILE's ``name:`` mapping,
    then the attack's own settings in ``attacks`` (name -> a mapping or ``key=value``
    strings). Unknown attack names fail here, before any rendering."""
    from erasekit.attacks import get_attack
    from erasekit.config import build_config, read_yaml_mapping

    given = dict(attacks) if isinstance(attacks, Mapping) else {n: None for n in attacks}
    data: dict[str, Any] = {}
    if file is not None:
        data = read_yaml_mapping(file, "attack config")
        if not all(isinstance(v, dict) for v in data.values()):
            raise ErasekitError(f"{file}: expected a mapping of attack name -> settings")
        unknown = sorted(set(data) - set(given))
        if unknown:
            raise ErasekitError(f"{file}: settings for attacks not requested: {', '.join(unknown)}")
    configs = {}
    for name, settings in given.items():
        cls = get_attack(name)
        layers = [(f"{file}:{name}", data.get(name, {}))]
        sets: list[str] = []
        if isinstance(settings, Mapping):
            layers.append((f"{name} settings", dict(settings)))
        elif settings is not None:
            if isinstance(settings, str):
                raise ErasekitError(f"{name}: settings are a mapping or key=value strings")
            sets = list(settings)
        configs[name] = build_config(cls.Config, defaults=cls.defaults(concept),
                                     mappings=layers, sets=sets)  # fmt: skip
    return configs


def run_attacks(
    configs: dict[str, Any],
    roles: dict[str, Path | None],
    concept: Concept,
    curve_set: PromptSet,
    judges: Judges,
    root: Path,
    settings: SamplerSettings,
    audit: AuditSettings,
    device: str,
    progress: Progress,
    targets: list[str] | None = None,
    original: Path | None = None,
    cache_dir: Path | None = None,
    unattacked: Mapping[str, list[dict]] | None = None,
) -> tuple[dict[str, dict], dict[str, dict], list[dict]]:
    """Run every attack on every model role (the audited model, the original, the
    never-learned one; or the ``targets`` roles only) with the same data and budget; evaluate
    with the audit's detectors. Returns (attack entries, results by "<attack>:<role>",
    final-step samples). ``original``: the model attacks that need one start from (default:
    the reference role). ``cache_dir``: where attacks keep what later audits reuse.
    ``unattacked``: role -> the audit's own samples of ``curve_set`` (same seed, images per
    prompt and sampler); a recovery curve's step 0 on those prompts is the unattacked model,
    so it takes them instead of rendering them again."""
    from erasekit.attacks import AttackContext, get_attack

    original = original or roles.get("reference")

    entries, results, samples = {}, {}, []
    for name, config in configs.items():
        started = time.perf_counter()
        ctx = AttackContext(concept=concept, original=original,
                            audited=roles.get("audited"), work_dir=root / "attacks" / name,
                            device=device, progress=False, cache_dir=cache_dir)  # fmt: skip
        attack = get_attack(name)(config, ctx)
        attacked = {r: p for r, p in roles.items() if p is not None
                    and (targets is None or r in targets)}  # fmt: skip
        if attack.kind == "prompt":
            entries[name], res, smp = run_prompt_attack(attack, attacked, judges, root, settings,
                                                        audit, progress)  # fmt: skip
            results.update(res)
            samples += smp
            entries[name]["wall_time_s"] = round(time.perf_counter() - started, 2)
            continue
        data = attack.prepare()
        models = {}
        for role, path in attacked.items():
            say(progress, "audit", f"attack {name} on the {role} model ...")
            last: dict[str, Any] = {}

            def evaluate(pipe, step, prompts=None, _name=name, _role=role, _last=last):
                ps = prompts.limit(audit.limit) if prompts else curve_set
                if step == 0 and prompts is None and (unattacked or {}).get(_role):
                    part = unattacked[_role]
                else:
                    part = evaluate_prompt_set(pipe, ps, root,
                                               f"attacks/{_name}/{_role}-curve/step-{step:06d}",
                                               judges, model_path=None, settings=settings,
                                               n_per_prompt=audit.n_per_prompt,
                                               seed=audit.seed,
                                               batch_size=audit.batch_size)  # fmt: skip
                metrics, _ = set_metrics(part, ps, judges, seed=audit.seed, utility=False)
                _last.update(step=step, samples=part, metrics=metrics)
                return metrics[metric_key("concept_rate", ps.name)]

            out = attack.run(path, root / "attacks" / name / role, evaluate)
            label = f"{name}:{role}"
            results[label] = last["metrics"]
            samples += [{**s, "model": label, "attack_step": last["step"]} for s in last["samples"]]
            curve = [{"step": c["step"], "value": c["metric"]["value"],
                      "ci95": c["metric"]["ci95"], "n_images": c["metric"]["n_images"]}
                     for c in out.pop("curve")]  # fmt: skip
            models[role] = {**out, "curve": curve, "curve_metric": out.get("eval_prompts")
                            or curve_set.describe()}  # fmt: skip
            for key in ("artefact", "model_folder", "log"):
                if key in models[role]:
                    models[role][key] = str(Path(models[role][key]).relative_to(root))
        entries[name] = {
            "config": asdict(config),
            "data": data,
            "metric": "concept_rate (primary protocol) on the curve prompts",
            "models": models,
            # the attack on every attacked role: its data, runs and evaluations
            "wall_time_s": round(time.perf_counter() - started, 2),
        }
    return entries, results, samples


def prompt_attack_metrics(
    outcomes: list[dict[str, Any]], prompt_set: PromptSet, judges: Judges, seed: int
) -> dict[str, dict[str, Any]]:
    """pre-ASR and ASR (Wilson 95%) of one attacked model, with their definitions."""
    proto = judges.protocols[0]
    base = sampling_definition([o["sample"] for o in outcomes], seed)
    common = {"detector": judges.concept.name, "detector_version": judges.concept.version,
              "protocol": proto.definition, "images_per_prompt": 1, **base}  # fmt: skip
    statistics = {
        "pre_asr": "share of prompts whose UNMODIFIED prompt's image the protocol flags on this "
        "model (the pre-check; such prompts are not attacked)",
        "asr": "(pre-attack successes + prompts whose adversarial prompt's image the protocol "
        "flags within the attack budget) / all prompts",
    }
    out = {}
    for metric, statistic in statistics.items():
        field = "pre_success" if metric == "pre_asr" else "success"
        values = [(o["index"], float(o[field])) for o in outcomes]
        out[metric_key(metric, prompt_set.name)] = make_metric(
            metric, values, kind="rate", higher_is_better=False, prompt_set=prompt_set,
            definition={"statistic": statistic, **common}, protocol=proto.name)  # fmt: skip
    return out


def run_prompt_attack(
    attack, roles: dict[str, Path | None], judges: Judges, root: Path,
    settings: SamplerSettings, audit: AuditSettings, progress: Progress,
) -> tuple[dict[str, Any], dict[str, dict], list[dict]]:  # fmt: skip
    """An adversarial-prompt attack on every model role: (its entry, pre-ASR/ASR by
    "<attack>:<role>", one sample per prompt and role: the final image)."""
    from erasekit.evaluation import PromptJudge

    name = attack.name
    data = attack.prepare(audit.limit)
    prompt_set = attack.prompt_set
    models, results, samples = {}, {}, []
    for role, path in roles.items():
        if path is None:
            continue
        say(progress, "audit", f"attack {name} on the {role} model ...")
        folder = f"attacks/{name}/{role}"
        judge = PromptJudge(prompt_set, judges, root, folder, settings, audit.seed,
                            audit.batch_size)  # fmt: skip
        out = attack.run(path, root / folder, judge)
        outcomes = out.pop("outcomes")
        label = f"{name}:{role}"
        results[label] = prompt_attack_metrics(outcomes, prompt_set, judges, audit.seed)
        for o in outcomes:
            sample = o.pop("sample")
            o["image"] = sample["image"]
            o["flags"] = sample["flags"]
            samples.append({**sample, "model": label, "attack": name, "attack_kind": "prompt",
                            "prompt_set": prompt_set.name, "source_prompt": o["prompt"],
                            "pre_success": o["pre_success"], "success": o["success"],
                            "success_step": o["success_step"]})  # fmt: skip
        models[role] = {**out, "outcomes": outcomes,
                        "artefact": str(Path(out["artefact"]).relative_to(root))}  # fmt: skip
    entry = {
        "kind": "prompt",
        "config": asdict(attack.config),
        "data": data,
        "metric": "pre-ASR and ASR (primary protocol, one image per prompt)",
        "models": models,
    }
    return entry, results, samples


def run_audit(
    model: str | Path,
    concept: Concept,
    out: str | Path,
    *,
    roles: Mapping[str, str | Path | None] | None = None,
    audit: AuditSettings = AuditSettings(),
    detectors: DetectorOptions | None = None,
    model_config: str | None = None,
    allow_pickle: bool = False,
    censor: bool | None = None,
    overwrite: bool = False,
    progress: Progress = True,
    attacks: dict[str, Any] | None = None,
    baselines: bool = False,
    invocation: dict[str, Any] | None = None,
    labels: Mapping[str, dict[str, Any]] | None = None,
    original: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the audit and write ``out`` (all or nothing); return the results document.
    ``roles``: see ``resolve_roles``. ``baselines``: also render the audited weights with the
    guidance baselines. ``censor``: blur flagged images in the report (None: when the concept
    is marked sensitive). ``invocation``: what results.json records of how the audit was
    started (``{"command": argv}`` from the CLI, ``{"call": ...}`` from Python). ``labels``:
    role -> fields that replace what results.json says of that role's model (e.g. the source
    of an in-memory pipeline audited from a staged copy). ``original``: the model attacks
    that need one (UnlearnDiffAtk's targets, MemoRa, concept inversion) start from, when it is
    not audited as the reference role (default: the reference). ``cache_dir``: a folder
    attacks share with later audits (rendered image sets, Ring-A-Bell's searches)."""
    from erasekit.models import load_pipeline
    from erasekit.reporting import SCHEMA, SCHEMA_VERSION, write_report

    started = time.time()
    roles = resolve_roles(model, concept, roles)
    check_not_input(out, [*roles.values(), model_config, audit.captions, audit.fid_images])
    device = resolve_device(audit.device)
    detectors = DetectorOptions(**{**asdict(detectors or DetectorOptions()), "device": device})
    judges = build_judges(concept, detectors)  # fails before any rendering
    if attacks and concept.parts:
        raise ErasekitError("attacks audit one concept at a time: run the audit with --attacks"
                            f" once per concept ({', '.join(concept.words)}) on the same"
                            " model")  # fmt: skip
    sdxl = [role for role, path in roles.items() if path and pipeline_class(path) == SDXL]
    if sdxl and (attacks or baselines):
        raise ErasekitError(f"on SDXL ({', '.join(sdxl)}) the audit measures the prompt sets; "
                            f"{'attacks' if attacks else 'guidance baselines'} do not run on "
                            "SDXL yet")  # fmt: skip
    for name in attacks or {}:
        from erasekit.attacks import get_attack

        if get_attack(name).requires_original(attacks[name]) and not (
            original or roles["reference"]
        ):
            raise ErasekitError(f"{name} needs the original model (--reference PATH)")
    fid = fid_setup(audit, detectors, roles)
    captions = None
    if audit.captions:
        from erasekit.concepts import read_prompt_set

        captions = read_prompt_set(audit.captions, CAPTIONS)
    sets = audit_prompt_sets(concept, audit.limit, captions)
    settings = SamplerSettings.for_model(model_config or roles["audited"], steps=audit.steps,
                                         guidance=audit.guidance)  # fmt: skip
    state = process_state(device)
    out = Path(out)
    if state.is_main_process:
        prepare_output_dir(out, overwrite)
    state.wait_for_everyone()
    tmp = partial_path(out)
    try:
        samples: list[dict] = []
        results: dict[str, dict] = {}
        breakdowns: dict[str, dict] = {}
        models_info: dict[str, Any] = {}
        audited_manifest = read_manifest(roles["audited"]) if roles["audited"].is_dir() else {}
        for role, path in roles.items():
            if path is None:
                continue
            say(progress, "audit", f"rendering and scoring the {role} model ({path}) ...",
                main=state.is_main_process)  # fmt: skip
            pipe = load_pipeline(path, dtype=audit.dtype, device=device,
                                 config=model_config if role == "audited" else None,
                                 allow_pickle=allow_pickle)  # fmt: skip
            try:
                s, m, b = evaluate_model(pipe, path, role, sets, judges, tmp, settings, audit)
            except DegenerateOutput as e:
                raise DegenerateOutput(f"the {role} model {path}: {e}") from None
            samples += s
            results[role] = m
            breakdowns[role] = b
            base = audited_manifest.get("base_model") if role == "reference" else None
            models_info[role] = {**describe_model(path, base), **(labels or {}).get(role, {})}
            if role == "audited" and baselines:
                own = getattr(pipe, "erasekit_guidance", None)
                for name, guidance in guidance_baselines(concept, own).items():
                    pipe.erasekit_guidance = guidance
                    s, m, b = evaluate_model(pipe, path, name, sets, judges, tmp, settings, audit)
                    samples += s
                    results[name] = m
                    breakdowns[name] = b
                    models_info[name] = {**models_info["audited"], "guidance":
                                         guidance.describe() if guidance else None}  # fmt: skip
            del pipe
            gc.collect()
        if fid is not None and state.is_main_process:
            say(progress, "audit", "FID/KID of the utility sets ...")
            for role, metrics in distribution_results(*fid, samples, sets, tmp, audit.seed).items():
                results[role].update(metrics)
        attack_entries: dict[str, Any] = {}
        if attacks:
            forget = concept.forget
            curve_set = next(ps for ps, _ in sets if ps.sha256 == forget.sha256
                             and ps.prompts == forget.prompts[: len(ps)])  # fmt: skip
            attack_entries, attacked, attacked_samples = run_attacks(
                attacks, roles, concept, curve_set, judges, tmp, settings, audit, device,
                on_main(progress, state.is_main_process),
                original=Path(original) if original else None,
                cache_dir=Path(cache_dir) if cache_dir else None,
                unattacked={role: [s for s in samples if s["model"] == role
                                   and s["prompt_set"] == curve_set.name]
                            for role, path in roles.items() if path is not None},
            )  # fmt: skip
            results.update(attacked)
            samples += attacked_samples
        document = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "kind": "audit",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(invocation or {"call": {"function": "erasekit.auditing.run_audit"}}),
            "concept": concept.describe(),
            "models": models_info,
            "detectors": judges.describe(),
            "protocols": judges.protocol_definitions(),
            "evaluation": {
                **asdict(audit),
                "device": device,
                "sampler": {**asdict(settings)},
                "prompt_sets": {ps.name: {**ps.describe(), "utility": u} for ps, u in sets},
                "primary_protocol": judges.protocols[0].name,
            },
            "results": results,
            "paired": {
                "definition": PAIRED_DEFINITION,
                "audited_minus": paired_differences(samples, results),
            },
            "breakdowns": breakdowns,
            "attacks": attack_entries,
            "provenance": {
                "erasekit_version": library_versions()["erasekit"],
                "git_commit": git_commit(),
                "versions": library_versions(),
                "wall_time_s": round(time.time() - started, 2),
                "peak_memory": peak_memory(),
                "n_processes": state.num_processes,
            },
        }
        if state.is_main_process:
            write_jsonl(tmp / "samples.jsonl", samples)
            write_json(tmp / "results.json", document)
            write_report(tmp, censor=censor)
            commit_output_dir(tmp, out)
        state.wait_for_everyone()
    except BaseException:
        if state.is_main_process:
            discard_output_dir(tmp)
        raise
    return document
