"""retrieval_lib.engine.train: contrastive loss, GeM's closed-form gradients, pairs, the fitting loop.

Every vectorised function is checked against a plain loop or a hand-worked case; every
documented error is triggered.
"""
import math

import numpy as np
import pytest
import torch

from retrieval_lib.layers import functional
from retrieval_lib.layers.pooling import GeM, MAC
from retrieval_lib.engine.mining import mine_pairs, split_groups
from retrieval_lib.engine.extract import pool_fmaps
from retrieval_lib.engine.train import fit_pooling, pool_fmaps_with_grad
from retrieval_lib.layers.losses import contrastive_loss


# ------------------------------------------------------------------------- contrastive loss
def _contrastive_loop(x1, x2, label, margin):
    out = []
    for a, b, y in zip(x1.tolist(), x2.tolist(), label.tolist()):
        d = math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))
        out.append(0.5 * d * d if y == 1 else 0.5 * max(0.0, margin - d) ** 2)
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contrastive_matches_a_plain_loop(reduction):
    g = torch.Generator().manual_seed(0)
    x1 = functional.l2n(torch.randn(20, 6, generator=g, dtype=torch.float64))
    x2 = functional.l2n(torch.randn(20, 6, generator=g, dtype=torch.float64))
    x2[:3] = x1[:3] + 0.01  # a few near-identical pairs, so both branches of the hinge occur
    label = torch.tensor([1, 0] * 10)
    ref = _contrastive_loop(x1, x2, label, 0.9)
    want = sum(ref) / len(ref) if reduction == "mean" else sum(ref)
    got = contrastive_loss(x1, x2, label, margin=0.9, reduction=reduction)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert any(v == 0 for v, y in zip(ref, label.tolist()) if y == 0)  # some negatives beyond the margin
    assert any(v > 0 for v, y in zip(ref, label.tolist()) if y == 0)  # and some inside it


def test_contrastive_hand_worked_cases():
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    x2 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]], dtype=torch.float64)
    # pair 0 matching at distance sqrt(2): 1/2 * 2 = 1
    # pair 1 non-matching at sqrt(2) > 0.7: 0
    # pair 2 non-matching at sqrt(0.04 + 0.36) = sqrt(0.4): 1/2 (0.7 - sqrt(0.4))^2
    label = torch.tensor([1, 0, 0])
    third = 0.5 * (0.7 - math.sqrt(0.4)) ** 2
    got = contrastive_loss(x1, x2, label, margin=0.7, reduction="sum")
    assert got.item() == pytest.approx(1.0 + 0.0 + third, abs=1e-14)
    assert contrastive_loss(x1, x2, label, 0.7).item() == pytest.approx((1.0 + third) / 3, abs=1e-14)


def test_contrastive_identical_pair_has_finite_gradient():
    x = torch.tensor([[0.6, 0.8]], requires_grad=True)
    loss = contrastive_loss(x, x.detach().clone(), torch.tensor([0]), margin=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.125, abs=1e-6)  # 1/2 * 0.5^2 at distance 0
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(x1=torch.zeros(3, 2), x2=torch.zeros(3, 3), label=torch.ones(3)), "same shape"),
    (dict(x1=torch.zeros(3), x2=torch.zeros(3), label=torch.ones(3)), "same shape"),
    (dict(x1=torch.zeros(3, 2), x2=torch.zeros(3, 2), label=torch.ones(2)), "one per pair"),
    (dict(x1=torch.zeros(3, 2), x2=torch.zeros(3, 2), label=torch.tensor([0, 1, 2])), "1 .matching"),
    (dict(x1=torch.zeros(3, 2), x2=torch.zeros(3, 2), label=torch.ones(3), margin=0.0), "margin"),
    (dict(x1=torch.zeros(3, 2), x2=torch.zeros(3, 2), label=torch.ones(3), reduction="max"), "reduction"),
])
def test_contrastive_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(**kwargs)


