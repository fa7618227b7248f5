"""The audit as a model card: results in the audited folder (``erasekit-audit.json``) and
Hugging Face ``model-index`` front matter with a section in its ``README.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.outputs import atomic_file

CARD_EVIDENCE = "erasekit-audit.json"  # the results document shipped beside the weights


CARD_BEGIN, CARD_END = "<!-- erasekit-audit:begin -->", "<!-- erasekit-audit:end -->"


def _pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) to parts of the results document."""
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def audited_metrics(
    doc: dict[str, Any], primary_only: bool = False
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The audited model's metrics, before and after each attack, as (attack or "", results
    role, results key, metric); ``primary_only``: rates of the primary protocol only."""
    primary = doc["evaluation"]["primary_protocol"]
    out = []
    for role, metrics in doc["results"].items():
        attack, sep, who = role.rpartition(":")
        if (who if sep else role) != "audited":
            continue
        out += [(attack, role, key, m) for key, m in metrics.items()
                if not primary_only or m.get("protocol") in (None, primary)]  # fmt: skip
    return out


def _card_label(attack: str, key: str) -> str:
    return f"{attack}:{key}" if attack else key


def model_card_index(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Hugging Face ``model-index`` metadata of an audit: one result per prompt set (or
    attack), each metric with its value, 95% interval, n and a pointer to its definition."""
    concept = doc["concept"]["name"]
    results: dict[str, dict[str, Any]] = {}
    for attack, role, key, m in audited_metrics(doc, primary_only=True):
        prompt_set = m.get("prompt_set") or key.rsplit("/", 1)[-1]
        name = f"{prompt_set} after {attack}" if attack else prompt_set
        entry = results.setdefault(name, {
            "task": {"type": "text-to-image", "name": f"erasekit audit: {concept}"},
            "dataset": {"name": name, "type": f"erasekit/{concept}"},
            "metrics": [],
        })  # fmt: skip
        entry["metrics"].append({
            "type": m["metric"],
            "name": _card_label(attack, key),
            "value": m["value"],
            "args": {"ci95": list(m["ci95"]), "n_images": m.get("n_images"),
                     "definition": CARD_EVIDENCE + _pointer("results", role, key)},
            "verified": False,
        })  # fmt: skip
    return list(results.values())


def write_model_card(model_dir: str | Path, doc: dict[str, Any]) -> Path:
    """Put an audit's evidence into a diffusers folder: the results document as
    ``erasekit-audit.json`` and, in ``README.md``, ``model-index`` front matter plus a section
    with the headline table (replacing an earlier audit's). Each file is replaced atomically;
    the rest of the card (other front-matter keys, the text) is kept."""
    import yaml

    from erasekit.outputs import write_json

    folder = Path(model_dir)
    if not (folder / "model_index.json").is_file():
        raise ErasekitError(f"--model-card needs the audited model as a diffusers folder: {folder}")
    card = folder / "README.md"
    text = card.read_text() if card.is_file() else ""
    meta: dict[str, Any] = {}
    body = text
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end < 0:
            raise ErasekitError(f"{card}: front matter has no closing '---'")
        try:
            meta = yaml.safe_load(text[4:end]) or {}
        except yaml.YAMLError as e:
            raise ErasekitError(f"{card}: front matter is not YAML ({e})") from None
        if not isinstance(meta, dict):
            raise ErasekitError(f"{card}: front matter is not a mapping")
        body = text[end + 4 :].lstrip("\n")
    meta["model-index"] = [{"name": folder.name, "results": model_card_index(doc)}]
    if CARD_BEGIN in body and CARD_END in body:
        body = body[: body.index(CARD_BEGIN)] + body[body.index(CARD_END) + len(CARD_END) :]
    concept = doc["concept"]["name"]
    version = doc["provenance"]["erasekit_version"]
    lines = [CARD_BEGIN, f"## Audit: {concept} (erasekit {version})", "",
             f"Measured by `erasekit audit` on {doc['created']}; every number's detector, "
             f"protocol, prompt set, seeds and interval are in `{CARD_EVIDENCE}` (the full "
             "results document). 95% intervals in brackets.", "",
             "| metric | value | 95% interval | n |", "|---|---|---|---|"]  # fmt: skip
    for attack, _, key, m in audited_metrics(doc, primary_only=True):
        low, high = m["ci95"]
        lines.append(f"| {_card_label(attack, key)} | {m['value']:.3f} | [{low:.3f}, {high:.3f}] "
                     f"| {m.get('n_images')} |")  # fmt: skip
    lines += ["", CARD_END]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    new = f"---\n{front}---\n\n{body.rstrip()}\n\n" + "\n".join(lines) + "\n"
    with atomic_file(folder / CARD_EVIDENCE) as tmp:
        write_json(tmp, doc)
    with atomic_file(card) as tmp:
        tmp.write_text(new)
    return card
