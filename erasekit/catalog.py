"""What erasekit offers, read from its registries: every method, attack and detector with its
one-line summary, source, presets and the evidence behind them. The list commands
(``erasekit methods``), the generated help and the tables in the README and the docs all come
from here, so a newly registered name appears everywhere at once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from erasekit.attacks import ATTACKS
from erasekit.detectors import DETECTORS
from erasekit.methods import METHODS

REGISTRIES = {"methods": METHODS, "attacks": ATTACKS, "detectors": DETECTORS}
# Generated blocks in Markdown files: <!-- table:KIND[ link=PREFIX] --> ... <!-- /table:KIND -->
TABLE = re.compile(
    r"(?P<open><!-- table:(?P<kind>[\w-]+)(?: link=(?P<link>\S+))? -->\n)(?P<body>.*?)"
    r"(?P<close><!-- /table:(?P=kind) -->)",
    re.DOTALL,
)


@dataclass(frozen=True)
class Entry:
    """One registered name as a user sees it."""

    name: str
    summary: str
    source: str = ""
    kind: str = ""  # attacks: recovery or prompt
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # --preset NAME
    world: dict[str, Any] = field(default_factory=dict)  # the ShapesWorld preset as data
    protocols: dict[str, str] = field(default_factory=dict)  # detectors: protocol -> its rule


def names(kind: str) -> list[str]:
    """The registered names of ``kind`` (methods, attacks, detectors), without importing them."""
    return REGISTRIES[kind].names()


def preset_names() -> dict[str, list[str]]:
    """Each method's ``--preset`` names, from its presets file alone (nothing imported)."""
    from erasekit.methods import preset_data

    found = {n: list(preset_data(n).get("presets") or {}) for n in names("methods")}
    return {n: p for n, p in found.items() if p}


def entry(kind: str, name: str) -> Entry:
    """The entry for one registered name (imports its module)."""
    obj = REGISTRIES[kind].get(name)
    info = obj.preset_info() if hasattr(obj, "preset_info") else {}
    presets = {k: dict(v) for k, v in (info.get("presets") or {}).items()}
    kind_of = getattr(obj, "kind", "") if kind == "attacks" else ""
    rules = obj.protocol_rules() if hasattr(obj, "protocol_rules") else {}
    return Entry(name, obj.summary, getattr(obj, "source", ""), kind_of, presets,
                 dict(info.get("world") or {}), rules)  # fmt: skip


def entries(kind: str) -> list[Entry]:
    """Every registered name of ``kind``, sorted."""
    if kind not in REGISTRIES:
        raise KeyError(f"unknown catalog {kind!r} (choose from {', '.join(REGISTRIES)})")
    return [entry(kind, n) for n in names(kind)]


def listing(kind: str) -> str:
    """Plain text, one line per name: what ``erasekit methods`` prints."""
    rows = entries(kind)
    width = max(len(e.name) for e in rows)
    lines = []
    for e in rows:
        extra = [f"presets: {', '.join(e.presets)}"] if e.presets else []
        extra += ["ShapesWorld preset"] if e.world else []
        extra += [e.kind] if e.kind else []
        tail = f" [{'; '.join(extra)}]" if extra else ""
        lines.append(f"{e.name:{width}s}  {e.summary}{tail}")
    return "\n".join(lines)


def details(kind: str, name: str) -> str:
    """Plain text about one name: summary, source, presets with their settings, the world
    preset's rule and evidence."""
    e = entry(kind, name)
    lines = [f"{e.name}: {e.summary}"]
    lines += [f"source: {e.source}"] if e.source else []
    lines += [f"protocol {p}: {rule}" for p, rule in e.protocols.items()]
    for preset, data in e.presets.items():
        lines.append(f"--preset {preset}: {_settings(data.get('settings'))}")
        lines += [f"  from: {data['source']}"] if data.get("source") else []
    if e.world:
        lines.append(f"ShapesWorld preset: {_settings(e.world.get('settings'))}")
        for dimension, values in (e.world.get("by_dimension") or {}).items():
            lines.append(f"  {dimension}: {_settings(values)}")
        for variant, values in (e.world.get("by_variant") or {}).items():
            lines.append(f"  variant {variant}: {_variant_settings(values)}")
        lines += (
            [f"  chosen by: {' '.join(e.world['rule'].split())}"] if e.world.get("rule") else []
        )
        lines += [f"  evidence: {', '.join(e.world.get('evidence') or [])}"]
    return "\n".join(lines)


