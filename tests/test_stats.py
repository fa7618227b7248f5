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
