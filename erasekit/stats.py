"""Confidence intervals for the numbers erasekit reports."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0 and 1 and small n)."""
    if n <= 0:
        raise ValueError("a proportion needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    groups: list[list[float]], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the image mean, resampling whole groups (prompts) with
    replacement, so images of one prompt move together. Deterministic for a given ``seed``."""
    import numpy as np

    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("a bootstrap needs at least one group and no empty group")
    sums = np.array([float(sum(g)) for g in groups])
    counts = np.array([len(g) for g in groups], dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_resamples, len(groups)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], method="inverted_cdf")
    return float(low), float(high)


def paired_difference(
    groups: list[list[float]],
    n_resamples: int = 2000,
    seed: int = 0,
    clusters: list[list[int]] | None = None,
) -> dict:
    """Mean of paired per-image differences (a − b on the same prompt, k and seed), grouped by
    prompt, with the percentile bootstrap 95% interval of ``bootstrap_interval`` (whole groups
    resampled): {"value", "ci95", "n_pairs"}. ``clusters``: the indices of the groups that share
    a seed; with several seeds the interval is the hull of that one and
    ``cluster_bootstrap_interval`` over the seeds and then their groups, so seeds that disagree
    widen it."""
    diffs = [d for g in groups for d in g]
    low, high = bootstrap_interval(groups, n_resamples, seed=seed)
    if clusters is not None and len(clusters) > 1:
        nested = [[(sum(groups[i]), len(groups[i])) for i in members] for members in clusters]
        c_low, c_high = cluster_bootstrap_interval(nested, n_resamples, seed=seed)
        low, high = min(low, c_low), max(high, c_high)
    return {"value": round(sum(diffs) / len(diffs), 6), "ci95": [round(low, 4), round(high, 4)],
            "n_pairs": len(diffs)}  # fmt: skip


def cluster_bootstrap_interval(
    clusters: list[list[tuple[float, int]]],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Hierarchical percentile bootstrap interval of a pooled ratio Σ sums / Σ counts: draw the
    clusters (seeds) with replacement, then, within each cluster drawn, its groups (prompts)
    with replacement, as (sum, count) pairs. Both sources of variation count: a rate pooled
    over seeds whose seeds disagree gets a wide interval, where a per-image interval would
    not. A cluster given as one group is resampled as a whole (seeds only). Deterministic for
    a given ``seed``."""
    import numpy as np

    if not clusters or any(not c or any(n <= 0 for _, n in c) for c in clusters):
        raise ValueError("a cluster bootstrap needs clusters of groups with positive counts")
    rng = np.random.default_rng(seed)
    k = len(clusters)
    drawn = rng.integers(0, k, size=(n_resamples, k))  # which cluster fills each slot
    sums = np.zeros((k, n_resamples, k))  # cluster c resampled inside slot j of resample r
    counts = np.zeros((k, n_resamples, k))
    for c, groups in enumerate(clusters):
        s = np.array([float(v) for v, _ in groups])
        n = np.array([float(m) for _, m in groups])
        picks = rng.integers(0, len(groups), size=(n_resamples, k, len(groups)))
        sums[c], counts[c] = s[picks].sum(-1), n[picks].sum(-1)
    rows, slots = np.arange(n_resamples)[:, None], np.arange(k)[None, :]
    ratios = sums[drawn, rows, slots].sum(1) / counts[drawn, rows, slots].sum(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha], method="inverted_cdf")
    return float(low), float(high)
