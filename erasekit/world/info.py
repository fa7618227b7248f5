"""What `erasekit world info` reports: concepts, model sizes, classifier and quality figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from erasekit.world import ASSETS, WORLD_VARIANTS
from erasekit.world.render import DIMENSIONS

QUALITY_FILE = "quality.json"


def _parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                total += _numel(st.get_slice(k))
    return total


def _numel(sl) -> int:
    n = 1
    for d in sl.get_shape():
        n *= d
    return n


def world_info(root: str | Path | None = None) -> dict[str, Any]:
    root = Path(root or ASSETS)
    variants = []
    for v in WORLD_VARIANTS:
        folder = root / v
        if not (folder / "model_index.json").is_file():
            continue
        manifest = json.loads((folder / "erasekit.json").read_text())
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        variants.append(
            {
                "variant": v,
                "path": str(folder),
                "held_out_concept": manifest.get("world", {}).get("held_out_concept"),
                "parameters": _parameters(folder),
                "size_mb": size / 2**20,
                "sampler": manifest.get("sampler"),
            }
        )
    build = root / "build.json"
    build_info = json.loads(build.read_text()) if build.is_file() else {}
    quality = root / QUALITY_FILE
    return {
        "concepts": {d: list(v) for d, v in DIMENSIONS.items()},
        "variants": variants,
        "world_version": build_info.get("world_version", 1),
        "classifier_heldout_accuracy": build_info.get("classifier_heldout_accuracy"),
        "classifier_off_world_false_positives": (build_info.get("classifier") or {}).get(
            "off_world_false_positives"
        ),
        "build": {k: build_info.get(k) for k in ("timings_s", "command", "device", "threads")},
        "quality": json.loads(quality.read_text()) if quality.is_file() else None,
    }
