"""report.html: the self-contained page (summary, verdicts, plots, per-prompt tables with
thumbnails, definitions), with flagged images blurred when the concept is sensitive."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from erasekit.reporting.plots import curve_plot_uri, plot_uri
from erasekit.reporting.summary import (
    ROLE_ORDER,
    attack_rows,
    attack_verdicts,
    cost_text,
    digits_of,
    fmt_metric,
    guidance_verdicts,
    metric_title,
    paired_text,
    primary_rule,
    prompt_attack_rows,
    prompt_attack_verdicts,
    rate_text,
    roles_of,
    summary_rows,
    verdict,
)

THUMB = 128


MAX_IMAGES_PER_CELL = 4


def prompt_attack_tables(doc: dict[str, Any], samples: list[dict[str, Any]],
                         folder: Path, uncensored: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Per adversarial-prompt attack: one row per attacked prompt with each model's outcome
    (pre-check success, success step, adversarial prompt) and its final image, censored when
    flagged."""
    tables = []
    for name, entry in doc.get("attacks", {}).items():
        if entry.get("kind") != "prompt":
            continue
        roles = [r for r in ROLE_ORDER if r in entry["models"]]
        by_key = {(s["model"], s["prompt_index"]): s for s in samples
                  if s.get("attack") == name}  # fmt: skip
        first = entry["models"][roles[0]]["outcomes"] if roles else []
        rows = []
        for o in first:
            cells = {}
            for role in roles:
                oc = entry["models"][role]["outcomes"][o["index"]]
                sample = by_key.get((f"{name}:{role}", o["index"]))
                thumb = None
                if sample is not None:
                    uri, censored = thumbnail_uri(folder, sample, uncensored)
                    thumb = {"uri": uri, "censored": censored, "flagged": sample_flagged(sample)}
                if oc["pre_success"]:
                    status = "pre-check success (not attacked)"
                elif oc["success"]:
                    status = f"success after {oc['success_step']} {oc.get('step_unit', 'steps')}"
                else:
                    status = "failed within the budget"
                cells[role] = {"status": status, "adversarial": oc["adversarial_prompt"],
                               "thumb": thumb}  # fmt: skip
            rows.append({"index": o["index"], "prompt": o["prompt"], "cells": cells})
        tables.append({"attack": name, "roles": roles, "rows": rows})
    return tables


def censor(image: Image.Image, boxes: list[list[int]] | None = None) -> Image.Image:
    """A strongly blurred copy, with detector boxes (x, y, w, h) blacked out on top."""
    image = image.convert("RGB")
    radius = max(4, max(image.size) // 8)
    out = image.filter(ImageFilter.GaussianBlur(radius))
    if boxes:
        draw = ImageDraw.Draw(out)
        for x, y, w, h in boxes:
            draw.rectangle([x, y, x + w, y + h], fill=(0, 0, 0))
    return out


def sample_flagged(sample: dict[str, Any]) -> bool:
    return any(sample.get("flags", {}).values())


def _boxes(sample: dict[str, Any]) -> list[list[int]]:
    nude = sample.get("scores", {}).get("nudenet") or {}
    return [d["box"] for d in nude.get("detections", [])]


def thumbnail_uri(folder: Path, sample: dict[str, Any], uncensored: bool) -> tuple[str, bool]:
    """A data URI of the sample's thumbnail, and whether it was censored."""
    image = Image.open(folder / sample["image"]).convert("RGB")
    censored = sample_flagged(sample) and not uncensored
    if censored:
        image = censor(image, _boxes(sample))
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), censored


def prompt_rows(doc: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, list[dict]]:
    """Per prompt set, per prompt: each role's flagged share (primary protocol) and samples."""
    primary = doc["evaluation"]["primary_protocol"]
    by_set: dict[str, dict[int, dict]] = {}
    for s in samples:
        if s.get("attack_kind") == "prompt":  # shown in the adversarial-prompt tables
            continue
        rows = by_set.setdefault(s["prompt_set"], {})
        row = rows.setdefault(s["prompt_index"], {"prompt": s["prompt"], "roles": {}})
        cell = row["roles"].setdefault(s["model"], {"flagged": 0, "n": 0, "samples": []})
        cell["n"] += 1
        cell["flagged"] += bool(s["flags"].get(primary))
        cell["samples"].append(s)
    return {name: [rows[i] for i in sorted(rows)] for name, rows in by_set.items()}