def test_contrastive_rejects_non_tensors():
    with pytest.raises(TypeError, match="tensors"):
        contrastive_loss([[0.0]], [[0.0]], [1])


# ------------------------------------------------------------------------- pairs
def test_split_groups_keeps_groups_whole():
    labels = np.repeat(np.arange(10), 3)
    m = split_groups(labels, frac=0.4, seed=3)
    for g in range(10):
        assert len(set(m[labels == g].tolist())) == 1  # a group is on one side only
    assert len(set(labels[m].tolist())) == 4
    assert (split_groups(labels, 0.4, seed=3) == m).all()  # seeded
    assert not (split_groups(labels, 0.4, seed=4) == m).all()


@pytest.mark.parametrize("frac", [0.0, 1.0, 0.01])
def test_split_groups_needs_both_sides(frac):
    with pytest.raises(ValueError, match="both sides"):
        split_groups([0, 0, 1, 1, 2, 2], frac=frac)


def test_split_groups_rejects_bad_labels():
    with pytest.raises(ValueError, match="1-D"):
        split_groups(np.zeros((2, 2)))


def _mine_loop(X, labels, n_neg, mask):
    n = len(labels)
    pos, neg = [], []
    for a in range(n):
        for b in range(a + 1, n):
            if mask[a] and mask[b] and labels[a] == labels[b]:
                pos.append((a, b))
    S = (X @ X.T).tolist()
    for a in range(n):
        if not mask[a] or not any(mask[b] and b != a and labels[b] == labels[a] for b in range(n)):
            continue
        cands = [b for b in range(n) if mask[b] and labels[b] != labels[a]]
        cands.sort(key=lambda b: -S[a][b])
        neg += [(a, b) for b in cands[:n_neg]]
    return pos, neg


def test_mine_pairs_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    X = functional.l2n(torch.randn(14, 8, generator=g, dtype=torch.float64))
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5, 5, 6])  # 3, 4 and 6 are singletons
    mask = np.ones(14, bool)
    mask[[7, 12]] = False  # group 5 loses its pair; group 2 keeps three images
    i, j, y = mine_pairs(X, labels, n_neg=3, mask=mask)
    pos, neg = _mine_loop(X, labels, 3, mask)
    got_pos = sorted(zip(i[y == 1].tolist(), j[y == 1].tolist()))
    got_neg = sorted(zip(i[y == 0].tolist(), j[y == 0].tolist()))
    assert got_pos == sorted(pos)
    assert got_neg == sorted(neg)
    assert (y[: len(pos)] == 1).all() and (y[len(pos):] == 0).all()  # positives first


def test_mine_pairs_with_few_negatives_drops_the_fill():
    X = functional.l2n(torch.randn(3, 4, generator=torch.Generator().manual_seed(2)))
    i, j, y = mine_pairs(X, [0, 0, 1], n_neg=5)
    assert sorted(zip(i.tolist(), j.tolist(), y.tolist())) == [(0, 1, 1), (0, 2, 0), (1, 2, 0)]


def test_mine_pairs_errors():
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="no two kept images"):
        mine_pairs(X, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="no two kept images"):
        mine_pairs(X, [0, 0, 1, 1], mask=[True, False, True, False])
    with pytest.raises(ValueError, match="one per row"):
        mine_pairs(X, [0, 0, 1])
    with pytest.raises(ValueError, match="n_neg"):
        mine_pairs(X, [0, 0, 1, 1], n_neg=-1)
    with pytest.raises(ValueError, match="mask"):
        mine_pairs(X, [0, 0, 1, 1], mask=[True, True])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        mine_pairs(torch.randn(4), [0, 0, 1, 1])


# ------------------------------------------------------------------------- pooling and fitting
def _mixed_fmaps(n=8, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(C, 3, 4), (C, 4, 3)]
    return [torch.rand(shapes[k % 2], generator=g) * 6 for k in range(n)]


