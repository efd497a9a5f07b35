"""Smooth-AP and the NRA-like loss (layers/losses.py) against plain Python loops, and RankLoss, the
objective that trains with them (engine/objectives.py)."""
import math

import pytest
import torch

from retrieval_lib.engine.objectives import RankLoss
from retrieval_lib.layers.functional import l2n
from retrieval_lib.layers.losses import nra_like_loss, smooth_ap_loss


def _sig(d, tau):  # written so that exp never overflows at a tiny tau
    z = d / tau
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _smooth_ap_loop(X, labels, tau):
    S = (X @ X.T).tolist()
    n = len(labels)
    losses = []
    for q in range(n):
        P = [i for i in range(n) if i != q and labels[i] == labels[q]]
        if not P:
            continue
        omega = [j for j in range(n) if j != q]
        ap = 0.0
        for i in P:
            r_pos = 1.0 + sum(_sig(S[q][j] - S[q][i], tau) for j in P if j != i)
            r_all = 1.0 + sum(_sig(S[q][j] - S[q][i], tau) for j in omega if j != i)
            ap += r_pos / r_all
        losses.append(1.0 - ap / len(P))
    return sum(losses) / len(losses)


def _nra_loop(X, labels, tau, gamma):
    S = (X @ X.T).tolist()
    n = len(labels)
    losses = []
    for q in range(n):
        P = [i for i in range(n) if i != q and labels[i] == labels[q]]
        N = [j for j in range(n) if labels[j] != labels[q]]
        if not P or not N:
            continue
        rho = {}
        for j in range(n):
            if j == q:
                continue
            r = sum(_sig(S[q][k] - S[q][j], tau) for k in range(n) if k not in (q, j)) / (n - 2)
            rho[j] = (1.0 - r) ** gamma
        lp = sum((1.0 - rho[i]) ** 2 for i in P) / len(P)
        ln = sum(rho[j] ** 2 for j in N) / len(N)
        losses.append(lp + ln)
    return sum(losses) / len(losses)


def _batch(n=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return l2n(torch.randn(n, d, generator=g, dtype=torch.float64))


LABELS = [[0, 0, 1, 1, 2, 2, 2], [0, 1, 0, 1, 0, 1, 3], [5, 5, 5, 5, 9, 9, 7]]


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
def test_smooth_ap_equals_a_loop(labels, tau):
    X = _batch(seed=len(labels) + int(tau * 100))
    got = smooth_ap_loss(X, torch.tensor(labels), tau=tau)
    assert float(got) == pytest.approx(_smooth_ap_loop(X, labels, tau), abs=1e-12)


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("tau,gamma", [(0.05, 4.0), (0.2, 1.0), (0.01, 2.5)])
def test_nra_like_equals_a_loop(labels, tau, gamma):
    X = _batch(seed=3)
    got = nra_like_loss(X, torch.tensor(labels), tau=tau, gamma=gamma)
    assert float(got) == pytest.approx(_nra_loop(X, labels, tau, gamma), abs=1e-12)


def test_smooth_ap_hand_worked_case():
    # anchor 0 and its positive 1; a negative 2. Similarities from anchor 0: s1 = 0.8, s2 = 0.6.
    # with tau -> 0: positive ranked first, AP = 1 for anchor 0.
    X = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], dtype=torch.float64)
    labels = [0, 0, 1]
    # anchor 0: R(1, Omega) = 1 + sigma((0.6 - 0.8)/tau); anchor 1: s(1,0) = 0.8, s(1,2) = 0.96 -> negative first
    tau = 0.01
    a0 = 1.0 / (1.0 + _sig(0.6 - 0.8, tau))
    a1 = 1.0 / (1.0 + _sig(0.96 - 0.8, tau))
    got = smooth_ap_loss(X, labels, tau)
    assert float(got) == pytest.approx(1 - (a0 + a1) / 2, abs=1e-12)
    assert float(got) == pytest.approx(0.25, abs=1e-3)  # AP 1 and 1/2


