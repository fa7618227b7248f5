"""Reports from an audit folder: report.html (self-contained, censored thumbnails, plots,
definitions) and report.md (the same summary), re-rendered from results.json + samples.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.outputs import atomic_file
from erasekit.reporting.card import (  # noqa: F401 - re-exported
    CARD_EVIDENCE,
    audited_metrics,
    model_card_index,
    write_model_card,
)
from erasekit.reporting.html import (  # noqa: F401 - re-exported
    MAX_IMAGES_PER_CELL,
    THUMB,
    censor,
    prompt_attack_tables,
    prompt_roles,
    prompt_rows,
    render_html,
    sample_flagged,
    thumbnail_uri,
)
from erasekit.reporting.plots import (  # noqa: F401 - re-exported
    bar_plot_uri,
    curve_plot_uri,
    line_plot_uri,
    plot_uri,
    tradeoff_plot_uri,
)
from erasekit.reporting.summary import (  # noqa: F401 - re-exported
    ROLE_LABEL,
    ROLE_ORDER,
    SCHEMA,
    SCHEMA_VERSION,
    UTILITY_FLOOR,
    UTILITY_METRICS,
    UTILITY_ROLES,
    attack_rows,
    attack_verdicts,
    check_results,
    cost_text,
    digits_of,
    fmt_metric,
    guidance_text,
    guidance_verdicts,
    load_results,
    metric_title,
    paired_text,
    primary_rule,
    print_summary,
    prompt_attack_rows,
    prompt_attack_verdicts,
    rate_text,
    roles_of,
    summary_rows,
    utility_warning,
    verdict,
)


def render_markdown(doc: dict[str, Any], censored: bool = True, censor_reason: str = "") -> str:
    concept = doc["concept"]
    roles = roles_of(doc)
    shown = "blurred in report.html" if censored else "shown as rendered in report.html"
    lines = [
        f"# erasekit audit: concept '{concept['name']}' ({concept['kind']})",
        "",
        f"Audited model: `{doc['models']['audited']['path']}`",
        "",
        f"Flagged images: {shown} ({censor_reason}).",
        "",
        "| metric | " + " | ".join(roles) + " | Δ (audited − reference) | n (audited) |",
        "|---|" + "---|" * len(roles) + "---|---|",
    ]
    for row in summary_rows(doc):
        d = digits_of(row)
        cells = [fmt_metric(row["roles"].get(r), d) for r in roles]
        delta = f"{row['delta']:+.{d}f}" if row["delta"] is not None else "—"
        if "reference" in row["paired"]:
            delta = paired_text(row["paired"]["reference"], d).rsplit(" (", 1)[0]
        audited = row["roles"].get("audited")
        n = f"{audited['n_images']} img / {audited['n_prompts']} prompts" if audited else "—"
        lines.append(f"| {metric_title(row['first'])} | " + " | ".join(cells) +
                     f" | {delta} | {n} |")  # fmt: skip
    lines += ["", "Values: mean [95% interval]. Rates: Wilson; means: bootstrap over prompts. "
              "Δ with an interval: paired on the same images (" +
              doc.get("paired", {}).get("definition", "not recorded") + ").", ""]  # fmt: skip
    lines += ["## Verdicts", ""] + [f"- {verdict(r)}" for r in summary_rows(doc)]
    if guidance_verdicts(doc):
        lines += ["", "## Guidance on the audited weights", "",
                  "The audited weights rendered as shipped and with each baseline guidance "
                  "(same prompts, seeds and detectors):", ""]  # fmt: skip
        lines += [f"- {v}" for v in guidance_verdicts(doc)]
    attacks = attack_rows(doc)
    if attacks:
        lines += ["", "## Recovery attacks", "",
                  "| attack | model | before | after | Δ | steps | images | seconds |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in attacks:
            c = r["cost"]
            lines.append(f"| {r['attack']} | {r['role']} | {rate_text(r['before'])} | "
                         f"{rate_text(r['after'])} | {100 * r['delta']:+.0f} pts | {c['steps']} | "
                         f"{c['images']} | {c['seconds']} |")  # fmt: skip
        lines += [""] + [f"- {v}" for v in attack_verdicts(doc)]
    prompt_attacks = prompt_attack_rows(doc)
    if prompt_attacks:
        lines += ["", "## Adversarial prompts", "",
                  "| attack | model | pre-ASR | ASR | n prompts | cost |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in prompt_attacks:
            lines.append(f"| {r['attack']} | {r['role']} | {rate_text(r['pre_asr'])} | "
                         f"{rate_text(r['asr'])} | {r['asr']['n_prompts']} | "
                         f"{cost_text(r['cost'])} |")  # fmt: skip
        lines += ["", "ASR = (pre-attack successes + successes under attack) / N prompts, one "
                  "image per prompt, primary protocol; Wilson 95% intervals.", ""]  # fmt: skip
        lines += [f"- {v}" for v in prompt_attack_verdicts(doc)]
    lines += ["", "## Definitions", ""]
    for name, proto in doc["protocols"].items():
        lines.append(f"- protocol `{name}`: {proto.get('rule')} ({json.dumps(proto)})")
    for name, det in doc["detectors"].items():
        lines.append(f"- detector `{name}`: {det['version']}")
    for name, ps in doc["evaluation"]["prompt_sets"].items():
        utility = " (utility)" if ps.get("utility") else ""
        lines.append(f"- prompt set `{name}`: {ps['n_prompts']} prompts, {ps['source']}, "
                     f"sha256 `{ps['sha256']}`{utility}")  # fmt: skip
    ev = doc["evaluation"]
    lines.append(f"- sampling: {json.dumps(ev['sampler'])}, {ev['n_per_prompt']} image(s) per "
                 f"prompt, base seed {ev['seed']}")  # fmt: skip
    prov = doc["provenance"]
    lines += ["", f"erasekit {prov['erasekit_version']}, commit `{prov['git_commit']}`.", ""]
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def censoring(doc: dict[str, Any], censor: bool | None = None) -> tuple[bool, str]:
    """(whether flagged images are blurred, why): ``censor`` when given, else the concept's
    ``sensitive`` flag (a results file without one counts as sensitive)."""
    concept = doc.get("concept") or {}
    if censor is not None:
        return censor, "--censor" if censor else "--uncensored"
    sensitive = concept.get("sensitive", True)
    why = f"concept '{concept.get('name')}' is {'' if sensitive else 'not '}marked sensitive"
    return bool(sensitive), why


def write_report(folder: str | Path, censor: bool | None = None) -> tuple[Path, Path]:
    """(Re)write report.html and report.md in an audit folder from its results. Flagged images
    are blurred when ``censor`` is True, shown when False, and by default when the concept is
    marked sensitive (``nudity`` and any user spec that does not say ``sensitive: false``)."""
    folder = Path(folder)
    doc, samples = load_results(folder)
    blur, why = censoring(doc, censor)
    uncensored = not blur
    missing = [s["image"] for s in samples if not (folder / s["image"]).is_file()]
    if missing:
        raise ErasekitError(f"{len(missing)} images are missing from {folder}, e.g. {missing[0]}")
    html_path, md_path = folder / "report.html", folder / "report.md"
    _write_text(html_path, render_html(folder, doc, samples, uncensored, why))
    _write_text(md_path, render_markdown(doc, blur, why))
    return html_path, md_path


__all__ = [
    "CARD_EVIDENCE",
    "MAX_IMAGES_PER_CELL",
    "ROLE_LABEL",
    "ROLE_ORDER",
    "SCHEMA",
    "SCHEMA_VERSION",
    "THUMB",
    "UTILITY_FLOOR",
    "UTILITY_METRICS",
    "UTILITY_ROLES",
    "attack_rows",
    "attack_verdicts",
    "audited_metrics",
    "bar_plot_uri",
    "censor",
    "censoring",
    "check_results",
    "cost_text",
    "curve_plot_uri",
    "guidance_text",
    "guidance_verdicts",
    "line_plot_uri",
    "load_results",
    "metric_title",
    "model_card_index",
    "plot_uri",
    "tradeoff_plot_uri",
    "primary_rule",
    "print_summary",
    "prompt_attack_rows",
    "prompt_attack_tables",
    "prompt_attack_verdicts",
    "prompt_roles",
    "prompt_rows",
    "render_html",
    "render_markdown",
    "roles_of",
    "sample_flagged",
    "summary_rows",
    "thumbnail_uri",
    "utility_warning",
    "verdict",
    "write_model_card",
    "write_report",
]
