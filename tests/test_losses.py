"""retrieval_lib.layers.losses: every loss against a plain loop on small hand-made inputs.

(The contrastive loss has its loop, hand-worked and error tests in test_train.py.)
"""
import math

import pytest
import torch

import retrieval_lib
from retrieval_lib.layers import functional
from retrieval_lib.layers.losses import (batch_hard_triplet_loss, contrastive_loss, smoothed_cross_entropy,
                                         triplet_loss)


def _dist(a, b, squared=False):
    s = sum((u - v) ** 2 for u, v in zip(a, b))
    return s if squared else math.sqrt(s)


def _rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return functional.l2n(torch.randn(n, d, generator=g, dtype=torch.float64))


# ------------------------------------------------------------------------- triplet
def _triplet_loop(a, p, n, margin, squared):
    out = [max(0.0, _dist(x, y, squared) - _dist(x, z, squared) + margin)
           for x, y, z in zip(a.tolist(), p.tolist(), n.tolist())]
    return sum(out) / len(out), out


@pytest.mark.parametrize("squared", [False, True])
def test_triplet_matches_a_plain_loop(squared):
    a, p, n = _rows(12, 5, 0), _rows(12, 5, 1), _rows(12, 5, 2)
    p[:4] = a[:4] + 0.01  # easy triplets: positive next to its anchor
    want, terms = _triplet_loop(a, p, n, 0.3, squared)
    assert any(t == 0 for t in terms) and any(t > 0 for t in terms)  # both sides of the hinge occur
    assert triplet_loss(a, p, n, margin=0.3, squared=squared).item() == pytest.approx(want, rel=1e-12)


def test_triplet_hand_worked_case():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)  # distances 5 and 1
    n = torch.tensor([[0.0, 6.0], [0.0, 3.0]], dtype=torch.float64)  # distances 6 and 3
    # margin 2: max(0, 5 - 6 + 2) = 1 and max(0, 1 - 3 + 2) = 0 -> mean 0.5
    assert triplet_loss(a, p, n, margin=2.0).item() == pytest.approx(0.5)
    # squared: max(0, 25 - 36 + 2) = 0, max(0, 1 - 9 + 2) = 0
    assert triplet_loss(a, p, n, margin=2.0, squared=True).item() == 0.0


def test_triplet_gradient_is_finite_when_anchor_equals_positive():
    a = torch.tensor([[0.6, 0.8]], requires_grad=True)
    loss = triplet_loss(a, a.detach().clone(), torch.tensor([[0.8, 0.6]]), margin=0.5)
    loss.backward()
    assert torch.isfinite(a.grad).all()
    assert loss.item() == pytest.approx(0.5 - math.sqrt(0.08), abs=1e-6)


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 2)), {}, ValueError, "same shape"),
    ((torch.zeros(3), torch.zeros(3), torch.zeros(3)), {}, ValueError, "same shape"),
    ((torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2)), {}, ValueError, "no triplets"),
    ((torch.zeros(3, 2),) * 3, {"margin": -1.0}, ValueError, "margin"),
    ((torch.zeros(3, 2),) * 3, {"margin": float("nan")}, ValueError, "margin"),
    (([[0.0]], torch.zeros(1, 1), torch.zeros(1, 1)), {}, TypeError, "anchor must be a tensor"),
])
def test_triplet_errors(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        triplet_loss(*args, **kwargs)


# ------------------------------------------------------------------------- batch hard
def _batch_hard_loop(X, labels, margin):
    rows = X.tolist()
    terms = []
    for a in range(len(rows)):
        pos = [_dist(rows[a], rows[p]) for p in range(len(rows)) if p != a and labels[p] == labels[a]]
        neg = [_dist(rows[a], rows[n]) for n in range(len(rows)) if labels[n] != labels[a]]
        if pos and neg:
            terms.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(terms) / len(terms), terms


def test_batch_hard_matches_a_plain_loop():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5]  # 3 and 5 are singletons: anchors without a positive
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    spread = torch.tensor([0.1] * 5 + [2.0] * 8, dtype=torch.float64)[:, None]  # tight and loose groups
    X = centres[labels] + spread * torch.randn(13, 4, generator=g, dtype=torch.float64)
    want, terms = _batch_hard_loop(X, labels, 0.4)
    assert len(terms) == 11
    assert any(t == 0 for t in terms) and any(t > 0 for t in terms)
    got = batch_hard_triplet_loss(X, torch.tensor(labels), margin=0.4)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_batch_hard_hand_worked_case():
    # points on a line: class 0 at 0 and 1, class 1 at 3 and 7
    X = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    labels = [0, 0, 1, 1]
    # anchor 0: farthest pos 1, nearest neg 3 -> max(0, 1 - 3 + 1) = 0
    # anchor 1: pos 1, neg 2 -> 0;   anchor 2: pos 4, neg 2 -> 3;   anchor 3: pos 4, neg 6 -> 0
    assert batch_hard_triplet_loss(X, labels, margin=1.0).item() == pytest.approx(3.0 / 4)


