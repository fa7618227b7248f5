"""Erasure methods. Each registers a class deriving from ``Method`` (a training job);
the shared training loop (``erasekit.training.train``) runs it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.registry import Registry

METHODS: Registry[type] = Registry("method")
METHODS.register_lazy("esd", "erasekit.methods.esd:ESD")
METHODS.register_lazy("salun", "erasekit.methods.salun:SalUn")
METHODS.register_lazy("resalign", "erasekit.methods.resalign:ResAlign")
METHODS.register_lazy("negative-embedding", "erasekit.methods.negative_embedding:NegativeEmbedding")
METHODS.register_lazy("uce", "erasekit.methods.uce:UCE")
METHODS.register_lazy("rece", "erasekit.methods.rece:RECE")
METHODS.register_lazy("speed", "erasekit.methods.speed:SPEED")
METHODS.register_lazy("advunlearn", "erasekit.methods.advunlearn:AdvUnlearn")
METHODS.register_lazy("mace", "erasekit.methods.mace:MACE")
METHODS.register_lazy("negmerge", "erasekit.methods.negmerge:NegMerge")
METHODS.register_lazy("immunize", "erasekit.methods.immunize:Immunize")

PRESET_DIR = Path(__file__).parent / "presets"
PRESET_KEYS = {"presets", "world"}
WORLD_KEYS = {"settings", "by_dimension", "by_variant", "rule", "evidence"}


@functools.cache
def preset_data(name: str) -> dict[str, Any]:
    """A method's presets, as data: ``presets/<name>.yaml`` with ``presets`` (``--preset NAME``:
    each a ``source`` line and its ``settings``) and ``world`` (the ShapesWorld preset: its
    ``settings``, per-dimension and per-variant values, the ``rule`` that chose it and its
    ``evidence`` folders). {} when the method has no file."""
    from erasekit.config import read_yaml_mapping

    file = PRESET_DIR / f"{name}.yaml"
    if not file.is_file():
        return {}
    data = read_yaml_mapping(file, "preset file")
    unknown = set(data) - PRESET_KEYS | set(data.get("world") or {}) - WORLD_KEYS
    if unknown:
        raise ErasekitError(f"{file}: unknown keys {', '.join(sorted(unknown))}")
    return data


def get_method(name: str):
    """The registered method class ``name`` (a ``Method``)."""
    return METHODS.get(name)


def __getattr__(name: str):
    # ``Method`` (erasekit/methods/base.py) imports the training loop, and with it torch: the
    # registry and presets above stay importable without them (the CLI's help, listings).
    if name == "Method":
        from erasekit.methods.base import Method

        return Method
    raise AttributeError(f"module 'erasekit.methods' has no attribute {name!r}")


__all__ = ["METHODS", "Method", "get_method", "preset_data"]
