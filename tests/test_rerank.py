"""Re-ranking when the queries are the database images: no query inside its own DBA or expansion.

``expanded_ranks(X, None, ...)`` searches query ``q`` in the database without ``x_q``,
augmented (DBA) without ``x_q``; checked against a plain loop that rebuilds that database
for every query. ``expand`` refuses DBA with ``Q=None``, which would mix each query's
own vector into its positives' augmented vectors.
"""
import numpy as np
import pytest
import torch

from retrieval_lib.layers.functional import l2n
from retrieval_lib.search.nearest import rank_database
from retrieval_lib.search.rerank import dba, expand, expanded_ranks


def _unit(n, d, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return l2n(X.abs() if positive else X)


def _loop_dba(X, n, alpha):
    out = []
    for i in range(X.shape[0]):
        sims = X @ X[i]
        top = torch.argsort(sims, descending=True)[:n]
        out.append(l2n(sum(max(float(sims[j]), 0.0) ** alpha * X[j] for j in top.tolist())))
    return torch.stack(out)


def _leave_one_out(X, n_qe, n_dba, alpha):
    """For each query q: drop x_q, DBA the rest, expand x_q over it, rank; q itself last."""
    N = X.shape[0]
    rows = []
    for q in range(N):
        keep = [i for i in range(N) if i != q]
        Xm = X[keep]
        Xa = _loop_dba(Xm, n_dba, alpha) if n_dba >= 2 else Xm
        v = X[q].clone()
        if n_qe:
            sims = Xa @ X[q]
            for j in torch.argsort(sims, descending=True)[:n_qe].tolist():
                v = v + max(float(sims[j]), 0.0) ** alpha * Xa[j]
        order = torch.argsort(Xa @ l2n(v), descending=True).tolist()
        rows.append([keep[i] for i in order] + [q])
    return np.array(rows)


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("n_qe, n_dba, alpha", [(0, 3, 3.0), (2, 3, 3.0), (1, 2, 1.0), (3, 4, 0.5), (2, 0, 3.0)])
def test_self_queries_match_leave_one_out_loop(positive, n_qe, n_dba, alpha):
    # (alpha = 0 would make DBA vectors with the same neighbour set equal: ties in any order)
    X = _unit(23, 8, 5, positive)
    got = expanded_ranks(X, None, n_qe=n_qe, n_dba=n_dba, alpha=alpha)
    assert got.dtype == np.int64 and got.shape == (23, 23)
    np.testing.assert_array_equal(got, _leave_one_out(X, n_qe, n_dba, alpha))


def test_self_queries_differ_from_the_leaky_dba():
    """With the query inside the DBA, positives move towards it: the leak changes rankings."""
    X = _unit(40, 6, 2, positive=True)
    honest = expanded_ranks(X, None, n_qe=0, n_dba=3)
    leaky = rank_database(X, dba(X, n=3))  # every query searched in a database augmented with itself
    leaky = np.array([[i for i in row if i != q] + [q] for q, row in enumerate(leaky)])
    assert (honest != leaky).any(axis=1).sum() > 0
    # and the leak is what makes them differ: the honest ranks are the leave-one-out loop's
    np.testing.assert_array_equal(honest, _leave_one_out(X, 0, 3, 3.0))


def test_without_dba_equals_expand_then_search():
    X = _unit(30, 8, 3, positive=True)
    got = expanded_ranks(X, None, n_qe=2, n_dba=0)
    Xa, Qa = expand(X, None, n_qe=2)
    ref = rank_database(Qa, Xa)
    drop_self = lambda R: np.array([[i for i in row if i != q] for q, row in enumerate(R)])
    np.testing.assert_array_equal(drop_self(got), drop_self(ref))
    np.testing.assert_array_equal(got[:, -1], np.arange(30))  # the query itself comes last


def test_separate_queries_equal_expand_then_search():
    X, Q = _unit(30, 8, 3), _unit(5, 8, 4)
    for n_qe, n_dba in [(2, 3), (0, 4), (1, 0)]:
        Xa, Qa = expand(X, Q, n_qe=n_qe, n_dba=n_dba)
        np.testing.assert_array_equal(expanded_ranks(X, Q, n_qe=n_qe, n_dba=n_dba), rank_database(Qa, Xa))


def test_float32_numpy_input():
    X = _unit(20, 8, 6, positive=True)
    got = expanded_ranks(X.float().numpy(), None, n_qe=1, n_dba=2)
    np.testing.assert_array_equal(got, expanded_ranks(X, None, n_qe=1, n_dba=2))


def test_expand_refuses_dba_when_the_queries_are_the_database():
    X = _unit(10, 4, 0)
    with pytest.raises(ValueError, match="expanded_ranks"):
        expand(X, None, n_qe=1, n_dba=3)
    Xa, Qa = expand(X, None, n_qe=1, n_dba=1)  # n_dba 0 or 1 is no augmentation: allowed
    assert Xa is X


def test_expanded_ranks_errors():
    X = _unit(6, 4, 0)
    with pytest.raises(ValueError, match=r"n_dba=6 .* has 5 vectors; pass n_dba <= 5"):
        expanded_ranks(X, None, n_qe=1, n_dba=6)
    with pytest.raises(ValueError, match=r"n_qe=6 .* pass n_qe <= 5"):
        expanded_ranks(X, None, n_qe=6)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        expanded_ranks(X, None, alpha=-1.0)
    with pytest.raises(ValueError, match="n_qe must be an integer >= 0"):
        expanded_ranks(X, None, n_qe=-1)
    with pytest.raises(ValueError, match=r"expanded_ranks: X has 0 descriptor"):
        expanded_ranks(X[:0], None)
    bad = X.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="expanded_ranks"):
        expanded_ranks(bad, None)
