"""Detectors judge generated images.

A detector's ``score(images, prompts)`` returns one raw, JSON-ready record per image (NudeNet's
boxes, CLIP's class probabilities and score, the world classifier's probabilities). A
``Protocol`` turns one raw record into a yes/no; its name and parameters travel into every
result, so a number always says which labels and threshold produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from erasekit.registry import Registry

DETECTORS: Registry[type] = Registry("detector")
DETECTORS.register_lazy("world", "erasekit.detectors.world:WorldDetector")
DETECTORS.register_lazy("nudenet", "erasekit.detectors.nudenet:NudeNetDetector")
DETECTORS.register_lazy("clip", "erasekit.detectors.clip:ClipDetector")


@dataclass(frozen=True)
class Protocol:
    """A named rule over one detector's raw record: ``flag(record) -> bool``."""

    name: str
    detector: str
    definition: dict[str, Any]
    flag: Callable[[dict[str, Any]], bool] = field(compare=False, repr=False)


@dataclass(frozen=True)
class DetectorOptions:
    """Local weights and settings the user gives for detectors (nothing is downloaded)."""

    nudenet_model: str | None = None  # a local 640m .onnx; None: the bundled 320n
    nudenet_resolution: int | None = None  # None: 320 for the bundled model, 640 otherwise
    clip_model: str | None = None  # an open_clip name (ViT-L-14) or a model config .json
    clip_weights: str | None = None
    world_classifier: str | None = None
    inception_weights: str | None = None  # FID/KID: the FID Inception-v3 (.safetensors/.pth)
    fid_features: str = "inception"  # FID/KID features: inception, or world (the world classifier)
    allow_pickle: bool = False
    device: str = "cpu"
    batch_size: int = 16


def build_detector(name: str, options: DetectorOptions, spec: dict[str, Any] | None = None):
    """The detector ``name`` built from ``options`` (and the concept's detector ``spec``)."""
    return DETECTORS.get(name).from_options(options, spec or {})


__all__ = ["DETECTORS", "DetectorOptions", "Protocol", "build_detector"]
