"""The meta-distribution of simulated downstream fine-tuning runs (a YAML file)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError

PRESETS = Path(__file__).parent.parent / "presets"
META_SD = PRESETS / "resalign-meta-sd.yaml"
META_WORLD = PRESETS / "resalign-meta-world.yaml"


@dataclass(frozen=True)
class SimConfig:
    """One simulated downstream fine-tuning run."""

    name: str
    optimizer: str = "adam"  # gd | adam
    lr: float = 1e-5
    steps: int = 10
    batch_size: int = 1
    data: str = "benign"
    mode: str = "lora"  # lora | full
    rank: int = 4
    lora_alpha: float = 4.0


@dataclass
class MetaDistribution:
    configs: list[SimConfig]
    datasets: dict[str, dict[str, Any]]  # name -> {"prompts": PromptSet} | {"images": path}
    source: str

    def describe(self) -> dict[str, Any]:
        sets = {}
        for name, d in self.datasets.items():
            sets[name] = d["prompts"].describe() if "prompts" in d else {"images": d["images"]}
        return {"source": self.source, "configs": [asdict(c) for c in self.configs],
                "datasets": sets}  # fmt: skip


def load_meta_distribution(file: str | Path, concept) -> MetaDistribution:
    """Read a meta-distribution YAML: ``configs`` (a list) and optional ``datasets``
    (name -> {prompts: FILE} | {images: DIR}); ``benign`` is the concept's benign prompts."""
    from erasekit.concepts import _prompt_set_field
    from erasekit.config import read_yaml_mapping

    path = Path(file)
    spec = read_yaml_mapping(path, "meta-distribution file")
    unknown = set(spec) - {"configs", "datasets"}
    if unknown:
        raise ErasekitError(f"{path}: unknown key(s) {sorted(unknown)}; expected configs, datasets")
    datasets: dict[str, dict[str, Any]] = {}
    if concept.benign is not None:
        datasets["benign"] = {"prompts": concept.benign}
    for name, entry in (spec.get("datasets") or {}).items():
        if (
            not isinstance(entry, dict)
            or len(entry) != 1
            or next(iter(entry))
            not in (
                "prompts",
                "images",
            )
        ):
            raise ErasekitError(f"{path}: data set {name!r} must be {{prompts: FILE}} or "
                                "{images: DIR}")  # fmt: skip
        if "images" in entry:
            datasets[name] = {"images": str(entry["images"])}
        else:
            datasets[name] = {"prompts": _prompt_set_field(path, f"datasets.{name}",
                                                           entry["prompts"])}  # fmt: skip
    for name, d in datasets.items():
        if "prompts" in d and d["prompts"].sha256 == concept.retain.sha256:
            raise ErasekitError(
                f"{path}: data set {name!r} is the concept's retain set, which the "
                "audit's fine-tuning attack trains on; use other benign prompts"
            )
    raw = spec.get("configs")
    if not isinstance(raw, list) or not raw:
        raise ErasekitError(f"{path}: 'configs' must be a non-empty list")
    valid = [f.name for f in fields(SimConfig)]
    configs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ErasekitError(f"{path}: configs[{i}] must be a mapping")
        bad = [k for k in item if k not in valid]
        if bad:
            raise ErasekitError(f"{path}: configs[{i}]: unknown key {bad[0]!r}; valid keys: "
                                f"{', '.join(valid)}")  # fmt: skip
        item = {"name": f"config-{i}", **item}
        try:
            c = SimConfig(name=str(item["name"]), optimizer=str(item.get("optimizer", "adam")),
                          lr=float(item.get("lr", 1e-5)), steps=int(item.get("steps", 10)),
                          batch_size=int(item.get("batch_size", 1)),
                          data=str(item.get("data", "benign")), mode=str(item.get("mode", "lora")),
                          rank=int(item.get("rank", 4)),
                          lora_alpha=float(item.get("lora_alpha", 4.0)))  # fmt: skip
        except (TypeError, ValueError) as e:
            raise ErasekitError(f"{path}: configs[{i}]: {e}") from None
        if c.optimizer not in ("gd", "adam") or c.mode not in ("lora", "full"):
            raise ErasekitError(f"{path}: configs[{i}]: optimizer must be gd|adam, mode lora|full")
        if not (c.lr > 0 and math.isfinite(c.lr)) or min(c.steps, c.batch_size, c.rank) < 1:
            raise ErasekitError(f"{path}: configs[{i}]: lr must be > 0; steps, batch_size, rank "
                                ">= 1")  # fmt: skip
        if c.data not in datasets:
            hint = "" if concept.benign else f" (concept {concept.name} has no benign set)"
            raise ErasekitError(f"{path}: configs[{i}]: unknown data set {c.data!r}{hint}")
        configs.append(c)
    return MetaDistribution(configs=configs, datasets=datasets, source=str(path))