def test_batch_hard_equals_triplet_on_its_hardest_triplets():
    X = _rows(8, 6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # one positive per anchor
    D = torch.cdist(X, X)
    same = labels[:, None] == labels[None, :]
    p = D.masked_fill(~same | torch.eye(8, dtype=torch.bool), -1).argmax(1)
    n = D.masked_fill(same, math.inf).argmin(1)
    assert batch_hard_triplet_loss(X, labels, 0.2).item() == pytest.approx(
        triplet_loss(X, X[p], X[n], 0.2).item(), rel=1e-10)


def test_batch_hard_gradient_is_finite_with_duplicate_rows():
    X = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = batch_hard_triplet_loss(X, [0, 0, 1, 1], margin=2.0)  # positives at distance 0
    loss.backward()
    assert torch.isfinite(X.grad).all()
    assert loss.item() == pytest.approx(2.0 - math.sqrt(2.0), abs=1e-6)


@pytest.mark.parametrize("X, labels, match", [
    (torch.zeros(4, 2), [0, 0, 0, 0], "no anchor has both"),
    (torch.zeros(3, 2), [0, 1, 2], "no anchor has both"),
    (torch.zeros(3, 2), [0, 1], "one per row"),
    (torch.zeros(3), [0, 1, 2], r"\(N, D\)"),
])
def test_batch_hard_errors(X, labels, match):
    with pytest.raises(ValueError, match=match):
        batch_hard_triplet_loss(X, labels)
    with pytest.raises(ValueError, match="margin"):
        batch_hard_triplet_loss(torch.zeros(4, 2), [0, 0, 1, 1], margin=-0.5)


# ------------------------------------------------------------------------- smoothed cross-entropy
def _ce_loop(logits, target, eps, tau):
    out = []
    for row, y in zip(logits.tolist(), target.tolist()):
        z = [v / tau for v in row]
        m = max(z)
        log_norm = m + math.log(sum(math.exp(v - m) for v in z))
        k = len(z)
        q = [(1 - eps) * (c == y) + eps / k for c in range(k)]
        out.append(-sum(qc * (zc - log_norm) for qc, zc in zip(q, z)))
    return sum(out) / len(out)


@pytest.mark.parametrize("eps, tau", [(0.0, 1.0), (0.1, 0.5), (0.3, 2.0)])
def test_smoothed_cross_entropy_matches_a_plain_loop(eps, tau):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 6, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 6, (9,), generator=g)
    got = smoothed_cross_entropy(logits, target, smoothing=eps, temperature=tau)
    assert got.item() == pytest.approx(_ce_loop(logits, target, eps, tau), rel=1e-12)


def test_smoothed_cross_entropy_reduces_to_torch_cross_entropy():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (7,), generator=g)
    want = torch.nn.functional.cross_entropy(logits / 0.5, target, label_smoothing=0.2)
    assert smoothed_cross_entropy(logits, target, 0.2, 0.5).item() == pytest.approx(want.item(), rel=1e-12)


def test_smoothed_cross_entropy_hand_worked_case():
    # two classes, equal logits: softmax (1/2, 1/2), so every target mixture costs log 2
    logits = torch.zeros(3, 2, dtype=torch.float64)
    assert smoothed_cross_entropy(logits, [0, 1, 1], 0.1, 0.5).item() == pytest.approx(math.log(2))
    # logits (0, log 3) at tau = 1: p = (1/4, 3/4); target 1 with eps 0.5 -> q = (1/4, 3/4)
    # L = -(1/4 log 1/4 + 3/4 log 3/4)
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert smoothed_cross_entropy(logits, [1], 0.5, 1.0).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("logits, target, kwargs, match", [
    (torch.zeros(3), [0, 1, 2], {}, r"\(N, K\)"),
    (torch.zeros(3, 2), [0, 1], {}, "integer class indices"),
    (torch.zeros(3, 2), torch.tensor([0.0, 1.0, 1.0]), {}, "integer class indices"),
    (torch.zeros(3, 2), [0, 1, 2], {}, r"outside 0..1"),
    (torch.zeros(3, 2), [0, 1, -1], {}, r"outside 0..1"),
    (torch.zeros(3, 2), [0, 1, 1], {"smoothing": 1.0}, "smoothing"),
    (torch.zeros(3, 2), [0, 1, 1], {"temperature": 0.0}, "temperature"),
    (torch.zeros(0, 2), [], {}, "no samples"),
])
def test_smoothed_cross_entropy_errors(logits, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoothed_cross_entropy(logits, target, **kwargs)


def test_losses_are_one_import_away():
    for name in ("contrastive_loss", "triplet_loss", "batch_hard_triplet_loss", "smoothed_cross_entropy"):
        assert getattr(retrieval_lib.layers, name) is getattr(retrieval_lib.layers.losses, name)
    assert retrieval_lib.layers.contrastive_loss is contrastive_loss
