import pytest

from erasekit.stats import wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (1, 64, 0.0028, 0.0833)],
)
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_bootstrap_interval_hand_computed():
    from erasekit.stats import bootstrap_interval

    # two prompts with means 0 and 1: the resampled mean is 0, 0.5 or 1 with probability
    # 1/4, 1/2, 1/4, so the 2.5% and 97.5% percentiles are 0 and 1
    assert bootstrap_interval([[0.0], [1.0]], n_resamples=4000) == (0.0, 1.0)
    # one value everywhere: a degenerate interval at that value
    assert bootstrap_interval([[30.0, 30.0], [30.0]]) == (30.0, 30.0)
    # images of one prompt move together: mean of resampled image means, weighted by count
    lo, hi = bootstrap_interval([[0.0, 0.0, 0.0], [1.0]], n_resamples=4000)
    assert (lo, hi) == (0.0, 1.0)
    groups = [[float(i % 3)] * 2 for i in range(30)]
    a = bootstrap_interval(groups, seed=1)
    assert a == bootstrap_interval(groups, seed=1) and a[0] < 1.0 < a[1]
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_bootstrap_weights_images_not_prompts():
    """Resampled means weight each prompt by its images. The exact bootstrap distribution of
    [[0, 0, 0], [1], [1, 1]] (27 equally likely resamples) puts its 20% quantile at 0.25 and its
    80% at 1; a mean of prompt means would put the 20% quantile at 1/3."""
    from erasekit.stats import bootstrap_interval

    groups = [[0.0, 0.0, 0.0], [1.0], [1.0, 1.0]]
    assert bootstrap_interval(groups, n_resamples=20000, level=0.6) == (0.25, 1.0)


def test_bootstrap_agrees_with_scipy():
    """One image per prompt, or equal images per prompt: the grouped percentile bootstrap is
    scipy's percentile bootstrap of the (prompt) means."""
    import numpy as np
    from scipy.stats import bootstrap

    from erasekit.stats import bootstrap_interval

    rng = np.random.default_rng(4)
    for groups in (
        [[float(v)] for v in rng.integers(0, 2, 40)],
        [list(rng.normal(size=3)) for _ in range(25)],
    ):
        means = np.array([np.mean(g) for g in groups])
        ref = bootstrap(
            (means,), np.mean, method="percentile", n_resamples=20000, rng=np.random.default_rng(0)
        ).confidence_interval
        lo, hi = bootstrap_interval(groups, n_resamples=20000)
        assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)


def test_paired_difference_is_the_image_mean_with_the_grouped_interval():
    from erasekit.stats import bootstrap_interval, paired_difference

    groups = [[1.0, 0.0], [0.0], [-1.0, 1.0, 1.0]]
    d = paired_difference(groups, n_resamples=3000, seed=2)
    assert d["value"] == pytest.approx(2 / 6) and d["n_pairs"] == 6
    lo, hi = bootstrap_interval(groups, n_resamples=3000, seed=2)
    assert d["ci95"] == [round(lo, 4), round(hi, 4)]


def test_cluster_bootstrap_resamples_seeds_then_prompts():
    from erasekit.stats import bootstrap_interval, cluster_bootstrap_interval

    # seeds only (one group each): the pooled rate's interval spans the seeds' disagreement,
    # where a Wilson interval on 192 images would be about ±0.07 wide
    seeds = [[(0.30 * 64, 64)], [(0.56 * 64, 64)], [(0.09 * 64, 64)]]
    assert cluster_bootstrap_interval(seeds) == pytest.approx((0.09, 0.56))
    # one seed: the prompt level alone, which is the grouped bootstrap of its prompts
    prompts = [(float(i % 3 == 0), 1) for i in range(30)]
    one = cluster_bootstrap_interval([prompts], n_resamples=20000)
    ref = bootstrap_interval([[v] for v, _ in prompts], n_resamples=20000)
    assert one == pytest.approx(ref, abs=0.04)
    # seeds that agree on their totals but whose prompts disagree: wider than agreeing prompts
    flat = [[(0.5, 1)] * 20 for _ in range(3)]
    split = [[(float(i % 2), 1) for i in range(20)] for _ in range(3)]
    lo_f, hi_f = cluster_bootstrap_interval(flat)
    lo_s, hi_s = cluster_bootstrap_interval(split)
    assert lo_f == hi_f == 0.5 and lo_s < 0.4 < 0.6 < hi_s
    with pytest.raises(ValueError):
        cluster_bootstrap_interval([[]])


def test_pooled_rate_uses_wilson_for_one_seed_and_a_cluster_bootstrap_for_several():
    from erasekit.bench.pooling import ONE_SEED_INTERVAL, SEEDS_INTERVAL, pooled_rate
    from erasekit.stats import wilson_interval

    one = pooled_rate([{"value": 0.25, "n_images": 8}])
    assert one == (0.25, *wilson_interval(2, 8), ONE_SEED_INTERVAL)
    seeds = [{"value": v, "n_images": 64} for v in (0.296875, 0.5625, 0.09375)]
    value, low, high, interval = pooled_rate(seeds)
    assert interval == SEEDS_INTERVAL and value == pytest.approx((19 + 36 + 6) / 192)
    wilson = wilson_interval(61, 192)
    assert low <= 0.1 and high >= 0.55 and high - low > 2 * (wilson[1] - wilson[0])
    # seeds that all agree: never narrower than the images' own (Wilson) uncertainty
    agree = pooled_rate([{"value": 1.0, "n_images": 64}] * 3)
    assert agree[1:3] == wilson_interval(192, 192)


