"""The base class every erasure method derives from: a training job with a name, a summary, a
config dataclass, presets as data (``presets/<name>.yaml``) and concept-dependent defaults."""

from __future__ import annotations

from typing import Any, ClassVar

from erasekit.errors import ErasekitError
from erasekit.methods import preset_data
from erasekit.training import TrainingJob


class Method(TrainingJob):
    """A registered erasure method: a training job with a name, a config dataclass and
    concept-dependent defaults (e.g. the ShapesWorld presets)."""

    name: ClassVar[str]
    # One line for listings and help (``erasekit methods``), and the reference it implements.
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""
    # The presets file (``presets/<file>.yaml``) when it is not the method's own name.
    preset_file: ClassVar[str | None] = None
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
    def preset_info(cls) -> dict[str, Any]:
        """This method's presets file as data (``preset_data``)."""
        return preset_data(cls.preset_file or cls.name)

    @classmethod
    def named_presets(cls) -> dict[str, dict[str, Any]]:
        """``--preset NAME`` -> its settings."""
        named = cls.preset_info().get("presets") or {}
        return {k: dict(v.get("settings") or {}) for k, v in named.items()}

    @classmethod
    def world_preset(cls) -> dict[str, Any]:
        """The ShapesWorld preset's settings ({} when the method has none)."""
        return dict((cls.preset_info().get("world") or {}).get("settings") or {})

    @classmethod
    def world_by_dimension(cls, dimension: str | None) -> dict[str, Any]:
        """The ShapesWorld preset's values for a concept dimension (colour, shape, style)."""
        table = (cls.preset_info().get("world") or {}).get("by_dimension") or {}
        return dict(table.get(dimension) or {})

    @classmethod
    def world_by_variant(cls, variant: str | None, dimension: str | None) -> dict[str, Any]:
        """The ShapesWorld preset's values for a variant of the method (e.g. ESD's ``esd-x``):
        its ``settings``, then its values for the concept's dimension; applied over the preset
        when a run's configuration selects that variant."""
        table = (cls.preset_info().get("world") or {}).get("by_variant") or {}
        entry = table.get(variant) or {}
        by_dimension = entry.get("by_dimension") or {}
        return {**(entry.get("settings") or {}), **(by_dimension.get(dimension) or {})}

    @classmethod
    def world_defaults(cls, concept) -> dict[str, Any]:
        """The ShapesWorld preset for ``concept``: its settings, then its dimension's values (a
        combined concept takes its first concept's dimension)."""
        dimension = concept.detector.get("dimension")
        return {**cls.world_preset(), **cls.world_by_dimension(dimension)}

    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        named = cls.named_presets()
        if name not in named:
            known = ", ".join(named) or "none"
            raise ErasekitError(f"{cls.name} has no preset {name!r} (presets: {known})")
        return named[name]
