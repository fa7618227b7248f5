"""FID and KID between two image sets' Inception features, with percentile-bootstrap intervals
over prompts: the distribution metrics an audit reports on its utility sets."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from erasekit.concepts import PromptSet
from erasekit.errors import ErasekitError
from erasekit.evaluation import metric_key

DISTRIBUTION_RESAMPLES = 200
BOOTSTRAP_IMAGES = 1000  # per side: larger sets are bootstrapped on a seeded subset of groups
DISTRIBUTION_INTERVAL = (f"percentile bootstrap 95% over prompts ({DISTRIBUTION_RESAMPLES}"
                         " resamples, seed 0; both image sets resampled by prompt, a folder's"
                         f" images one by one; a side above {BOOTSTRAP_IMAGES} images is"
                         " bootstrapped on a seeded subset of its prompts of about that many"
                         " images: a wider interval than the full set's, and for FID centred"
                         " higher, its small-n bias)")  # fmt: skip


def distribution_metrics(
    features: Any,
    groups: list[int],
    reference: Any,
    reference_groups: list[int],
    *,
    prompt_set: PromptSet,
    definition: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """FID and KID of one model's images (``features``, one row per image, ``groups`` its
    prompt) against reference images, each with a bootstrap interval: ``fid/<set>`` and
    ``kid/<set>``. Small n inflates FID (it is biased); KID is unbiased, use it to compare at
    small n."""
    import numpy as np
    import torch
    from torchmetrics.image.kid import poly_mmd

    from erasekit.detectors.inception import (
        KID_SUBSETS,
        fid_low_rank,
        frechet_distance,
        kernel_distance,
    )

    n, n_ref = features.shape[0], reference.shape[0]
    if n < 2 or n_ref < 2:
        raise ErasekitError(f"FID/KID on {prompt_set.name} need at least 2 images on each side "
                            f"(have {n} and {n_ref})")  # fmt: skip
    subset = min(n, n_ref, 1000)
    values = {"fid": frechet_distance(features, reference),
              "kid": kernel_distance(features, reference, subset)}  # fmt: skip

    def by_group(gs):
        rows: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(gs):
            rows[g].append(i)
        return list(rows.values())

    rng = np.random.default_rng(0)

    def capped(gs):  # whole groups, in a seeded order, up to about BOOTSTRAP_IMAGES images
        kept, size = [], 0
        for k in rng.permutation(len(gs)):
            if size >= BOOTSTRAP_IMAGES:
                break
            kept.append(gs[k])
            size += len(gs[k])
        return kept

    mine, theirs = by_group(groups), by_group(reference_groups)
    n_prompts = len(mine)
    mine, theirs = capped(mine), capped(theirs)
    draws: dict[str, list[float]] = {"fid": [], "kid": []}
    for _ in range(DISTRIBUTION_RESAMPLES):
        a = [i for k in rng.integers(0, len(mine), len(mine)) for i in mine[k]]
        b = [i for k in rng.integers(0, len(theirs), len(theirs)) for i in theirs[k]]
        fa, fb = features[torch.tensor(a)], reference[torch.tensor(b)]
        draws["fid"].append(fid_low_rank(fa, fb))
        draws["kid"].append(float(poly_mmd(fb, fa)))
    out = {}
    statistics = {
        "fid": "Fréchet distance between Gaussians fitted to the two sets' Inception features "
        "(torchmetrics FrechetInceptionDistance); biased upward at small n",
        "kid": f"kernel inception distance: unbiased polynomial-kernel MMD² (degree 3), mean over"
        f" {KID_SUBSETS} subsets of {subset} images per side (torchmetrics"
        " KernelInceptionDistance, subsets seed 0)",
    }
    for name, value in values.items():
        low, high = np.quantile(draws[name], [0.025, 0.975], method="inverted_cdf")
        out[metric_key(name, prompt_set.name)] = {
            "metric": name,
            "prompt_set": prompt_set.name,
            "protocol": None,
            "value": round(value, 6),
            "ci95": [round(float(low), 6), round(float(high), 6)],
            "n_images": n,
            "n_prompts": n_prompts,
            "higher_is_better": False,
            "definition": {
                "statistic": statistics[name],
                **definition,
                "n_reference_images": n_ref,
                "prompt_set": prompt_set.describe(),
                "interval": DISTRIBUTION_INTERVAL,
            },  # fmt: skip
        }
    return out


__all__ = [
    "BOOTSTRAP_IMAGES",
    "DISTRIBUTION_INTERVAL",
    "DISTRIBUTION_RESAMPLES",
    "distribution_metrics",
]
