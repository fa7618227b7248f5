"""The report's figures: bar plots with 95% interval whiskers and recovery curves, as
PNG data URIs (matplotlib, no display)."""

from __future__ import annotations

import base64
import io
from typing import Any

from erasekit.reporting.summary import ROLE_LABEL, attack_rows, roles_of, summary_rows


def _figure_uri(fig) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def tradeoff_plot_uri(points: list[dict[str, Any]], xlabel: str, ylabel: str,
                      title: str) -> str:  # fmt: skip
    """A trade-off scatter: one point per (label, x metric, y metric, kind), each with its 95%
    interval on both axes; kind ``original`` and ``never-learned`` are marked apart from the
    methods. A PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"original": ("s", "black"), "never-learned": ("*", "tab:green")}  # marked apart
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=100)
    for p in points:
        x, y = p["x"], p["y"]
        marker, colour = style.get(p["kind"], ("o", "tab:blue"))
        ax.errorbar(x["value"], y["value"],
                    xerr=[[x["value"] - x["ci95"][0]], [x["ci95"][1] - x["value"]]],
                    yerr=[[y["value"] - y["ci95"][0]], [y["ci95"][1] - y["value"]]],
                    fmt=marker, color=colour, ms=8 if marker == "*" else 5, capsize=2,
                    elinewidth=0.8, alpha=0.9)  # fmt: skip
        ax.annotate(p["label"], (x["value"], y["value"]), textcoords="offset points",
                    xytext=(4, 3), fontsize=7)  # fmt: skip
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(min([0.5] + [p["y"]["ci95"][0] - 0.03 for p in points]), 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    for kind, (marker, colour) in style.items():  # the two references, named in a legend
        ax.plot([], [], marker, color=colour, label=kind)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _figure_uri(fig)


def line_plot_uri(series: list[tuple[str, list[dict[str, Any]]]], title: str,
                  xlabel: str = "attack steps", ylabel: str = "concept rate") -> str:  # fmt: skip
    """Concept rate (or ASR) against attack steps (or budget): one line per (label, points
    with step, value, ci95), each with its 95% band; a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.0), dpi=100)
    for label, points in series:
        steps = [p["step"] for p in points]
        line = ax.plot(steps, [p["value"] for p in points], marker="o", ms=3, label=label)[0]
        ax.fill_between(steps, [p["ci95"][0] for p in points], [p["ci95"][1] for p in points],
                        color=line.get_color(), alpha=0.15)  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    return _figure_uri(fig)


def bar_plot_uri(
    categories: list[str], groups: list[tuple[str, list[dict[str, Any] | None]]], ylabel: str,
    title: str, unit_range: bool = True,
) -> str:  # fmt: skip
    """Grouped bars: per category one bar for each (label, metrics aligned with categories),
    with 95% interval whiskers; a missing metric leaves a gap. A PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(categories) + 1.5), 3.0), dpi=100)
    width = 0.8 / len(groups)
    for j, (label, metrics) in enumerate(groups):
        xs, ys, errs = [], [], [[], []]
        for i, m in enumerate(metrics):
            if m:
                xs.append(i + (j - (len(groups) - 1) / 2) * width)
                ys.append(m["value"])
                errs[0].append(m["value"] - m["ci95"][0])
                errs[1].append(m["ci95"][1] - m["value"])
        if xs:
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, fontsize=8)
    ax.set_ylabel(ylabel)
    if unit_range:
        ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    return _figure_uri(fig)


def curve_plot_uri(doc: dict[str, Any], attack: str) -> str | None:
    """Concept rate vs attack steps (a prompt attack: ASR vs its budget, the never-learned
    model's curve the floor), one line per attacked model, 95% bands."""
    entry = doc.get("attacks", {}).get(attack, {})
    if entry.get("kind") == "prompt":
        models = entry.get("models", {})
        series = [(ROLE_LABEL.get(r, r), models[r]["curve"]) for r in models
                  if models[r].get("curve")]  # fmt: skip
        if not series:
            return None
        unit = entry.get("budgets", {}).get("unit", "budget")
        return line_plot_uri(series, f"ASR under '{attack}' by budget (95% bands; "
                             "never-learned = the attack's power without memory)", unit,
                             "ASR")  # fmt: skip
    rows = [r for r in attack_rows(doc) if r["attack"] == attack]
    if not rows:
        return None
    series = [(ROLE_LABEL.get(r["role"]), r["curve"]) for r in rows]
    return line_plot_uri(series, f"recovery under '{attack}' (95% bands)")


def plot_uri(doc: dict[str, Any], metric: str, primary_only: bool = True) -> str | None:
    """Grouped bars (one per role) with 95% interval whiskers for one metric over prompt sets."""
    rows = [r for r in summary_rows(doc) if r["first"]["metric"] == metric]
    if primary_only:
        primary = doc["evaluation"]["primary_protocol"]
        rows = [r for r in rows if r["first"].get("protocol") in (None, primary)]
    if not rows:
        return None
    groups = [(ROLE_LABEL.get(role, role), [r["roles"].get(role) for r in rows])
              for role in roles_of(doc)]  # fmt: skip
    return bar_plot_uri([r["first"]["prompt_set"] for r in rows], groups,
                        metric.replace("_", " "), f"{metric.replace('_', ' ')} with 95% intervals",
                        unit_range=metric != "clip_score")  # fmt: skip
