"""The Python API: what the command line does, as functions.

    import erasekit
    erased = erasekit.erase(erasekit.world_path(), "red", "salun", "erased-red")
    result = erasekit.audit(erased, "red", "audit-red")
    rate = result.metrics["concept_rate/direct"]
    print(rate["value"], rate["ci95"], rate["n_images"])

``model`` is a model folder (or a single-file checkpoint with ``model_config``) or a pipeline
already loaded (``erasekit.load_pipeline``); ``concept`` a built-in name, a YAML spec path or a
loaded ``Concept``. Every output folder is written atomically, as by the CLI.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erasekit.arguments import (
    check_concept,
    check_float,
    check_int,
    check_model,
    check_name,
    check_path,
    check_prompts,
    check_settings,
    is_pipeline,
)
from erasekit.concepts import Concept, PromptSet, load_concept, resolve_prompts
from erasekit.errors import ErasekitError
from erasekit.outputs import check_not_input, output_lock
from erasekit.progress import Progress
from erasekit.results import AuditResult, ErasedModel, Metric

Settings = Mapping[str, Any] | Sequence[str] | None


def _concept(concept: str | Path | Concept) -> Concept:
    check_concept(concept)
    return concept if isinstance(concept, Concept) else load_concept(str(concept))


def _source_path(pipe) -> Path | None:
    """The folder a loaded pipeline came from, when diffusers recorded one that exists."""
    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    return Path(name) if name and Path(name).exists() else None


def _load(model, *, device: str | None, dtype: str = "fp32", model_config=None,
          allow_pickle: bool = False):  # fmt: skip
    """(pipeline, its path or None): a loaded pipeline as given, a path loaded on ``device``."""
    from erasekit.distributed import resolve_device
    from erasekit.models import load_pipeline

    if is_pipeline(model):
        return model, _source_path(model)
    pipe = load_pipeline(model, dtype=dtype, device=resolve_device(device), config=model_config,
                         allow_pickle=allow_pickle)  # fmt: skip
    return pipe, Path(model)


def _check_common(model, out, *, n_per_prompt, seed, batch_size, limit, steps, guidance) -> None:
    """The arguments generate, evaluate and audit share."""
    check_model(model)
    check_path(out, "out", optional=out is None)
    check_int(n_per_prompt, "n_per_prompt")
    check_int(seed, "seed", minimum=0)
    check_int(batch_size, "batch_size")
    check_int(limit, "limit", optional=True)
    check_int(steps, "steps", optional=True)
    check_float(guidance, "guidance")


def _split_settings(settings: Settings) -> tuple[list[str], dict | None]:
    """``key=value`` strings (as on the command line) or a mapping of settings."""
    check_settings(settings)
    if settings is None:
        return [], None
    if isinstance(settings, Mapping):
        return [], dict(settings)
    return list(settings), None


def erase_config(
    method: str,
    concept: str | Path | Concept,
    settings: Settings = None,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
):
    """The method's full configuration ``erase`` would run with (its dataclass): the method's
    defaults for the concept (e.g. its ShapesWorld preset), then the named ``preset``, then
    ``config_file``, then ``settings``."""
    from erasekit.config import build_config
    from erasekit.methods import get_method

    check_name(method, "method")
    method_cls = get_method(method)
    spec = _concept(concept)
    method_cls.check_concept(spec)
    sets, mapping = _split_settings(settings)
    defaults = method_cls.defaults(spec)
    named = method_cls.preset(preset) if preset is not None else {}
    mappings = [("settings", mapping)] if mapping else None
    config = build_config(method_cls.Config, {**defaults, **named}, config_file, sets,
                          mappings=mappings)  # fmt: skip
    # a world preset's values for the variant the configuration selects (e.g. ESD-x's
    # learning rate): over the preset, under a named preset, the config file and settings
    variant = method_cls.world_by_variant(getattr(config, "variant", None),
                                          spec.detector.get("dimension"))  # fmt: skip
    if spec.scale == "world" and variant:
        config = build_config(method_cls.Config, {**defaults, **variant, **named}, config_file,
                              sets, mappings=mappings)  # fmt: skip
    return config


def erase(
    model,
    concept: str | Path | Concept,
    method: str,
    out: str | Path,
    *,
    settings: Settings = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    resume: str | None = None,
    device: str | None = None,
    model_config: str | Path | None = None,
    allow_pickle: bool = False,
    forget_images: str | Path | None = None,
    retain_images: str | Path | None = None,
    mask: str | Path | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = True,
) -> ErasedModel:
    """Erase ``concept`` from ``model`` with ``method`` (a name in ``erasekit.METHODS``;
    ``erasekit methods`` lists them) and write the erased model folder ``out``.

    Settings layer as on the command line: the method's defaults for the concept (e.g. its
    ShapesWorld preset), then the named ``preset`` (e.g. ESD's ``paper`` or
    ``diffusers-code``), then ``config_file`` (YAML), then ``settings`` (a mapping, or
    ``key=value`` strings). ``resume``: "latest" or a checkpoint path of an interrupted run.
    ``progress``: True (a bar), False, or a callable given each step as a dict
    (``{"stage", "done", "total", "unit", "loss"}``). Returns an ``ErasedModel``: the folder's
    path, with ``.manifest`` and ``.pipeline()``.
    """
    from erasekit.methods import get_method
    from erasekit.models import check_finite_weights
    from erasekit.training import train

    check_model(model)
    check_name(method, "method")
    check_path(out, "out")
    method_cls = get_method(method)
    spec = _concept(concept)
    config = erase_config(method, spec, settings, preset=preset, config_file=config_file)
    if mask is not None and method != "salun":
        raise ErasekitError("--mask applies to --method salun only")
    check_not_input(out, [model, model_config, config_file, forget_images, retain_images, mask])
    pipe, path = _load(model, device=device, model_config=model_config,
                       allow_pickle=allow_pickle)  # fmt: skip
    check_finite_weights(pipe, "the base model")
    if path is None:
        raise ErasekitError("erase needs the model's folder (the manifest records the base "
                            "model): pass its path, or a pipeline loaded from one")  # fmt: skip
    extra = {"mask": mask} if method == "salun" else {}
    job = method_cls(config, spec, model_path=path, forget_images=forget_images,
                     retain_images=retain_images, cache_dir=cache_dir, progress=progress,
                     **extra)  # fmt: skip
    return ErasedModel(train(job, pipe, model_path=path, out_dir=out, concept=spec,
                             resume=resume, overwrite=overwrite, progress=progress))  # fmt: skip


def generate(
    model,
    prompts: str | Path | Sequence[str] | PromptSet,
    out: str | Path,
    *,
    n_per_prompt: int = 1,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    limit: int | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    model_config: str | Path | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: Progress = True,
) -> list[dict[str, Any]]:
    """Render prompts (a prompt file, one prompt, a list or a PromptSet) into ``out``:
    images/*.png, samples.jsonl and generation.json. Returns the sample records."""
    from erasekit.concepts import prompt_set_from_list
    from erasekit.sampling import SamplerSettings
    from erasekit.sampling import generate as render

    _check_common(model, out, n_per_prompt=n_per_prompt, seed=seed, batch_size=batch_size,
                  limit=limit, steps=steps, guidance=guidance)  # fmt: skip
    check_prompts(prompts)
    if isinstance(prompts, PromptSet):
        prompt_set = prompts
    elif isinstance(prompts, (str, Path)):
        prompt_set = resolve_prompts(str(prompts))
    else:
        prompt_set = prompt_set_from_list(list(prompts))
    prompt_set = prompt_set.limit(limit)
    pipe, path = _load(model, device=device, dtype=dtype, model_config=model_config,
                       allow_pickle=allow_pickle)  # fmt: skip
    source = Path(prompt_set.source)
    check_not_input(out, [model, model_config, source if source.is_file() else None])
    # A single-file checkpoint's recorded defaults live in its config folder.
    settings = SamplerSettings.for_model(model_config or path, steps=steps, height=height,
                                         width=width)  # fmt: skip
    return render(pipe, prompt_set, out, model_path=path, settings=settings,
                  n_per_prompt=n_per_prompt, seed=seed, guidance=guidance,
                  negative_prompt=negative_prompt, batch_size=batch_size, overwrite=overwrite,
                  progress=progress)  # fmt: skip


def evaluate(
    model,
    concept: str | Path | Concept,
    *,
    sets: Sequence[str] | None = None,
    n_per_prompt: int = 1,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    steps: int | None = None,
    guidance: float | None = None,
    detectors=None,
    device: str | None = None,
    dtype: str = "fp32",
    model_config: str | Path | None = None,
    allow_pickle: bool = False,
    work_dir: str | Path | None = None,
) -> dict[str, Metric]:
    """The audit's measurements of one model, without references or a report: metric key
    (``concept_rate/direct``, ``retain_accuracy/retain`` ...) -> ``Metric`` (value, 95%
    interval, n and definition; printed as ``0.00 [0.00, 0.04] (n=96)``). ``sets``: names
    among the concept's evaluation sets, ``forget`` and ``retain`` (default: all of them).
    Loading options as ``generate``'s. Images go to ``work_dir`` (default: a temporary
    folder, removed)."""
    from dataclasses import asdict

    from erasekit.auditing import AuditSettings, audit_prompt_sets, evaluate_model
    from erasekit.detectors import DetectorOptions
    from erasekit.distributed import resolve_device
    from erasekit.evaluation import build_judges
    from erasekit.sampling import SamplerSettings

    _check_common(model, None, n_per_prompt=n_per_prompt, seed=seed, batch_size=batch_size,
                  limit=limit, steps=steps, guidance=guidance)  # fmt: skip
    spec = _concept(concept)
    dev = resolve_device(device)
    options = DetectorOptions(**{**asdict(detectors or DetectorOptions()), "device": dev})
    judges = build_judges(spec, options)
    chosen = audit_prompt_sets(spec, limit)
    if sets is not None:
        names = [ps.name for ps, _ in chosen]
        unknown = [s for s in sets if s not in names]
        if unknown:
            raise ErasekitError(f"unknown prompt set {unknown[0]!r} of concept "
                                f"'{spec.name}' (sets: {', '.join(names)})")  # fmt: skip
        chosen = [(ps, u) for ps, u in chosen if ps.name in sets]
    pipe, path = _load(model, device=dev, dtype=dtype, model_config=model_config,
                       allow_pickle=allow_pickle)  # fmt: skip
    settings = SamplerSettings.for_model(model_config or path, steps=steps, guidance=guidance)
    audit = AuditSettings(n_per_prompt=n_per_prompt, seed=seed, limit=limit,
                          batch_size=batch_size, steps=steps, guidance=guidance,
                          dtype=dtype, device=dev)  # fmt: skip
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="erasekit-evaluate-"))
    try:
        _, metrics, _ = evaluate_model(pipe, path, "model", chosen, judges, root, settings, audit)
    finally:
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {k: Metric(m) for k, m in metrics.items()}


def audit(
    model,
    concept: str | Path | Concept,
    out: str | Path,
    *,
    roles: Mapping[str, str | Path | None] | None = None,
    attacks: Sequence[str] | Mapping[str, Settings] | None = None,
    attack_config: str | Path | None = None,
    n_per_prompt: int = 1,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    steps: int | None = None,
    guidance: float | None = None,
    dtype: str = "fp32",
    device: str | None = None,
    detectors=None,
    model_config: str | Path | None = None,
    allow_pickle: bool = False,
    guidance_baselines: bool = False,
    censor: bool | None = None,
    overwrite: bool = False,
    progress: Progress = True,
    invocation: dict[str, Any] | None = None,
    original: str | Path | None = None,
    model_card: bool = False,
    captions: str | Path | None = None,
    fid_images: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> AuditResult:
    """Audit ``model`` on ``concept`` beside its references and write ``out`` (results.json,
    samples.jsonl, images/, report.html, report.md).

    ``roles``: role -> model over the defaults (``reference``: the base model in the model's
    manifest; ``never-learned``: the one the concept's spec names); None drops a role, a new
    name adds a model. ``attacks``: names (``["finetune"]``) or name -> settings
    (``{"finetune": {"steps": 50}}``), run on every role with the same data and budget.
    ``censor``: blur flagged images in the report (default: when the concept is sensitive).
    ``original``: the model attacks that need one start from, without auditing it as a role
    (default: the reference role's model). ``model_card``: write the evidence into the audited
    folder (``erasekit-audit.json`` and the README's ``model-index``; a diffusers folder only).
    ``captions``: a caption prompt file (a COCO-style CSV such as ``coco_30k.csv``, or text)
    rendered by every model as the utility set ``captions`` (CLIP score, FID). FID and KID are
    measured on the utility sets when ``detectors`` names local Inception weights, against the
    reference model's images or, with ``fid_images``, a folder of (real) images.
    ``cache_dir``: a folder the attacks keep what later audits reuse in: the image sets they
    render (by content) and Ring-A-Bell's searches (by text encoder, prompt pairs, prompt and
    settings); None: kept inside this audit only.
    """
    from erasekit.auditing import AuditSettings, attack_configs, run_audit

    _check_common(model, out, n_per_prompt=n_per_prompt, seed=seed, batch_size=batch_size,
                  limit=limit, steps=steps, guidance=guidance)  # fmt: skip
    if model_card and (is_pipeline(model) or not (Path(model) / "model_index.json").is_file()):
        raise ErasekitError("--model-card needs the audited model as a diffusers folder")
    spec = _concept(concept)
    if attack_config is not None and not attacks:
        raise ErasekitError("an attack config was given without attacks")
    configs = attack_configs(attacks, attack_config, spec) if attacks else None
    settings = AuditSettings(n_per_prompt=n_per_prompt, seed=seed, limit=limit,
                             batch_size=batch_size, steps=steps, guidance=guidance, dtype=dtype,
                             device=device, captions=str(captions) if captions else None,
                             fid_images=str(fid_images) if fid_images else None)  # fmt: skip
    invocation = invocation or {"call": {"function": "erasekit.audit", "model": str(model),
                                         "concept": spec.name, "out": str(out)}}  # fmt: skip
    common = dict(roles=roles, audit=settings, detectors=detectors, model_config=model_config,
                  allow_pickle=allow_pickle, censor=censor, overwrite=overwrite,
                  progress=progress, attacks=configs, baselines=guidance_baselines,
                  invocation=invocation, original=original, cache_dir=cache_dir)  # fmt: skip
    if not is_pipeline(model):
        doc = run_audit(model, spec, out, **common)
        if model_card:
            from erasekit.distributed import process_state
            from erasekit.reporting import write_model_card

            if process_state().is_main_process:
                write_model_card(model, doc)
        return AuditResult.of(doc, out)
    return AuditResult.of(_audit_in_memory(model, spec, out, roles, common), out)


def _audit_in_memory(pipe, spec: Concept, out: str | Path, roles, common: dict[str, Any]):
    """An in-memory pipeline audited as saved beside the output; the copy is removed after."""
    from erasekit.auditing import run_audit
    from erasekit.models import build_manifest, read_manifest, save_model

    source = _source_path(pipe)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".erasekit-audited-", dir=Path(out).parent))
    try:
        save_model(pipe, staged / "model", build_manifest(base_model=source, method="in-memory"))
        if source is not None and (roles is None or "reference" not in roles):
            base = (read_manifest(source) or {}).get("base_model") or {}
            common = {**common, "roles": {**(roles or {}), "reference": base.get("path") or source}}
        return run_audit(staged / "model", spec, out, **common,
                         labels={"audited": {"path": str(source) if source else None,
                                             "in_memory": True}})  # fmt: skip
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def export(
    model, out: str | Path, *, layout: str = "ldm", model_config: str | Path | None = None,
    allow_pickle: bool = False, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write ``model`` (a folder, a single file with ``model_config``, or a pipeline) as one
    .safetensors file: the original LDM single-file layout, or ``layout="components"``."""
    from erasekit.models import check_finite_weights, export_single_file, load_pipeline

    check_model(model)
    check_path(out, "out")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ErasekitError(f"the single file must end in .safetensors, got {out}")
    if out.exists() and not overwrite:
        raise ErasekitError(f"{out} exists (pass --overwrite to replace it)")
    pipe = model if is_pipeline(model) else load_pipeline(
        model, config=model_config, allow_pickle=allow_pickle)  # fmt: skip
    check_finite_weights(pipe)
    return export_single_file(pipe, out, layout=layout)


def report(audit_dir: str | Path, *, censor: bool | None = None) -> tuple[Path, Path]:
    """Re-render report.html and report.md of an audit folder; returns their paths."""
    from erasekit.reporting import write_report

    check_path(audit_dir, "audit_dir")
    with output_lock(audit_dir):
        return write_report(audit_dir, censor=censor)


__all__ = ["AuditResult", "audit", "erase", "evaluate", "export", "generate", "report"]