def _settings(values: dict[str, Any] | None) -> str:
    return " ".join(f"{k}={v}" for k, v in (values or {}).items()) or "(none)"


def _variant_settings(entry: dict[str, Any]) -> str:
    """A variant's world values: its settings, then each dimension's."""
    parts = [_settings(entry["settings"])] if entry.get("settings") else []
    parts += [f"{d}: {_settings(v)}" for d, v in (entry.get("by_dimension") or {}).items()]
    return "; ".join(parts) or "(none)"


def markdown_table(kind: str, link: str | None = None) -> str:
    """A Markdown table of ``kind``; with ``link``, each name links to ``{link}{name}.md``
    (methods) or the ``{link}`` page's section."""
    header = {"methods": "| method | what it does | ShapesWorld preset |\n|---|---|---|",
              "attacks": "| attack | kind | what it does |\n|---|---|---|",
              "detectors": "| detector | what it judges |\n|---|---|",
              "protocols": "| detector | protocol | rule |\n|---|---|---|"}[kind]  # fmt: skip
    rows = [header]
    if kind == "protocols":
        for e in entries("detectors"):
            rows += [f"| `{e.name}` | `{p}` | {rule} |" for p, rule in e.protocols.items()]
        return "\n".join(rows) + "\n"
    for e in entries(kind):
        name = f"`{e.name}`"
        if link:
            target = f"{link}{e.name}.md" if kind == "methods" else f"{link}#{e.name}"
            name = f"[{name}]({target})"
        if kind == "methods":
            rows.append(f"| {name} | {e.summary} | {'yes' if e.world else 'no'} |")
        elif kind == "attacks":
            rows.append(f"| {name} | {e.kind} | {e.summary} |")
        else:
            rows.append(f"| {name} | {e.summary} |")
    return "\n".join(rows) + "\n"


def method_card(name: str, link: str = "") -> str:
    """Markdown for one method's page: summary, source, ``--preset`` settings and the
    ShapesWorld preset with the rule that chose it and its evidence (``{link}results/...``)."""
    e = entry("methods", name)
    out = [f"{e.summary[0].upper()}{e.summary[1:]}.", ""]
    out += [f"**Source:** {e.source}.", ""] if e.source else []
    for preset, data in e.presets.items():
        origin = f" — {data['source']}" if data.get("source") else ""
        out.append(f"- `--preset {preset}`: `{_settings(data.get('settings'))}`{origin}")
    if e.world:
        out.append(f"- ShapesWorld preset (applied to every world concept): "
                   f"`{_settings(e.world.get('settings'))}`")  # fmt: skip
        for dimension, values in (e.world.get("by_dimension") or {}).items():
            out.append(f"    - {dimension}: `{_settings(values)}`")
        for variant, values in (e.world.get("by_variant") or {}).items():
            out.append(f"    - variant `{variant}`: `{_variant_settings(values)}`")
        out.append(f"    - chosen by: {' '.join(str(e.world.get('rule', '')).split())}")
        folders = [f.removeprefix("docs/") for f in e.world.get("evidence") or []]
        evidence = ", ".join(f"[{f}]({link}{f}leaderboard.md)" for f in folders)
        out.append(f"    - evidence: {evidence}")
    if not e.presets and not e.world:
        out.append("- no presets: its defaults apply everywhere")
    return "\n".join(out) + "\n"


def fill_tables(text: str) -> str:
    """``text`` with every generated block rewritten from the registries:
    ``<!-- table:KIND -->`` (methods, attacks, detectors) and ``<!-- table:method-NAME -->``."""

    def fill(m: re.Match) -> str:
        kind = m["kind"]
        if kind.startswith("method-"):
            return (
                m["open"] + method_card(kind.removeprefix("method-"), m["link"] or "") + m["close"]
            )
        return m["open"] + markdown_table(kind, m["link"]) + m["close"]

    return TABLE.sub(fill, text)


__all__ = [
    "Entry",
    "details",
    "entries",
    "entry",
    "fill_tables",
    "listing",
    "markdown_table",
    "method_card",
]
