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
attacked models' metrics under ``results`` with roles ``<attack>:<role>``."""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from erasekit.auditing.attacks import (  # noqa: F401 - re-exported
    attack_configs,
    prompt_attack_metrics,
    run_attacks,
    run_prompt_attack,
)
from erasekit.auditing.distribution import (  # noqa: F401 - re-exported
    FEATURE_CHUNK,
    IMAGE_SUFFIXES,
    distribution_results,
    fid_setup,
)
from erasekit.auditing.roles import (  # noqa: F401 - re-exported
    CAPTIONS,
    AuditSettings,
    audit_prompt_sets,
    describe_model,
    evaluate_model,
    guidance_baselines,
    never_learned_model,
    resolve_roles,
)
from erasekit.concepts import Concept
from erasekit.detectors import DetectorOptions
from erasekit.distributed import process_state, resolve_device
from erasekit.errors import DegenerateOutput, ErasekitError
from erasekit.evaluation import (
    PAIRED_DEFINITION,
    build_judges,
    paired_differences,
)
from erasekit.models import SDXL, pipeline_class, read_manifest
from erasekit.outputs import (
    atomic_output_dir,
    check_not_input,
    write_json,
    write_jsonl,
)
from erasekit.progress import Progress, on_main, say
from erasekit.provenance import (
    run_provenance,
)
from erasekit.sampling import SamplerSettings


