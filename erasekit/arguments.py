"""Checks of the Python API's arguments at its boundary: a wrong type or value is one
``UsageError`` naming the argument, never an exception from deep inside a library."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erasekit.errors import UsageError


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def is_pipeline(model: Any) -> bool:
    """A loaded diffusers pipeline (it has a denoiser and a scheduler)."""
    return hasattr(model, "scheduler") and (hasattr(model, "unet") or hasattr(model, "transformer"))


def check_model(model: Any, name: str = "model") -> None:
    """A model folder or single file (str / Path), or a loaded pipeline."""
    if is_pipeline(model):
        return
    if not isinstance(model, (str, Path)) or not str(model).strip():
        raise UsageError(f"{name}: a model folder, a single-file checkpoint path or a loaded "
                         f"pipeline is required, got {_type_name(model)}")  # fmt: skip


def check_path(value: Any, name: str, optional: bool = False) -> None:
    """A file-system path (str / Path; None when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise UsageError(f"{name}: a path is required, got {_type_name(value)}")


def check_concept(concept: Any) -> None:
    """A built-in concept name, a YAML spec path or a loaded Concept."""
    from erasekit.concepts import Concept

    if concept is None:
        raise UsageError("concept: a concept is required (a built-in name such as 'red', a YAML"
                         " spec path or a Concept from erasekit.load_concept)")  # fmt: skip
    if not isinstance(concept, (str, Path, Concept)) or not str(concept).strip():
        raise UsageError(f"concept: a concept name, a YAML spec path or a Concept, got"
                         f" {_type_name(concept)}")  # fmt: skip


def check_name(value: Any, name: str) -> None:
    """A registry name (a non-empty string)."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{name}: a name is required, got {_type_name(value)}")


def check_int(value: Any, name: str, minimum: int = 1, optional: bool = False) -> None:
    """A whole number >= ``minimum`` (None when ``optional``); bools are not numbers here."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name}: a whole number >= {minimum} is required, got {value!r}")


def check_float(value: Any, name: str, optional: bool = True) -> None:
    """A finite number (None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name}: a finite number is required, got {value!r}")


def check_settings(settings: Any, name: str = "settings") -> None:
    """None, a mapping of settings, or a list of ``key=value`` strings."""
    if settings is None or isinstance(settings, Mapping):
        return
    if (
        isinstance(settings, str)
        or not isinstance(settings, Sequence)
        or not all(isinstance(s, str) for s in settings)
    ):
        raise UsageError(f"{name}: a mapping or a list of key=value strings, got"
                         f" {_type_name(settings)}")  # fmt: skip


def check_prompts(prompts: Any) -> None:
    """A prompt file, one prompt, a list of prompts or a PromptSet."""
    from erasekit.concepts import PromptSet

    if isinstance(prompts, PromptSet):
        return
    if isinstance(prompts, (str, Path)):
        ok = bool(str(prompts).strip())
    else:
        ok = isinstance(prompts, Sequence) and bool(prompts)
        ok = ok and all(isinstance(p, str) and p.strip() for p in prompts)
    if not ok:
        raise UsageError(f"prompts: a prompt file, a prompt or a non-empty list of prompts, got"
                         f" {_type_name(prompts)}")  # fmt: skip
