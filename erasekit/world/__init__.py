"""ShapesWorld: a tiny, genuine text-to-image world where concept presence is measured exactly.

The trained assets ship inside the package (``assets/``): ``full`` (every concept), the
never-learned references ``no-red``, ``no-circle`` and ``no-outlined``, and the world
classifier.
"""

from __future__ import annotations

from pathlib import Path

from erasekit.errors import ErasekitError

ASSETS = Path(__file__).parent / "assets"
WORLD_VARIANTS = ("full", "no-red", "no-circle", "no-outlined")
# The world's version: every world model's manifest and every world-detector result records it.
WORLD_VERSION = 3


def world_path(variant: str = "full", root: str | Path | None = None) -> Path:
    """The diffusers folder of a ShapesWorld model variant."""
    if variant not in WORLD_VARIANTS:
        raise ErasekitError(
            f"unknown world variant {variant!r} (choose from {', '.join(WORLD_VARIANTS)})"
        )
    path = Path(root or ASSETS) / variant
    if not (path / "model_index.json").is_file():
        raise ErasekitError(f"ShapesWorld model not found at {path}: run 'erasekit world build'")
    return path


def classifier_path(root: str | Path | None = None) -> Path:
    return Path(root or ASSETS) / "classifier"
