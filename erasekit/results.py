"""What the Python API hands back, made for notebooks: ``Metric`` (a measured number with its
definition, printed as ``0.00 [0.00, 0.04] (n=96)``), ``MetricTable`` (one row per metric, one
column per model role), ``AuditResult`` (an audit's results document, its table, images and an
inline HTML summary) and ``ErasedModel`` (the erased folder as a path, with its manifest and
its pipeline)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Metric(dict):
    """One metric as results.json holds it (``value``, ``ci95``, ``n_images``, ``definition``
    ...): a dict, so existing code keeps indexing it, with a readable ``str``."""

    @property
    def value(self) -> float | None:
        return self.get("value")

    @property
    def ci95(self) -> list[float] | None:
        return self.get("ci95")

    @property
    def n(self) -> int | None:
        """Images (rates), else prompts, it was measured on."""
        return next((self[k] for k in ("n_images", "n_prompts", "n") if k in self), None)

    def __str__(self) -> str:
        if self.value is None:
            return "not measured"
        digits = 2 if abs(self.value) < 100 else 1
        text = f"{self.value:.{digits}f}"
        if self.ci95:
            low, high = self.ci95
            text += f" [{low:.{digits}f}, {high:.{digits}f}]"
        return text + (f" (n={self.n})" if self.n is not None else "")

    def __repr__(self) -> str:
        return f"Metric({self})"


class MetricTable(dict):
    """metric key -> role -> ``Metric``; ``str`` is an aligned text table, and Jupyter shows
    HTML."""

    def __init__(self, cells: dict[str, dict[str, Metric]], roles: list[str]) -> None:
        super().__init__(cells)
        self.roles = roles

    def _rows(self) -> list[list[str]]:
        rows = [["metric", *self.roles]]
        for key, by_role in self.items():
            rows.append([key, *(str(by_role[r]) if r in by_role else "—" for r in self.roles)])
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in rows)  # fmt: skip

    def to_markdown(self) -> str:
        rows = self._rows()
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"

    def _repr_html_(self) -> str:
        rows = self._rows()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in rows[1:])  # fmt: skip
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class AuditResult:
    """An audit's results document (``results.json``, as written) and where it was written."""

    document: dict[str, Any]
    path: Path

    @classmethod
    def of(cls, document: dict[str, Any], path: str | Path) -> AuditResult:
        """The document as results.json holds it (JSON types only)."""
        return cls(json.loads(json.dumps(document, default=str)), Path(path))

    @classmethod
    def load(cls, folder: str | Path) -> AuditResult:
        """The result of an audit folder written earlier."""
        from erasekit.reporting import load_results

        doc, _ = load_results(Path(folder))
        return cls(doc, Path(folder))

    @property
    def metrics(self) -> dict[str, Metric]:
        """The audited model's metrics by key (value, ci95, n, definition)."""
        return self.results["audited"]

    @property
    def results(self) -> dict[str, dict[str, Metric]]:
        """Every role's metrics: role -> key -> metric (attacked models as ``attack:role``)."""
        return {role: {k: Metric(m) for k, m in metrics.items()}
                for role, metrics in self.document["results"].items()}  # fmt: skip

    @property
    def roles(self) -> list[str]:
        return [r for r in self.document["results"] if ":" not in r]

    def table(self, attacks: bool = False) -> MetricTable:
        """One row per metric, one column per model role (``attacks``: the attacked models'
        columns too)."""
        results = self.results
        roles = [r for r in results if attacks or ":" not in r]
        keys = list(dict.fromkeys(k for r in roles for k in results[r]))
        cells = {k: {r: results[r][k] for r in roles if k in results[r]} for k in keys}
        return MetricTable(cells, roles)

    def verdicts(self) -> list[str]:
        """One plain statement per metric (values, intervals, n; never a 'safe')."""
        from erasekit.reporting import summary_rows, verdict

        return [verdict(row) for row in summary_rows(self.document)]

    def images(self, role: str = "audited", prompt_set: str | None = None) -> list[Path]:
        """The image files one role rendered (of one prompt set, e.g. "direct"), in order."""
        from erasekit.reporting import load_results

        _, samples = load_results(self.path)
        if role not in {s.get("model") for s in samples}:
            raise KeyError(f"no images of role {role!r} (roles: {', '.join(self.roles)})")
        return [self.path / s["image"] for s in samples if s.get("model") == role
                and (prompt_set is None or s.get("prompt_set") == prompt_set)]  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(self.document, indent=2)

    def _repr_html_(self) -> str:
        """The summary table, the verdicts and the bar plots, inline in Jupyter."""
        from erasekit.reporting import plot_uri

        verdicts = "".join(f"<li>{html.escape(v)}</li>" for v in self.verdicts())
        metrics = dict.fromkeys(k.split("/")[0].split("[")[0] for k in self.metrics)
        plots = [uri for m in metrics if (uri := plot_uri(self.document, m))]
        images = "".join(f'<img src="{uri}" style="max-width:32em">' for uri in plots)
        concept = html.escape(self.document["concept"]["name"])
        return (f"<h4>erasekit audit of {concept}: {html.escape(str(self.path))}</h4>"
                f"{self.table()._repr_html_()}<ul>{verdicts}</ul>{images}")  # fmt: skip


class ErasedModel(type(Path())):
    """An erased model's folder: a path (``os.PathLike``) with its manifest and pipeline."""

    @property
    def manifest(self) -> dict[str, Any]:
        """``erasekit.json``: method, full config, concept, base model, seeds, cost."""
        from erasekit.models import read_manifest

        return read_manifest(self) or {}

    def pipeline(self, **options: Any):
        """The diffusers pipeline (``erasekit.load_pipeline`` options: device, dtype ...)."""
        from erasekit.models import load_pipeline

        return load_pipeline(self, **options)


__all__ = ["AuditResult", "ErasedModel", "Metric", "MetricTable"]
