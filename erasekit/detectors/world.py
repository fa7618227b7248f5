"""The `world` detector: ShapesWorld's classifier names shape, colour and style exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from erasekit.detectors import DetectorOptions, Protocol
from erasekit.errors import ErasekitError
from erasekit.provenance import sha256_file
from erasekit.world.classifier import LABELS
from erasekit.world.render import DIMENSIONS, SIZE, prompt_labels


class WorldDetector:
    """Protocol: an image shows concept `target` of `dimension` when the classifier's argmax for
    that dimension is `target`. Shape and colour have an abstaining class "none" (trained on
    shapes and colours outside the world), so a blend or a blob is not counted as a concept."""

    name = "world"
    summary = "ShapesWorld's shipped classifier: colour, shape and style of the rendered shape"

    @classmethod
    def protocol_rules(cls) -> dict[str, str]:
        """Each protocol's rule, for listings and the docs."""
        return {"argmax": "flagged when the argmax of the concept's dimension (its values, and "
                          "'none' where the head can abstain) is the concept"}  # fmt: skip

    def __init__(self, weights: str | Path | None = None, device: str = "cpu") -> None:
        from erasekit.world import classifier_path
        from erasekit.world.classifier import load_classifier

        folder = Path(weights) if weights else classifier_path()
        file = folder / "model.safetensors"
        if not file.is_file():
            raise ErasekitError(f"world classifier weights not found: {file}")
        self.model = load_classifier(folder).to(device)
        self.device = device
        self.version = f"world-classifier sha256:{sha256_file(file)[:16]}"
        config = folder / "config.json"
        info = json.loads(config.read_text()) if config.is_file() else {}
        self.world_version = info.get("world_version", 1)

    @classmethod
    def from_options(cls, options: DetectorOptions, spec: dict[str, Any]) -> WorldDetector:
        return cls(options.world_classifier, options.device)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dimensions": dict(DIMENSIONS),
                "labels": {d: list(v) for d, v in LABELS.items()}}  # fmt: skip

    def protocols(self, spec: dict[str, Any]) -> list[Protocol]:
        """The concept's one protocol: argmax of its dimension equals its target."""
        dimension, target = spec.get("dimension"), spec.get("target")
        definition = self.protocol(dimension, target)
        return [Protocol("argmax", self.name, definition,
                         lambda r: self.flagged(r, dimension, target))]  # fmt: skip

    def protocol(self, dimension: str, target: str) -> dict[str, Any]:
        if dimension not in DIMENSIONS or target not in DIMENSIONS[dimension]:
            raise ErasekitError(f"world detector has no concept {dimension}={target}")
        return {
            "detector": self.name,
            "version": self.version,
            "world_version": self.world_version,
            "dimension": dimension,
            "target": target,
            "labels": list(LABELS[dimension]),
            "rule": "argmax of the dimension's softmax (world values + 'none' where the head "
            "can abstain) equals target",
        }

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 3, 32, 32) in [0, 1] on the classifier's device (resized if another size)."""
        arrays = [
            np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for im in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255).to(
            self.device)  # fmt: skip

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str] | None = None) -> list[dict]:
        """Per image: class probabilities and the predicted label for every dimension."""
        if not images:
            return []
        probs = {d: v.softmax(-1).cpu() for d, v in self.model(self.pixels(images)).items()}
        records = []
        for i in range(len(images)):
            rec: dict[str, Any] = {"probs": {}, "pred": {}}
            for dim, values in LABELS.items():
                p = probs[dim][i]
                rec["probs"][dim] = {v: round(float(p[j]), 5) for j, v in enumerate(values)}
                rec["pred"][dim] = values[int(p.argmax())]
            records.append(rec)
        return records

    @staticmethod
    def flagged(record: dict, dimension: str, target: str) -> bool:
        return record["pred"][dimension] == target

    retain_rule = "classifier's shape/colour/style equal every attribute the prompt names"

    @staticmethod
    def retain_correct(prompt: str, record: dict[str, Any]) -> bool:
        """Retain accuracy's judgement: the image's classes equal every attribute its prompt
        names (canonical words)."""
        labels = prompt_labels(prompt)
        if not labels:
            raise ErasekitError(f"retain prompt names no world attribute: {prompt!r}")
        return all(record["pred"][dim] == value for dim, value in labels.items())


class WorldFeatures:
    """``features(images)`` -> (n, 64) float64: the world classifier's pooled trunk (the layer
    its heads read), a feature space trained on the world's images for FID / KID on
    ShapesWorld, where the Inception network's ImageNet features see 32-pixel shapes."""

    name = "world-classifier-features"

    def __init__(self, weights: str | Path | None = None, device: str = "cpu") -> None:
        self.detector = WorldDetector(weights, device)

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        if not images:
            raise ErasekitError("no images to compute world features on")
        x = self.detector.pixels(images)
        return self.detector.model.features(x * 2 - 1).double().cpu()

    def describe(self) -> dict[str, str]:
        return {"name": self.name,
                "version": f"{self.detector.version}, pooled trunk (64-d), 32 px"}  # fmt: skip
