"""search.compare and search.verdict against plain references and hand-worked cases."""
import numpy as np
import pytest

from retrieval_lib.search.verdict import verdict
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
    from retrieval_lib.search.verdict import signed

    assert signed(0.0123) == "+0.012" and signed(-0.5) == "-0.500" and signed(0.0) == "+0.000"
    assert signed(-2.1e-4) == "-2.1e-04" and signed(3e-6) == "+3.0e-06"
    cmp = paired_comparison(np.array([0.5, 0.5002, 0.4]), np.array([0.5, 0.5, 0.4]), n_boot=20)
    assert "+6.7e-05" in verdict("A", "B", cmp)


def _loop_group_bootstrap(d, groups, n_boot, seed, level):
    """Plain reference: draw groups one at a time, pool their queries, average."""
    labels = sorted(set(groups))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    means = []
    for row in idx:
        pooled = [d[q] for j in row for q in range(len(d)) if groups[q] == labels[j]]
        means.append(sum(pooled) / len(pooled))
    return np.quantile(means, [(1 - level) / 2, (1 + level) / 2])


def test_group_bootstrap_matches_a_loop_and_is_wider_when_queries_share_groups():
    from retrieval_lib.search.compare import paired_comparison

    rng = np.random.default_rng(5)
    a, b = rng.random(12), rng.random(12)
    groups = np.array(["g1", "g1", "g2", "g3", "g3", "g3", "g4", "g5", "g5", "g6", "g6", "g6"])
    cmp = paired_comparison(a, b, n_boot=200, seed=3, level=0.9, groups=groups)
    assert cmp["ci"] == pytest.approx(tuple(_loop_group_bootstrap(a - b, groups, 200, 3, 0.9)), abs=1e-12)
    assert (cmp["resampled"], cmp["n_groups"], cmp["n"]) == ("groups", 6, 12)
    # each image pair gives two mirror queries with the same difference: resampling queries one by one
    # treats 40 queries as independent, resampling the 20 pairs does not -- the interval widens by ~sqrt(2)
    d = rng.normal(0.02, 0.1, 20)
    pa, pb = np.repeat(d, 2), np.zeros(40)
    pairs = np.repeat(np.arange(20), 2)
    by_query = paired_comparison(pa, pb, n_boot=4000)
    by_pair = paired_comparison(pa, pb, n_boot=4000, groups=pairs)
    ratio = (by_pair["ci"][1] - by_pair["ci"][0]) / (by_query["ci"][1] - by_query["ci"][0])
    assert 1.25 < ratio < 1.6 and by_pair["delta"] == by_query["delta"]
    with pytest.raises(ValueError, match="one label per query"):
        paired_comparison(a, b, groups=groups[:5])
    with pytest.raises(ValueError, match="at least 2 groups"):
        paired_comparison(a, b, groups=np.zeros(12))


def test_sign_test_and_holm_by_hand():
    from retrieval_lib.search.compare import holm, sign_test

    assert sign_test(3, 0) == pytest.approx(0.25) and sign_test(0, 3) == pytest.approx(0.25)
    assert sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(4, 1) == pytest.approx(2 * (1 + 5) / 32)  # P(X <= 1), X ~ Bin(5, 1/2), doubled
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_verdict_never_claims_what_the_data_cannot_show():
    from retrieval_lib.search.verdict import multiplicity_note

    base = np.linspace(0.1, 0.9, 30)
    same = paired_comparison(base, base.copy())
    assert same["identical"] and not same["significant"]
    text = verdict("A", "B", same)
    assert "identical mAP on every one of the 30 queries" in text and "noise" not in text and "reverse" not in text
    # three queries gain, none lose: no resample can reverse it, and three queries are too few for a sign test
    one_sided = base.copy()
    one_sided[:3] += 0.2
    cmp = paired_comparison(one_sided, base)
    assert not cmp["significant"] and cmp["ci"][0] == pytest.approx(0.0, abs=1e-12) and cmp["sign_p"] == 0.25
    text = verdict("A", "B", cmp)
    assert "favours **A**" in text and "no resample can reverse" in text and "p = 0.25" in text
    assert "could reverse" not in text and "too few" in text
    # an interval endpoint that is 0 up to rounding (a -4.6e-18 "loss") is 0, not "beyond the noise"
    rounding = paired_comparison(base + np.r_[0.3, np.zeros(29)], base + np.r_[0, 4.6e-18, np.zeros(28)])
    assert not rounding["significant"] and rounding["losses"] == 0
    assert "12 comparisons at once" in multiplicity_note(12) and "0.6 of 12" in multiplicity_note(12)
    # within the noise: the sentence names what the bootstrap resampled (queries, or their groups)
    mixed = base + np.r_[0.05, -0.04, 0.03, -0.05, np.zeros(26)]
    assert "another draw of queries could reverse it" in verdict("A", "B", paired_comparison(mixed, base))
    by_group = paired_comparison(mixed, base, groups=np.repeat(np.arange(15), 2))
    assert not by_group["significant"] and "over the 15 groups" in verdict("A", "B", by_group)
    assert "another draw of groups could reverse it" in verdict("A", "B", by_group)