def test_pool_fmaps_with_grad_keeps_the_requested_order_across_sizes():
    fmaps = _mixed_fmaps()
    gem = GeM(p=2.5)
    idx = [5, 0, 3, 2, 7]
    got = pool_fmaps_with_grad(fmaps, gem, idx)
    want = torch.stack([functional.l2n(functional.gem(fmaps[k][None], 2.5))[0] for k in idx])
    assert torch.allclose(got, want, atol=1e-6)
    got.sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad).all()
    assert torch.allclose(pool_fmaps_with_grad(fmaps, MAC(), torch.tensor([1, 4])),
                          functional.l2n(torch.stack([fmaps[1].amax((1, 2)), fmaps[4].amax((1, 2))])))
    with pytest.raises(ValueError, match="no indices"):
        pool_fmaps_with_grad(fmaps, gem, [])


def test_pool_fmaps_with_grad_equals_pool_fmaps_on_every_map():
    """The training variant and extraction's helper give the same descriptors; only the
    first keeps the graph."""
    fmaps = _mixed_fmaps(n=7, seed=3)
    gem = GeM(p=3.5)
    with_grad = pool_fmaps_with_grad(fmaps, gem, range(len(fmaps)))
    plain = pool_fmaps(fmaps, gem)
    assert with_grad.requires_grad and not plain.requires_grad
    torch.testing.assert_close(with_grad.detach(), plain)


def _peaky_problem(seed=0):
    """Matching images share one strong spot per channel on a background that differs: a
    larger p (closer to MAC) separates the groups better, so fitting p must raise it."""
    g = torch.Generator().manual_seed(seed)
    C, H, W, groups, per = 8, 5, 5, 4, 3
    fmaps, labels = [], []
    for grp in range(groups):
        peak = torch.rand(C, generator=g) * 5 + 1
        for _ in range(per):
            x = torch.rand(C, H, W, generator=g) * 2  # unrelated background
            pos = torch.randint(0, H * W, (C,), generator=g)
            x.view(C, -1)[torch.arange(C), pos] = peak
            fmaps.append(x)
            labels.append(grp)
    return fmaps, np.array(labels)


def test_fit_pooling_raises_p_when_peaks_carry_the_identity():
    fmaps, labels = _peaky_problem()
    gem = GeM(p=2.0)
    X = pool_fmaps(fmaps, gem)
    i, j, y = mine_pairs(X, labels, n_neg=3)
    hist = fit_pooling(fmaps, gem, i, j, y, steps=15, lr=0.3, margin=0.5, progress=False)
    assert len(hist["loss"]) == len(hist["params"]) == 16
    assert hist["loss"][-1] < 0.7 * hist["loss"][0]
    assert hist["params"][-1]["p"].item() > hist["params"][0]["p"].item() + 1.0
    assert hist["params"][0]["p"].item() == pytest.approx(2.0)


def test_fit_pooling_zero_steps_reports_the_starting_loss():
    fmaps, labels = _peaky_problem(1)
    gem = GeM(p=3.0)
    i, j, y = mine_pairs(pool_fmaps(fmaps, gem), labels, n_neg=2)
    hist = fit_pooling(fmaps, gem, i, j, y, steps=0, margin=0.6, progress=False)
    D = torch.stack([functional.l2n(functional.gem(f[None], 3.0))[0] for f in fmaps])
    want = contrastive_loss(D[i], D[j], y, margin=0.6)
    assert hist["loss"] == [pytest.approx(want.item(), rel=1e-5)]
    assert gem.p.item() == 3.0


def test_fit_pooling_errors():
    fmaps, labels = _peaky_problem()
    with pytest.raises(ValueError, match="no trainable parameter"):
        fit_pooling(fmaps, GeM(learn_p=False), [0], [1], [1])
    with pytest.raises(ValueError, match="equal length"):
        fit_pooling(fmaps, GeM(), [0, 1], [1], [1])
    with pytest.raises(ValueError, match="steps"):
        fit_pooling(fmaps, GeM(), [0], [1], [1], steps=-1)
