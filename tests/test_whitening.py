"""Whitening: identity covariance, PCA/ZCA ranking identity, nn.Linear export, Lw against numpy, N < D,
partial whitening (power) against a 3x3 eigen-decomposition worked by hand, Lw shrinkage."""
import numpy as np
import pytest
import torch

from retrieval_lib.layers.functional import l2n
from retrieval_lib.layers.whitening import (Whitening, covariance_spectrum, learned_whitening, pca_whitening,
                                           zca_whitening)


def _correlated(n, d, seed, dtype=torch.float64):
    """(n, d) L2-normalised descriptors with a strongly non-isotropic covariance."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ A + 0.3
    return l2n(X).to(dtype)


def _cov(Y):
    Yc = Y - Y.mean(0)
    return Yc.T @ Yc / Y.shape[0]


def _project(W, X, dim=None):
    P = W.P if dim is None else W.P[:dim]
    return (X - W.m) @ P.T


# ---------------------------------------------------------------- identity covariance
@pytest.mark.parametrize("make", [pca_whitening, zca_whitening])
def test_whitened_training_data_has_identity_covariance(make):
    X = _correlated(400, 12, 0)
    W = make(X)
    C = _cov(_project(W, X))
    torch.testing.assert_close(C, torch.eye(12, dtype=torch.float64), atol=1e-8, rtol=0)
    assert bool((W.eigvals[:-1] >= W.eigvals[1:]).all())  # descending spectrum
    assert W.P.shape == (12, 12) and W.m.shape == (12,)


def test_pca_reduced_dim_is_prefix_and_identity():
    X = _correlated(300, 10, 1)
    W = pca_whitening(X)
    W4 = pca_whitening(X, dim=4)
    torch.testing.assert_close(W4.P, W.P[:4])
    torch.testing.assert_close(_cov(_project(W4, X)), torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(W4.apply(X), W.apply(X, dim=4))


def test_pca_and_zca_rank_identically_at_full_dimension():
    X = _correlated(300, 16, 2)
    Q = _correlated(20, 16, 3)
    Wp, Wz = pca_whitening(X), zca_whitening(X)
    Sp = Wp.apply(Q) @ Wp.apply(X).T
    Sz = Wz.apply(Q) @ Wz.apply(X).T
    torch.testing.assert_close(Sp, Sz, atol=1e-10, rtol=0)  # ZCA = U @ PCA, a rotation
    assert torch.equal(torch.argsort(Sp, dim=1, descending=True), torch.argsort(Sz, dim=1, descending=True))
    # ...and whitening does change the ranking compared with raw descriptors
    assert not torch.equal(torch.argsort(Sp, dim=1), torch.argsort(Q @ X.T, dim=1))


def test_shrinkage_formula():
    X = _correlated(200, 6, 4)
    lam, U = np.linalg.eigh(_cov(X).numpy())
    W = zca_whitening(X, shrinkage=0.05)
    np.testing.assert_allclose(W.P.numpy(), U @ np.diag((lam + 0.05) ** -0.5) @ U.T, atol=1e-10)
    Wp = pca_whitening(X, dim=2, shrinkage=0.05)
    ref = (U[:, ::-1][:, :2] * (lam[::-1][:2] + 0.05) ** -0.5).T  # top-2 rows, up to sign
    np.testing.assert_allclose(np.abs(Wp.P.numpy()), np.abs(ref), atol=1e-10)


# ---------------------------------------------------------------- fewer samples than dims
def test_fewer_samples_than_dims_raises_or_regularises():
    X = _correlated(10, 32, 5)
    with pytest.raises(ValueError, match=r"N samples < D dims: pass shrinkage>0 or dim<=N-1"):
        pca_whitening(X)
    with pytest.raises(ValueError, match=r"N samples < D dims.*pass shrinkage>0"):
        zca_whitening(X)
    W = pca_whitening(X, dim=9)  # the N-1 = 9 non-zero directions
    torch.testing.assert_close(_cov(_project(W, X)), torch.eye(9, dtype=torch.float64), atol=1e-6, rtol=0)
    for Ws in (pca_whitening(X, shrinkage=1e-3), zca_whitening(X, shrinkage=1e-3)):
        Y = Ws.apply(_correlated(5, 32, 6))
        assert bool(torch.isfinite(Ws.P).all()) and bool(torch.isfinite(Y).all())
        torch.testing.assert_close(Y.norm(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-5, rtol=0)


def test_rank_deficient_with_many_samples_raises():
    X = _correlated(200, 8, 7)
    X = torch.cat([X, X[:, :1]], dim=1)  # a repeated column: rank 8 in 9 dims
    with pytest.raises(ValueError, match=r"singular \(rank 8 < 9\).*dim<=8"):
        pca_whitening(X)
    assert pca_whitening(X, dim=8).P.shape == (8, 9)


# ---------------------------------------------------------------- Lw
def _numpy_lw(X, qidx, pidx):
    """Lw written straight from the formulas with numpy."""
    m = X[qidx].mean(0)
    d = X[qidx] - X[pidx]
    S = d.T @ d / len(qidx)
    P1 = np.linalg.inv(np.linalg.cholesky(S))
    Y = (X - m) @ P1.T
    lam, E = np.linalg.eigh(Y.T @ Y / X.shape[0])
    order = np.argsort(lam)[::-1]
    return m, E[:, order].T @ P1, lam[order]


def _match_signs(P, ref):
    s = np.sign(np.sum(P * ref, axis=1, keepdims=True))
    return P * s


def test_lw_hand_made_case_against_numpy():
    X = np.array([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.1, 0.9, 0.3],
                  [0.2, 0.8, 0.5], [0.3, 0.2, 0.9], [0.1, 0.4, 0.8], [0.5, 0.5, 0.5]])
    qidx, pidx = np.array([0, 2, 4, 1]), np.array([1, 3, 5, 6])
    m, P, lam = _numpy_lw(X, qidx, pidx)
    W = learned_whitening(X, qidx, pidx)
    assert W.kind == "lw" and W.extra["cholesky_alpha"] == 0.0
    np.testing.assert_allclose(W.m.numpy(), m, atol=1e-12)
    np.testing.assert_allclose(W.eigvals.numpy(), lam, atol=1e-12)
    np.testing.assert_allclose(_match_signs(W.P.numpy(), P), P, atol=1e-10)


def test_lw_whitens_pairs_and_decorrelates_all():
    X = _correlated(300, 10, 8)
    g = torch.Generator().manual_seed(9)
    qidx = torch.randint(0, 300, (200,), generator=g)
    pidx = torch.randint(0, 300, (200,), generator=g)
    W = learned_whitening(X, qidx, pidx)
    D = (X[qidx] - X[pidx]) @ W.P.T
    # stage one: matching-pair differences become white, and the rotation keeps them so
    torch.testing.assert_close(D.T @ D / 200, torch.eye(10, dtype=torch.float64), atol=1e-8, rtol=0)
    # stage two: the whole set is decorrelated with decreasing variance (second moment about m)
    Y = _project(W, X)
    torch.testing.assert_close(Y.T @ Y / 300, torch.diag(W.eigvals), atol=1e-8, rtol=0)
    assert bool((W.eigvals[:-1] >= W.eigvals[1:]).all())


def test_lw_singular_pairs_use_regularised_cholesky():
    X = _correlated(50, 6, 10)
    qidx, pidx = np.arange(0, 4), np.arange(4, 8)  # 4 pairs cannot span 6 dims: S is singular
    W = learned_whitening(X, qidx, pidx)
    alpha = W.extra["cholesky_alpha"]
    assert alpha >= 1e-10
    assert bool(torch.isfinite(W.P).all()) and bool(torch.isfinite(W.apply(X)).all())
    d = X[qidx] - X[pidx]
    S = d.T @ d / 4 + alpha * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(W.P @ S @ W.P.T, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    # many pairs, but none differs along dimension 0: S[0, 0] = 0 exactly
    Xz = X.clone()
    qz, pz = np.arange(0, 20), np.arange(20, 40)
    Xz[pz, 0] = Xz[qz, 0]
    Wz = learned_whitening(Xz, qz, pz)
    assert Wz.extra["cholesky_alpha"] >= 1e-10 and bool(torch.isfinite(Wz.apply(Xz)).all())


# ---------------------------------------------------------------- the Whitening object
def test_to_linear_equals_apply_before_l2n():
    X = _correlated(100, 8, 11, dtype=torch.float32)
    W = pca_whitening(X)
    for dim in (None, 3):
        lin = W.to_linear(dim)
        assert isinstance(lin, torch.nn.Linear) and lin.out_features == (8 if dim is None else 3)
        with torch.no_grad():
            out = lin(X)
        torch.testing.assert_close(out, _project(W, X, dim), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l2n(out), W.apply(X, dim), atol=1e-5, rtol=1e-5)


def test_dtype_numpy_state_dict_repr_and_to(tmp_path):
    X32 = _correlated(100, 6, 12, dtype=torch.float32)
    W = zca_whitening(X32, shrinkage=1e-4)
    assert W.P.dtype == torch.float32 and W.m.dtype == torch.float32  # computed in float64 inside
    Xn = X32.numpy()
    Yn = W.apply(Xn)
    assert isinstance(Yn, np.ndarray) and Yn.dtype == np.float32
    np.testing.assert_allclose(Yn, W.apply(X32).numpy(), atol=1e-6)
    torch.save(W.state_dict(), tmp_path / "w.pt")
    W2 = Whitening.from_state_dict(torch.load(tmp_path / "w.pt"))
    assert torch.equal(W2.P, W.P) and W2.kind == "zca" and W2.extra == {"shrinkage": 1e-4, "power": 0.5}
    W64 = W.to(torch.float64)
    assert W64.P.dtype == torch.float64 and W.P.dtype == torch.float32
    assert W64.apply(X32.double()).dtype == torch.float64
    r = repr(W)
    assert "kind='zca'" in r and "dim_in=6" in r and "dim_out=6" in r and "shrinkage=0.0001" in r
    np_W = pca_whitening(Xn, dim=2)  # numpy in, torch tensors kept
    assert isinstance(np_W.P, torch.Tensor) and np_W.dim_out == 2


def test_bad_inputs_raise_clear_errors():
    X = _correlated(50, 6, 13)
    with pytest.raises(ValueError, match="2-D"):
        pca_whitening(X[0])
    with pytest.raises(ValueError, match="at least 2 rows"):
        zca_whitening(X[:1])
    with pytest.raises(ValueError, match="NaN or inf"):
        pca_whitening(torch.full((5, 2), float("nan")))
    with pytest.raises(ValueError, match="dim=7 must be between 1 and D=6"):
        pca_whitening(X, dim=7)
    with pytest.raises(ValueError, match="shrinkage must be >= 0"):
        pca_whitening(X, shrinkage=-1.0)
    W = pca_whitening(X, dim=4)
    with pytest.raises(ValueError, match="dim=5 is outside 1..4"):
        W.apply(X, dim=5)
    with pytest.raises(ValueError, match=r"shape \(N, 6\)"):
        W.apply(X[:, :5])
    with pytest.raises(ValueError, match="equal length"):
        learned_whitening(X, [0, 1], [2])
    with pytest.raises(ValueError, match="outside 0..49"):
        learned_whitening(X, [0, 50], [1, 2])
    with pytest.raises(KeyError, match="missing"):
        Whitening.from_state_dict({"m": W.m})
    with pytest.raises(ValueError, match="m of shape"):
        Whitening(m=W.m[:3], P=W.P)
    with pytest.raises(TypeError, match="torch.Tensor or numpy array"):
        pca_whitening(X.tolist())


# ---------------------------------------------------------------- NaN, inf and empty descriptors
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_entry_point_refuses_non_finite_descriptors(value):
    X = _correlated(50, 6, 21)
    bad = X.clone()
    bad[7, 2] = value
    for fn, call in (("pca_whitening", lambda A: pca_whitening(A)),
                     ("zca_whitening", lambda A: zca_whitening(A)),
                     ("learned_whitening", lambda A: learned_whitening(A, [0, 1, 2], [3, 4, 5]))):
        with pytest.raises(ValueError, match=rf"{fn}: X contains NaN or inf values: 1 row\(s\) .*rows 7\)"):
            call(bad)
    W = pca_whitening(X)
    with pytest.raises(ValueError, match=r"Whitening.apply: X contains NaN or inf values.*rows 7\)"):
        W.apply(bad)  # used to whiten silently into NaN rows
    with pytest.raises(ValueError, match=r"Whitening.apply: X contains NaN or inf"):
        W(bad.numpy())


def test_empty_and_integer_descriptors_are_refused():
    X = _correlated(50, 6, 22)
    W = pca_whitening(X)
    with pytest.raises(ValueError, match=r"Whitening.apply: X has 0 descriptor\(s\).*pass at least one"):
        W.apply(X[:0])
    with pytest.raises(ValueError, match=r"pca_whitening: X has 0 descriptor\(s\).*at least 2 rows"):
        pca_whitening(X[:0])
    with pytest.raises(TypeError, match=r"zca_whitening: X must hold floating point descriptors.*\.float\(\)"):
        zca_whitening(X.long())


# ---------------------------------------------------------------- partial whitening, by hand
def _hand_case():
    """Six points whose covariance is C = [[2, 1, 0], [1, 2, 0], [0, 0, 4]] exactly, around mean m.

    By hand: C has eigenvalues 4 (e3), 3 ((e1 + e2)/sqrt2) and 1 ((e1 - e2)/sqrt2). The points
    +-sqrt3 e_i have identity covariance; multiplied by C^(1/2) = U diag(sqrt lam) U^T, which is
    1/2 [[sqrt3 + 1, sqrt3 - 1], [sqrt3 - 1, sqrt3 + 1]] in the first block and 2 in the last,
    their covariance is C.
    """
    r3 = 3 ** 0.5
    half = np.array([[r3 + 1, r3 - 1, 0], [r3 - 1, r3 + 1, 0], [0, 0, 4]]) / 2  # C^(1/2)
    Z = np.concatenate([np.eye(3), -np.eye(3)]) * r3
    m = np.array([1.0, -2.0, 0.5])
    return Z @ half + m, m


@pytest.mark.parametrize("power", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_partial_whitening_matches_the_hand_worked_3x3_case(power, shrinkage):
    X, m = _hand_case()
    s2 = 2 ** -0.5
    lam = np.array([4.0, 3.0, 1.0])
    U = np.array([[0, 0, 1], [s2, s2, 0], [s2, -s2, 0]])  # rows: eigenvectors, eigenvalues descending
    g = (lam + shrinkage) ** -power
    W = pca_whitening(torch.tensor(X), shrinkage=shrinkage, power=power)
    np.testing.assert_allclose(W.m.numpy(), m, atol=1e-12)
    np.testing.assert_allclose(W.eigvals.numpy(), lam, atol=1e-12)
    np.testing.assert_allclose(_match_signs(W.P.numpy(), g[:, None] * U), g[:, None] * U, atol=1e-12)
    assert W.extra == {"shrinkage": shrinkage, "power": power}
    # ZCA: U diag(g) U^T, worked out by hand: 1/2 [[g3 + g1, g3 - g1], [g3 - g1, g3 + g1]] and g4
    g4, g3, g1 = g
    zca = np.array([[g3 + g1, g3 - g1, 0], [g3 - g1, g3 + g1, 0], [0, 0, 2 * g4]]) / 2
    np.testing.assert_allclose(zca_whitening(X, shrinkage=shrinkage, power=power).P.numpy(), zca, atol=1e-12)
    # the covariance after the map is diag(lam (lam + s)^(-2 alpha)): identity only when fully white
    Y = _project(W, torch.tensor(X))
    np.testing.assert_allclose(_cov(Y).numpy(), np.diag(lam * g ** 2), atol=1e-12)


def test_power_zero_is_a_pca_projection_and_needs_no_full_rank():
    X = _correlated(10, 32, 14)  # N < D: singular covariance
    W = pca_whitening(X, power=0.0)  # no division: allowed without shrinkage
    torch.testing.assert_close(W.P @ W.P.T, torch.eye(32, dtype=torch.float64), atol=1e-10, rtol=0)  # a rotation
    torch.testing.assert_close(W.apply(X) @ W.apply(X).T, l2n(X - W.m) @ l2n(X - W.m).T, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="N samples < D dims"):
        pca_whitening(X, power=0.25)


def test_spectrum_is_computed_once_and_gives_the_same_whitenings():
    X = _correlated(40, 8, 15, dtype=torch.float32)
    sp = covariance_spectrum(X)
    assert sp.n == 40 and sp.dim == 8 and sp.rank == 8 and "rank=8" in repr(sp)
    for kw in ({"dim": 3}, {"dim": 8, "shrinkage": 0.01, "power": 0.3}):
        a, b = pca_whitening(X, **kw), pca_whitening(sp, **kw)
        assert a.P.dtype == b.P.dtype == torch.float32
        torch.testing.assert_close(a.P, b.P)
    torch.testing.assert_close(zca_whitening(X, power=0.2).P, zca_whitening(sp, power=0.2).P)
    assert covariance_spectrum(_correlated(5, 8, 16)).rank == 4  # N - 1


def test_partial_settings_are_checked():
    X = _correlated(50, 6, 17)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="power must be >= 0 and finite"):
            pca_whitening(X, power=bad)
        with pytest.raises(ValueError, match="power must be >= 0 and finite"):
            zca_whitening(X, power=bad)
    with pytest.raises(ValueError, match="shrinkage must be >= 0 and finite"):
        learned_whitening(X, [0], [1], shrinkage=-1.0)


def test_lw_shrinkage_is_added_to_the_pair_covariance():
    X = _correlated(300, 10, 18)
    g = torch.Generator().manual_seed(19)
    qidx = torch.randint(0, 300, (200,), generator=g)
    pidx = torch.randint(0, 300, (200,), generator=g)
    W = learned_whitening(X, qidx, pidx, shrinkage=0.1)
    d = X[qidx] - X[pidx]
    S = d.T @ d / 200 + 0.1 * torch.eye(10, dtype=torch.float64)
    assert W.extra["shrinkage"] == 0.1 and W.extra["cholesky_alpha"] == 0.0
    torch.testing.assert_close(W.P @ S @ W.P.T, torch.eye(10, dtype=torch.float64), atol=1e-8, rtol=0)
    W0 = learned_whitening(X, qidx, pidx)
    assert not torch.allclose(W0.P @ S @ W0.P.T, torch.eye(10, dtype=torch.float64), atol=1e-3)


def test_eigh_on_one_thread_restores_the_thread_count():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        covariance_spectrum(_correlated(30, 5, 20))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
