"""search.compare and book.verdict against plain references and hand-worked cases."""
import numpy as np
import pytest

from retrieval_lib.book.verdict import verdict
from retrieval_lib.search.compare import mean_ap_excluding, paired_comparison


def _loop_bootstrap(d, n_boot, seed, level):
    """Plain reference: one resample at a time with the same generator calls."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = [sum(d[j] for j in row) / len(d) for row in idx]
    return np.quantile(means, [(1 - level) / 2, (1 + level) / 2])


def test_paired_comparison_hand_worked_counts_and_delta():
    a = np.array([1.0, 0.5, 0.2, np.nan, 0.7])
    b = np.array([0.5, 0.5, 0.4, 0.3, np.nan])
    cmp = paired_comparison(a, b, n_boot=50)
    # kept queries 0, 1, 2: differences +0.5, 0, -0.2
    assert cmp["n"] == 3
    assert cmp["delta"] == pytest.approx(0.1, abs=1e-15)
    assert (cmp["wins"], cmp["losses"], cmp["ties"]) == (1, 1, 1)


def test_paired_comparison_interval_matches_loop():
    rng = np.random.default_rng(3)
    a, b = rng.random(40), rng.random(40)
    cmp = paired_comparison(a, b, n_boot=300, seed=7, level=0.9)
    lo, hi = _loop_bootstrap(a - b, 300, 7, 0.9)
    assert cmp["ci"] == pytest.approx((lo, hi), abs=1e-12)
    assert cmp["ci"][0] <= cmp["delta"] <= cmp["ci"][1]


def test_significance_follows_the_interval():
    base = np.linspace(0.1, 0.9, 50)
    clear = paired_comparison(base + 0.05, base)  # every query gains 0.05: interval is {0.05}
    assert clear["significant"] and clear["ci"][0] == pytest.approx(0.05)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.2, 50)
    noisy = paired_comparison(base + noise - noise.mean(), base)  # zero mean gap
    assert not noisy["significant"] and noisy["ci"][0] < 0 < noisy["ci"][1]
    assert "better than" in verdict("A", "B", clear) and "A is better than B" in verdict("A", "B", clear)
    assert "B is better than A" in verdict("A", "B", paired_comparison(base, base + 0.05))
    assert "within the noise" in verdict("A", "B", noisy)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(ap_a=[0.1, 0.2], ap_b=[0.1]), "same queries"),
    (dict(ap_a=[0.1, np.nan], ap_b=[0.1, 0.2]), "at least 2"),
    (dict(ap_a=[[0.1]], ap_b=[[0.1]]), "1-D"),
    (dict(ap_a=[0.1, 0.2], ap_b=[0.1, 0.2], level=1.5), "level"),
    (dict(ap_a=[0.1, 0.2], ap_b=[0.1, 0.2], n_boot=0), "n_boot"),
])
def test_paired_comparison_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        paired_comparison(**kwargs)


def test_mean_ap_excluding():
    aps = np.array([1.0, 1.0, 0.2, 0.4, np.nan])
    subsets = np.array(["ukbench56", "ukbench56", "wxbs", "evd", "evd"])
    assert mean_ap_excluding(aps, subsets) == pytest.approx(0.3)
    assert mean_ap_excluding(aps, subsets, exclude=()) == pytest.approx(2.6 / 4)
    assert np.isnan(mean_ap_excluding(aps[:2], subsets[:2]))
    with pytest.raises(ValueError, match="one entry per query"):
        mean_ap_excluding(aps, subsets[:3])


def test_signed_never_prints_a_nonzero_gap_as_zero():
    from retrieval_lib.book.verdict import signed

    assert signed(0.0123) == "+0.012" and signed(-0.5) == "-0.500" and signed(0.0) == "+0.000"
    assert signed(-2.1e-4) == "-2.1e-04" and signed(3e-6) == "+3.0e-06"
    cmp = paired_comparison(np.array([0.5, 0.5002, 0.4]), np.array([0.5, 0.5, 0.4]), n_boot=20)
    assert "+6.7e-05" in verdict("A", "B", cmp)
