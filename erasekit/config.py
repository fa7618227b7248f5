"""Settings in layers: a method's or attack's defaults, then a YAML file, then a named mapping,
then ``key=value`` overrides; values coerced to the dataclass field's type, unknown keys are
errors that list the valid ones."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, TypeVar

from erasekit.errors import ErasekitError


def split_list(text: str) -> list[str]:
    """A comma-separated setting as its non-empty items."""
    return [t.strip() for t in text.split(",") if t.strip()]


def one_per(values: list[str], keys: list[str], *, owner: str, what: str, per: str) -> list[str]:
    """``values`` paired with ``keys`` in order: one value serves every key, else one each
    (e.g. UCE's guide texts per erased concept); a count that fits neither is one line."""
    if len(values) == 1:
        return values * len(keys)
    if len(values) != len(keys):
        raise ErasekitError(f"{owner}: {len(values)} {what} for {len(keys)} {per} (give one, or"
                            f" one per {per.removesuffix('s')})")  # fmt: skip
    return values


C = TypeVar("C")


def _coerce(cls: type, key: str, value: Any) -> Any:
    """``value`` as the field's type; every float finite (no NaN or inf setting is ever useful)."""
    value = _as_type(cls, key, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ErasekitError(f"{key}: expected a finite number, got {value}")
    return value


def _as_type(cls: type, key: str, value: Any) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    kind = str(field.type)
    if isinstance(value, str):
        text = value.strip()
        if "bool" in kind:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ErasekitError(f"{key}: expected true or false, got {value!r}")
        try:
            if "int" in kind and "float" not in kind:
                return int(text)
            if "float" in kind:
                return float(text)
        except ValueError:
            what = "a number" if "float" in kind else "a whole number"
            raise ErasekitError(f"{key}: expected {what}, got {value!r}") from None
        return text
    if "float" in kind and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if "int" in kind and "float" not in kind and not isinstance(value, int):
        raise ErasekitError(f"{key}: expected a whole number, got {value!r}")
    return value


def read_yaml_mapping(file: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}); one-line errors otherwise."""
    import yaml

    path = Path(file)
    if not path.is_file():
        raise ErasekitError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ErasekitError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ErasekitError(f"{path}: a {what} must be a YAML mapping of key: value")
    return data


def build_config(
    cls: type[C],
    defaults: dict[str, Any] | None = None,
    file: str | Path | None = None,
    sets: list[str] | None = None,
    mappings: list[tuple[str, dict[str, Any]]] | None = None,
) -> C:
    """Method defaults, then a YAML file, then (source, mapping) layers, then ``key=value``
    overrides; unknown keys are errors that list the valid ones."""

    valid = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = dict(defaults or {})
    layers: list[tuple[str, dict[str, Any]]] = []
    if file is not None:
        layers.append((str(file), read_yaml_mapping(file, "config file")))
    layers += mappings or []
    overrides = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ErasekitError(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = value
    layers.append(("--set", overrides))
    for where, layer in layers:
        for key, value in layer.items():
            if key not in valid:
                from erasekit.registry import suggest

                hint = suggest(str(key), valid)
                raise ErasekitError(
                    f"unknown config key {key!r} in {where};{hint} valid keys: {', '.join(valid)}"
                )
            values[key] = _coerce(cls, key, value)
    config = cls(**values)
    config.validate()
    return config