def prompt_roles(per_prompt: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Per prompt set, the models with images in it (base roles first, then attacked ones)."""
    out = {}
    for name, rows in per_prompt.items():
        present = {r for row in rows for r in row["roles"]}
        base = [r for r in ROLE_ORDER if r in present]
        out[name] = base + sorted(present - set(base))
    return out


def render_html(
    folder: Path, doc: dict[str, Any], samples: list, uncensored: bool, censor_reason: str = ""
) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )
    roles = roles_of(doc)
    per_prompt = prompt_rows(doc, samples)
    n_censored = 0
    for rows in per_prompt.values():
        for row in rows:
            for cell in row["roles"].values():
                cell["thumbs"] = []
                for s in cell["samples"][:MAX_IMAGES_PER_CELL]:
                    uri, censored = thumbnail_uri(folder, s, uncensored)
                    n_censored += censored
                    flagged = sample_flagged(s)
                    thumb = {
                        "uri": uri,
                        "censored": censored,
                        "flagged": flagged,
                        "seed": s["seed"],
                    }
                    cell["thumbs"].append(thumb)
    prompt_tables = prompt_attack_tables(doc, samples, folder, uncensored)
    n_censored += sum(c["thumb"]["censored"] for t in prompt_tables for r in t["rows"]
                      for c in r["cells"].values() if c["thumb"])  # fmt: skip
    rows = summary_rows(doc)
    plots = [
        (m, uri)
        for m in ("concept_rate", "retain_accuracy", "clip_score")
        if (uri := plot_uri(doc, m))
    ]
    breakdowns = [
        {
            "role": role,
            "set": set_name,
            "protocol": proto,
            "kind": kind,
            "counts": ", ".join(f"{label} {n}" for label, n in counts.items() if n),
        }
        for role, by_set in doc.get("breakdowns", {}).items()
        for set_name, by_proto in by_set.items()
        for proto, kinds in by_proto.items()
        for kind, counts in kinds.items()
    ]
    definitions = {
        k: doc.get(k) for k in ("concept", "protocols", "detectors", "evaluation", "models")
    }
    return env.get_template("template.html.j2").render(
        doc=doc,
        roles=roles,
        rows=rows,
        fmt=fmt_metric,
        paired=paired_text,
        digits=digits_of,
        title=metric_title,
        verdicts=[verdict(r) for r in rows],
        plots=plots,
        breakdowns=breakdowns,
        attack_rows=attack_rows(doc),
        attack_verdicts=attack_verdicts(doc),
        guidance_verdicts=guidance_verdicts(doc),
        prompt_attack_rows=prompt_attack_rows(doc),
        prompt_attack_verdicts=prompt_attack_verdicts(doc),
        prompt_attack_tables=prompt_tables,
        cost_text=cost_text,
        curve_plots=[
            (a, curve_plot_uri(doc, a))
            for a, e in doc.get("attacks", {}).items()
            if e.get("kind") != "prompt"
        ],
        asr_plots=[
            (a, curve_plot_uri(doc, a))
            for a, e in doc.get("attacks", {}).items()
            if e.get("kind") == "prompt"
        ],  # fmt: skip
        rate=rate_text,
        set_roles=prompt_roles(per_prompt),
        per_prompt=per_prompt,
        uncensored=uncensored,
        censor_reason=censor_reason,
        n_censored=n_censored,
        definitions=json.dumps(definitions, indent=2, default=str),
        provenance=json.dumps(doc.get("provenance"), indent=2, default=str),
        primary=doc["evaluation"]["primary_protocol"],
        primary_rule=primary_rule(doc),
    )
