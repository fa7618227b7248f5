"""Erasure methods. Each registers a class deriving from ``Method`` (a training job);
the shared training loop (``erasekit.training.train``) runs it."""

from __future__ import annotations

from typing import Any, ClassVar

from erasekit.errors import ErasekitError
from erasekit.registry import Registry
from erasekit.training import TrainingJob

METHODS: Registry[type] = Registry("method")
METHODS.register_lazy("esd", "erasekit.methods.esd:ESD")
METHODS.register_lazy("salun", "erasekit.methods.salun:SalUn")
METHODS.register_lazy("resalign", "erasekit.methods.resalign:ResAlign")
METHODS.register_lazy("negative-embedding", "erasekit.methods.negative_embedding:NegativeEmbedding")
METHODS.register_lazy("uce", "erasekit.methods.uce:UCE")
METHODS.register_lazy("negmerge", "erasekit.methods.negmerge:NegMerge")
METHODS.register_lazy("immunize", "erasekit.methods.immunize:Immunize")


class Method(TrainingJob):
    """A registered erasure method: a training job with a name, a config dataclass and
    concept-dependent defaults (e.g. the ShapesWorld presets)."""

    name: ClassVar[str]
    # Named settings from a source (a paper, a public code base): ``--preset NAME``.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Set (to the reason) when the method erases one concept per run, not a concept list.
    one_concept: ClassVar[str | None] = None

    @classmethod
    def check_concept(cls, concept) -> None:
        """A concept list for a method that erases one concept per run: one clear line."""
        if concept.parts and cls.one_concept:
            raise ErasekitError(f"{cls.name} erases one concept per run ({cls.one_concept});"
                                f" erase {', '.join(concept.words)} one after another")  # fmt: skip

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        return {}

    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        if name not in cls.presets:
            known = ", ".join(cls.presets) or "none"
            raise ErasekitError(f"{cls.name} has no preset {name!r} (presets: {known})")
        return dict(cls.presets[name])


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "Method", "get_method"]
