"""Compressed descriptors: float16 round trip, PCA projection, product quantisation against faiss and loops."""
import builtins
import sys

import numpy as np
import pytest
import torch

from retrieval_lib.layers.functional import l2n
from retrieval_lib.search.compress import (Float16Codec, Float32Codec, PCACodec, PQCodec, compressed_pair,
                                           faiss_available)


def _clustered(n, d, seed, k=12):
    """(n, d) float32 L2-normalised descriptors around k centres (structure for k-means to find)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    X = centres[torch.randint(0, k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return l2n(X)


# ---------------------------------------------------------------- float32 / float16
def test_float16_round_trip_equals_half_precision_and_its_bytes():
    X = _clustered(50, 24, 0)
    c = Float16Codec().fit(X)
    codes = c.encode(X)
    assert codes.dtype == torch.float16 and c.bytes_per_image == 2 * 24
    Y = c.decode(codes)
    assert Y.dtype == torch.float32
    torch.testing.assert_close(Y, X.half().float(), atol=0, rtol=0)
    # rounding to the nearest float16: relative error <= 2**-11 on these (normal-range) entries
    big = X.abs() > 1e-4
    assert float(((Y - X).abs() / X.abs())[big].max()) <= 2 ** -11
    f = Float32Codec().fit(X)
    assert f.bytes_per_image == 4 * 24 and torch.equal(f.decode(f.encode(X)), X)


def test_compressed_pair_is_adc_with_uncompressed_queries():
    X, Q = _clustered(40, 16, 1), _clustered(5, 16, 2)
    c = Float16Codec().fit(X)
    Xc, Qc = compressed_pair(c, X, Q)
    torch.testing.assert_close(Xc, l2n(X.half().float()), atol=0, rtol=0)
    torch.testing.assert_close(Qc, l2n(Q), atol=0, rtol=0)  # the query is not compressed
    Xc0, Qc0 = compressed_pair(c, X)  # Q=None: the database images query each other
    torch.testing.assert_close(Qc0, l2n(X))
    Xr, _ = compressed_pair(c, X, normalize=False)
    torch.testing.assert_close(Xr, X.half().float())


# ---------------------------------------------------------------- PCA
def test_pca_codec_projects_on_the_leading_principal_directions():
    X = _clustered(200, 16, 3)
    c = PCACodec(5).fit(X)
    assert c.bytes_per_image == 4 * 5 and PCACodec(5, half=True).fit(X).bytes_per_image == 2 * 5
    codes = c.encode(X)
    Xn = X.double().numpy()
    Xc = Xn - Xn.mean(0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)  # numpy reference: rows = principal directions
    ref = Xc @ Vt[:5].T
    s = np.sign(np.sum(codes.double().numpy() * ref, axis=0))  # directions are defined up to sign
    np.testing.assert_allclose(codes.double().numpy() * s, ref, atol=1e-5)
    # at full dimension it is a rotation of the centred vectors: cosine similarities are unchanged
    full = PCACodec(16).fit(X)
    Xf, Qf = compressed_pair(full, X)
    cen = l2n(X - X.mean(0))
    torch.testing.assert_close(Qf @ Xf.T, cen @ cen.T, atol=1e-5, rtol=0)
    half = PCACodec(5, half=True).fit(X)
    assert half.encode(X).dtype == torch.float16
    torch.testing.assert_close(half.decode(half.encode(X)), codes.half().float(), atol=0, rtol=0)


# ---------------------------------------------------------------- PQ
faiss = pytest.importorskip("faiss", reason="PQCodec needs the optional faiss package (pip install faiss-cpu)")


@pytest.mark.parametrize("m,nbits", [(4, 8), (8, 4), (16, 6), (2, 1)])
def test_pq_bytes_per_image_is_m_nbits_over_8(m, nbits):
    X = _clustered(300, 32, 4)
    threads = faiss.omp_get_max_threads()
    c = PQCodec(m, nbits).fit(X)
    assert c.bytes_per_image == m * nbits / 8
    assert faiss.omp_get_max_threads() == threads  # training on one thread restores faiss's setting
    assert c.centroids.shape == (m, 2 ** nbits, 32 // m)
    codes = c.encode(X)
    assert codes.shape == (300, m) and int(codes.min()) >= 0 and int(codes.max()) < 2 ** nbits


def test_pq_encode_decode_match_a_loop_and_faiss():
    X = _clustered(400, 24, 5)
    c = PQCodec(6, 5, seed=1).fit(X)
    codes = c.encode(X)
    cents = c.centroids.numpy()
    Xn = X.numpy()
    ref = np.array([[np.argmin(((Xn[i, 4 * j:4 * j + 4] - cents[j]) ** 2).sum(1)) for j in range(6)]
                    for i in range(len(Xn))])
    np.testing.assert_array_equal(codes.numpy(), ref)
    dec = c.decode(codes).numpy()
    np.testing.assert_array_equal(dec, np.concatenate([cents[j][ref[:, j]] for j in range(6)], axis=1))
    # faiss's own quantiser with these centroids gives the same codes and reconstructions
    pq = faiss.ProductQuantizer(24, 6, 5)
    faiss.copy_array_to_vector(cents.ravel(), pq.centroids)
    fdec = pq.decode(pq.compute_codes(Xn))
    np.testing.assert_allclose(dec, fdec, atol=1e-6)


def test_pq_scores_on_codes_equal_the_decoded_inner_products():
    X, Q = _clustered(300, 16, 6), _clustered(7, 16, 7)
    c = PQCodec(4, 6).fit(X)
    codes = c.encode(X)
    S = c.scores(Q, codes)
    torch.testing.assert_close(S, Q @ c.decode(codes).T, atol=1e-5, rtol=0)
    loop = torch.tensor([[sum(float(Q[q, 4 * j:4 * j + 4] @ c.centroids[j, codes[n, j]]) for j in range(4))
                          for n in range(20)] for q in range(7)])
    torch.testing.assert_close(S[:, :20], loop, atol=1e-5, rtol=0)


def test_pq_reconstruction_error_falls_with_more_sub_quantisers():
    X = _clustered(600, 32, 8, k=100)
    codecs = [PQCodec(m, 4).fit(X) for m in (1, 2, 4, 8, 16)]
    errs = [float((c.decode(c.encode(X)) - X).square().sum(1).mean()) for c in codecs]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # and k-means does better than chance: below the error of the all-mean reconstruction
    assert errs[0] < float((X - X.mean(0)).square().sum(1).mean())


def test_pq_errors_say_what_to_do(monkeypatch):
    X = _clustered(100, 30, 9)
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        PQCodec(4).fit(X)
    with pytest.raises(ValueError, match="lower nbits to at most 6"):
        PQCodec(5, nbits=8).fit(X)
    with pytest.raises(ValueError, match="nbits must be an integer >= 1 and <= 16"):
        PQCodec(5, nbits=0)
    with pytest.raises(RuntimeError, match="call fit"):
        PQCodec(5).encode(X)
    with pytest.raises(RuntimeError, match="call fit"):
        Float16Codec().encode(X)
    with pytest.raises(ValueError, match="fitted on 30"):
        PQCodec(5, 4).fit(X).encode(X[:, :10])
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        PCACodec(0)
    with pytest.raises(ValueError, match="exceeds the descriptors' 30 dims"):
        PCACodec(31).fit(X)
    # without faiss: a clear message naming the package, and faiss_available() says so
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    assert faiss_available() is False
    with pytest.raises(ImportError, match=r"pip install faiss-cpu"):
        PQCodec(5, 4).fit(X)
    Float16Codec().fit(X)  # the other codecs need nothing else
    PCACodec(4).fit(X)
