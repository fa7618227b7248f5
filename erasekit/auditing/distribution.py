"""FID and KID of an audit's utility sets: Inception features of every role's images
against the reference model's (or a folder of images), with bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

from erasekit.auditing.roles import AuditSettings
from erasekit.detectors import DetectorOptions
from erasekit.errors import ErasekitError
from erasekit.evaluation import (
    distribution_metrics,
    sampling_definition,
)
from erasekit.provenance import (
    sha256_bytes,
    sha256_file,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FID_FEATURES = ("inception", "world")


def fid_setup(audit: AuditSettings, detectors: DetectorOptions, roles: dict[str, Path | None]):
    """(features, the reference image folder and its image files, or None and None for the
    reference model's images) when FID/KID are asked for (Inception weights given, or the world
    classifier's features), else None; fails before rendering."""
    if detectors.fid_features not in FID_FEATURES:
        raise ErasekitError(f"FID/KID features must be one of {', '.join(FID_FEATURES)}, "
                            f"got {detectors.fid_features!r}")  # fmt: skip
    world = detectors.fid_features == "world"
    if not (detectors.inception_weights or world):
        if audit.fid_images:
            raise ErasekitError("--fid-images needs --inception-weights PATH (FID/KID)")
        return None
    folder, images = None, None
    if audit.fid_images:
        folder = Path(audit.fid_images)
        if not folder.is_dir():
            raise ErasekitError(f"--fid-images: not a folder: {folder}")
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(images) < 2:
            raise ErasekitError(f"--fid-images: {folder} holds fewer than 2 images "
                                f"({', '.join(IMAGE_SUFFIXES)})")  # fmt: skip
    elif roles.get("reference") is None:
        raise ErasekitError("FID/KID need reference images: keep the reference model "
                            "(--reference PATH) or pass --fid-images DIR")  # fmt: skip
    if world:
        from erasekit.detectors.world import WorldFeatures

        return WorldFeatures(detectors.world_classifier, detectors.device), folder, images
    from erasekit.detectors.inception import InceptionFeatures

    features = InceptionFeatures(detectors.inception_weights, device=detectors.device,
                                 allow_pickle=detectors.allow_pickle,
                                 batch_size=detectors.batch_size)  # fmt: skip
    return features, folder, images


FEATURE_CHUNK = 256  # images decoded at a time for Inception features


def distribution_results(
    features,
    folder: Path | None,
    images: list[Path] | None,
    samples: list[dict],
    sets,
    root: Path,
    seed: int,
) -> dict[str, dict[str, dict]]:
    """Role -> FID and KID on every utility set, against the reference model's images of the
    same prompts, or against the given image files (then the reference role is measured too)."""
    from PIL import Image

    def load(paths):
        import torch

        paths, out = list(paths), []
        for i in range(0, len(paths), FEATURE_CHUNK):  # a COCO folder need not fit in memory
            chunk = []
            for p in paths[i : i + FEATURE_CHUNK]:
                with Image.open(p) as im:
                    chunk.append(im.convert("RGB"))
            out.append(features.features(chunk))
        return torch.cat(out)

    fixed = None
    if images is not None:
        digest = sha256_bytes("\n".join(sha256_file(p) for p in images).encode())
        fixed = (load(images), list(range(len(images))),
                 {"reference": "image folder", "folder": str(folder.resolve()),
                  "folder_sha256": digest})  # fmt: skip
    results: dict[str, dict[str, dict]] = {}
    for prompt_set, utility in sets:
        if not utility:
            continue
        by_role: dict[str, list[dict]] = {}
        for s in samples:
            if s["prompt_set"] == prompt_set.name:
                by_role.setdefault(s["model"], []).append(s)
        if fixed is None:
            rows = by_role.pop("reference")
            reference = (load(root / s["image"] for s in rows), [s["prompt_index"] for s in rows],
                         {"reference": "the reference model's images of the same prompts and "
                          "seeds"})  # fmt: skip
        else:
            reference = fixed
        for role, rows in by_role.items():
            mine = load(root / s["image"] for s in rows)
            definition = {"features": features.describe(), **reference[2],
                          **sampling_definition(rows, seed)}  # fmt: skip
            metrics = distribution_metrics(mine, [s["prompt_index"] for s in rows],
                                           reference[0], reference[1], prompt_set=prompt_set,
                                           definition=definition)  # fmt: skip
            results.setdefault(role, {}).update(metrics)
    return results