def test_smooth_ap_tends_to_exact_ap():
    X = _batch(n=8, seed=11)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    S = X @ X.T
    aps = []
    for q in range(8):
        order = [j for j in torch.argsort(S[q], descending=True).tolist() if j != q]
        rel = [bool(labels[j] == labels[q]) for j in order]
        hits, ap = 0, 0.0
        for k, r in enumerate(rel, 1):
            if r:
                hits += 1
                ap += hits / k
        aps.append(ap / sum(rel))
    exact = 1 - sum(aps) / len(aps)
    assert float(smooth_ap_loss(X, labels, tau=1e-5)) == pytest.approx(exact, abs=1e-6)


def test_losses_fall_when_positives_come_first():
    labels = torch.tensor([0, 0, 1, 1])
    good = l2n(torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.05, 1.0], [-0.05, 1.0]], dtype=torch.float64))
    bad = l2n(torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, -0.05], [-0.05, 1.0]], dtype=torch.float64))
    for fn in (smooth_ap_loss, nra_like_loss):
        assert float(fn(good, labels)) < float(fn(bad, labels)), fn.__name__


@pytest.mark.parametrize("fn", [smooth_ap_loss, nra_like_loss])
def test_gradients_are_finite_and_nonzero(fn):
    X = _batch(n=6, seed=5).requires_grad_(True)
    fn(X, torch.tensor([0, 0, 1, 1, 2, 2]), 0.1).backward()
    assert torch.isfinite(X.grad).all() and float(X.grad.abs().sum()) > 0


@pytest.mark.parametrize("fn", [smooth_ap_loss, nra_like_loss])
def test_gradcheck(fn):
    X = _batch(n=5, d=3, seed=6).requires_grad_(True)
    lab = torch.tensor([0, 0, 1, 1, 1])
    assert torch.autograd.gradcheck(lambda x: fn(x, lab, 0.2), (X,))


def test_anchors_without_positive_are_left_out():
    X = _batch(n=5, seed=8)
    full = smooth_ap_loss(X, [0, 0, 1, 1, 2], 0.1)  # anchor 4 has no positive
    assert float(full) == pytest.approx(_smooth_ap_loop(X, [0, 0, 1, 1, 2], 0.1), abs=1e-12)
    assert torch.isfinite(full)


@pytest.mark.parametrize("fn", [smooth_ap_loss, nra_like_loss])
def test_bad_inputs(fn):
    X = _batch(n=4)
    with pytest.raises(ValueError, match="embeddings must be"):
        fn(X[0], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="embeddings must be"):
        fn(torch.ones(4, 3, dtype=torch.int64), [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        fn(X, [0, 0, 1])
    with pytest.raises(ValueError, match="tau must be a positive"):
        fn(X, [0, 0, 1, 1], 0.0)
    with pytest.raises(ValueError, match="no anchor has"):
        fn(X, [0, 1, 2, 3])  # no positive anywhere


def test_nra_needs_negatives_and_three_rows():
    X = _batch(n=4)
    with pytest.raises(ValueError, match="no anchor has both a positive and a negative"):
        nra_like_loss(X, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="too small"):
        nra_like_loss(X[:2], [0, 1])
    with pytest.raises(ValueError, match="gamma must be a positive"):
        nra_like_loss(X, [0, 0, 1, 1], 0.1, gamma=-1)


def test_rank_loss_objective():
    X = l2n(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)))
    batch = {"labels": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])}
    assert float(RankLoss("smoothap", tau=0.1)(X, batch)) == float(smooth_ap_loss(X, batch["labels"], 0.1))
    assert float(RankLoss("nra", tau=0.1, gamma=2.0)((X, None), batch)) == \
        float(nra_like_loss(X, batch["labels"], 0.1, 2.0))
    assert RankLoss("nra", tau=0.1).config() == {"objective": "rank", "loss": "nra", "tau": 0.1}
    with pytest.raises(ValueError, match="unknown loss"):
        RankLoss("ap")


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.01, 1e-3, 1e-4])
def test_rank_loss_smoothap_equals_a_loop_down_to_tiny_tau(tau):
    """06's hand check: six rows, one without a positive (no anchor), temperatures down to 1e-4
    (where a naive exp overflows); the objective's forward equals the loop."""
    X = _batch(n=6, seed=0)
    labels = [0, 0, 0, 1, 1, 2]
    got = float(RankLoss("smoothap", tau=tau).forward(X, torch.tensor(labels)))
    assert math.isfinite(got)
    assert got == pytest.approx(_smooth_ap_loop(X, labels, tau), abs=1e-12)