def run_audit(
    model: str | Path,
    concept: Concept,
    out: str | Path,
    *,
    roles: Mapping[str, str | Path | None] | None = None,
    audit: AuditSettings | None = None,
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
    from erasekit.reporting import write_report

    started = time.time()
    audit = audit or AuditSettings()
    roles = resolve_roles(model, concept, roles)
    check_not_input(out, [*roles.values(), model_config, audit.captions, audit.fid_images])
    device = resolve_device(audit.device)
    detectors = DetectorOptions(**{**asdict(detectors or DetectorOptions()), "device": device})
    judges = build_judges(concept, detectors)  # fails before any rendering
    _refuse(concept, roles, attacks, baselines, original)
    fid = fid_setup(audit, detectors, roles)
    captions = None
    if audit.captions:
        from erasekit.concepts import read_prompt_set

        captions = read_prompt_set(audit.captions, CAPTIONS)
    sets = audit_prompt_sets(concept, audit.limit, captions)
    settings = SamplerSettings.for_model(model_config or roles["audited"], steps=audit.steps,
                                         guidance=audit.guidance)  # fmt: skip
    state = process_state(device)
    with atomic_output_dir(Path(out), overwrite, state) as tmp:
        run = _Run(concept, roles, judges, sets, settings, audit, device, tmp, state, progress)
        run.measure_roles(model_config, allow_pickle, baselines, labels)
        if fid is not None and state.is_main_process:
            say(progress, "audit", "FID/KID of the utility sets ...")
            for role, metrics in distribution_results(*fid, run.samples, sets, tmp,
                                                      audit.seed).items():  # fmt: skip
                run.results[role].update(metrics)
        if attacks:
            run.attack(attacks, original, cache_dir)
        document = run.document(invocation, started)
        if state.is_main_process:
            write_jsonl(tmp / "samples.jsonl", run.samples)
            write_json(tmp / "results.json", document)
            write_report(tmp, censor=censor)
    return document


def _refuse(concept: Concept, roles: dict[str, Path | None], attacks, baselines: bool,
            original) -> None:  # fmt: skip
    """What an audit cannot do, said before any rendering."""
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


@dataclass
class _Run:
    """One audit in progress: what it compares and how, and what it has measured so far."""

    concept: Concept
    roles: dict[str, Path | None]
    judges: Any
    sets: list
    settings: SamplerSettings
    audit: AuditSettings
    device: str
    tmp: Path
    state: Any
    progress: Progress
    samples: list[dict] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)
    breakdowns: dict[str, dict] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, Any] = field(default_factory=dict)

    def _evaluate(self, pipe, path: Path, role: str) -> None:
        s, m, b = evaluate_model(pipe, path, role, self.sets, self.judges, self.tmp,
                                 self.settings, self.audit)  # fmt: skip
        self.samples += s
        self.results[role] = m
        self.breakdowns[role] = b

    def measure_roles(self, model_config, allow_pickle: bool, baselines: bool, labels) -> None:
        """Every role's prompt sets rendered and judged (and the audited weights' guidance
        baselines): samples, metrics, breakdowns and what each model is."""
        from erasekit.models import load_pipeline

        audited = self.roles["audited"]
        manifest = read_manifest(audited) if audited.is_dir() else {}
        for role, path in self.roles.items():
            if path is None:
                continue
            say(self.progress, "audit", f"rendering and scoring the {role} model ({path}) ...",
                main=self.state.is_main_process)  # fmt: skip
            pipe = load_pipeline(path, dtype=self.audit.dtype, device=self.device,
                                 config=model_config if role == "audited" else None,
                                 allow_pickle=allow_pickle)  # fmt: skip
            try:
                self._evaluate(pipe, path, role)
            except DegenerateOutput as e:
                raise DegenerateOutput(f"the {role} model {path}: {e}") from None
            base = manifest.get("base_model") if role == "reference" else None
            self.models[role] = {**describe_model(path, base), **(labels or {}).get(role, {})}
            if role == "audited" and baselines:
                own = getattr(pipe, "erasekit_guidance", None)
                for name, guidance in guidance_baselines(self.concept, own).items():
                    pipe.erasekit_guidance = guidance
                    self._evaluate(pipe, path, name)
                    self.models[name] = {**self.models["audited"], "guidance":
                                         guidance.describe() if guidance else None}  # fmt: skip
            del pipe
            gc.collect()

    def attack(self, attacks: dict[str, Any], original, cache_dir) -> None:
        """Every attack on every role, with the same data and budget."""
        forget = self.concept.forget
        curve_set = next(ps for ps, _ in self.sets if ps.sha256 == forget.sha256
                         and ps.prompts == forget.prompts[: len(ps)])  # fmt: skip
        unattacked = {role: [s for s in self.samples if s["model"] == role
                             and s["prompt_set"] == curve_set.name]
                      for role, path in self.roles.items() if path is not None}  # fmt: skip
        self.attacks, attacked, attacked_samples = run_attacks(
            attacks, self.roles, self.concept, curve_set, self.judges, self.tmp, self.settings,
            self.audit, self.device, on_main(self.progress, self.state.is_main_process),
            original=Path(original) if original else None,
            cache_dir=Path(cache_dir) if cache_dir else None, unattacked=unattacked,
        )  # fmt: skip
        self.results.update(attacked)
        self.samples += attacked_samples

    def document(self, invocation: dict[str, Any] | None, started: float) -> dict[str, Any]:
        """The results document (results.json)."""
        from erasekit.reporting import SCHEMA, SCHEMA_VERSION

        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "kind": "audit",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(invocation or {"call": {"function": "erasekit.auditing.run_audit"}}),
            "concept": self.concept.describe(),
            "models": self.models,
            "detectors": self.judges.describe(),
            "protocols": self.judges.protocol_definitions(),
            "evaluation": {
                **asdict(self.audit),
                "device": self.device,
                "sampler": {**asdict(self.settings)},
                "prompt_sets": {ps.name: {**ps.describe(), "utility": u} for ps, u in self.sets},
                "primary_protocol": self.judges.protocols[0].name,
            },
            "results": self.results,
            "paired": {
                "definition": PAIRED_DEFINITION,
                "audited_minus": paired_differences(self.samples, self.results),
            },
            "breakdowns": self.breakdowns,
            "attacks": self.attacks,
            "provenance": {
                **run_provenance(started, memory=True),
                "n_processes": self.state.num_processes,
            },
        }