def _normal_groups(seed: int = 0, n: int = 20) -> list[list[float]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [list(rng.normal(size=int(rng.integers(1, 4)))) for _ in range(n)]


def test_intervals_are_reproducible_with_their_documented_defaults():
    """2000 resamples and seed 0 are what every results file states; another seed differs."""
    from erasekit.stats import bootstrap_interval, cluster_bootstrap_interval, paired_difference

    groups = _normal_groups()
    assert bootstrap_interval(groups) == bootstrap_interval(groups, n_resamples=2000, seed=0)
    assert bootstrap_interval(groups) != bootstrap_interval(groups, seed=1)
    clusters = [[(v, 1) for g in groups[i::3] for v in g] for i in range(3)]
    assert cluster_bootstrap_interval(clusters) == cluster_bootstrap_interval(
        clusters, n_resamples=2000, seed=0
    )
    assert cluster_bootstrap_interval(clusters) != cluster_bootstrap_interval(clusters, seed=1)
    d = paired_difference(groups, n_resamples=3000, seed=2)
    lo, hi = bootstrap_interval(groups, n_resamples=3000, seed=2)
    assert d["ci95"] == [round(lo, 4), round(hi, 4)] and d["ci95"] != [lo, hi]
    assert d["value"] == round(sum(v for g in groups for v in g) / d["n_pairs"], 6)
    assert paired_difference(groups)["ci95"] != paired_difference(groups, seed=1)["ci95"]


def test_percentile_endpoints_are_resampled_values_not_interpolations():
    """inverted_cdf: each endpoint is a mean some resample had (k / 10 for ten 0/1 images)."""
    from erasekit.stats import bootstrap_interval, cluster_bootstrap_interval

    groups = [[float(i < 4)] for i in range(10)]
    one_cluster = [[(g[0], 1) for g in groups]]
    for lo, hi in (bootstrap_interval(groups, n_resamples=7, seed=3),
                   cluster_bootstrap_interval(one_cluster, 7, seed=3)):  # fmt: skip
        assert lo * 10 == pytest.approx(round(lo * 10)) and hi * 10 == pytest.approx(round(hi * 10))


def test_cluster_bootstrap_level_and_exact_distribution():
    """One cluster: its prompts resampled, the exact distribution of the weighting test."""
    from erasekit.stats import cluster_bootstrap_interval

    one = [[(0.0, 3), (1.0, 1), (2.0, 2)]]
    assert cluster_bootstrap_interval(one, n_resamples=20000, level=0.6) == (0.25, 1.0)


def test_interval_inputs_are_checked():
    from erasekit.stats import bootstrap_interval, cluster_bootstrap_interval, wilson_interval

    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"within \[0, 2\], got 3"):
        wilson_interval(3, 2)
    assert wilson_interval(1, 1)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no empty group"):
        bootstrap_interval([[1.0], []])
    with pytest.raises(ValueError, match="positive counts"):
        cluster_bootstrap_interval([[(0.0, 1), (0.0, 0)]])


def test_paired_difference_over_seeds_is_never_narrower_and_widens_when_seeds_disagree():
    from erasekit.stats import paired_difference

    # three seeds of eight prompts: the seeds' mean differences are -0.5, 0 and +0.5
    groups = [[v] for v in (-0.5, 0.0, 0.5) for _ in range(8)]
    clusters = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
    flat = paired_difference(groups)
    nested = paired_difference(groups, clusters=clusters)
    assert nested["value"] == flat["value"] == 0.0 and nested["n_pairs"] == 24
    assert nested["ci95"][0] <= flat["ci95"][0] and nested["ci95"][1] >= flat["ci95"][1]
    assert nested["ci95"] == [-0.5, 0.5]  # the seeds' own spread, which prompts alone hide
    assert paired_difference(groups, clusters=clusters[:1])["ci95"] == flat["ci95"]


def test_paired_difference_over_two_seeds_is_the_hull_of_both_bootstraps():
    import numpy as np

    from erasekit.stats import bootstrap_interval, cluster_bootstrap_interval, paired_difference

    rng = np.random.default_rng(7)
    groups = [[float(v)] for shift in (-0.3, 0.3) for v in rng.normal(shift, 0.2, size=10)]
    clusters = [list(range(10)), list(range(10, 20))]
    d = paired_difference(groups, n_resamples=3000, seed=4, clusters=clusters)
    flat = bootstrap_interval(groups, 3000, seed=4)
    seeds = [[(g[0], 1) for g in groups[:10]], [(g[0], 1) for g in groups[10:]]]
    nested = cluster_bootstrap_interval(seeds, 3000, seed=4)
    assert nested[0] < flat[0] and nested[1] > flat[1]  # two seeds that disagree: wider
    hull = [round(min(flat[0], nested[0]), 4), round(max(flat[1], nested[1]), 4)]
    assert d["ci95"] == hull
    assert (
        paired_difference(groups, clusters=clusters)["ci95"]
        != paired_difference(groups, seed=1, clusters=clusters)["ci95"]
    )
    assert paired_difference(groups, clusters=clusters) == paired_difference(
        groups, n_resamples=2000, seed=0, clusters=clusters
    )
