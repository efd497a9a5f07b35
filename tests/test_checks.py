"""retrieval_lib.layers.checks: the shared input checks, each error with the message it promises."""
import warnings

import numpy as np
import pytest
import torch

from retrieval_lib.layers import checks


def test_from_numpy_is_zero_copy_and_quiet_on_read_only_arrays():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = checks.from_numpy(a)
    a[0, 0] = 42.0
    assert t[0, 0].item() == 42.0  # a view, not a copy
    ro = np.arange(4.0)
    ro.setflags(write=False)  # e.g. np.load(..., mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(checks.from_numpy(ro), torch.arange(4.0, dtype=torch.float64))
    strided = np.arange(12.0).reshape(3, 4)[:, ::2]  # not contiguous: copied into a contiguous array
    assert torch.equal(checks.from_numpy(strided), torch.tensor([[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]],
                                                                  dtype=torch.float64))


def test_as_tensor():
    t = torch.ones(2, 2)
    assert checks.as_tensor(t, "X") is t
    assert isinstance(checks.as_tensor(np.ones((2, 2)), "X"), torch.Tensor)
    with pytest.raises(TypeError, match=r"knn: Q must be a torch.Tensor or numpy array, got list"):
        checks.as_tensor([[1.0]], "Q", "knn")


def test_check_int():
    assert checks.check_int(3, "L", "rmac") == 3
    assert checks.check_int(np.int64(0), "n", "f", minimum=0) == 0
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"rmac: L must be an integer >= 1, got"):
            checks.check_int(bad, "L", "rmac")


def test_check_not_empty():
    checks.check_not_empty(1, "images", "f", "image")
    with pytest.raises(ValueError, match=r"f: images is empty \(0 images\); pass at least one image"):
        checks.check_not_empty(0, "images", "f", "image")


def test_check_descriptors_accepts_good_matrices():
    for X in (torch.randn(3, 4), torch.randn(1, 1, dtype=torch.float64), torch.randn(2, 3).half()):
        checks.check_descriptors(X, "X", "f")
    checks.check_descriptors(torch.empty(5, 3, device="meta"), "X", "f")  # no values to scan


@pytest.mark.parametrize("X, error, message", [
    (torch.randn(4), ValueError, r"f: X must be 2-D \(N, D\).*shape \(4,\); for a single descriptor use X\[None\]"),
    (torch.randn(2, 3, 4), ValueError, r"must be 2-D"),
    (torch.randn(0, 4), ValueError, r"f: X has 0 descriptor\(s\) \(shape \(0, 4\)\); pass at least one descriptor"),
    (torch.randn(4, 0), ValueError, r"f: X has descriptors of dimension 0"),
    (torch.ones(2, 3, dtype=torch.int64), TypeError, r"f: X must hold floating point descriptors.*X\.float\(\)"),
])
def test_check_descriptors_errors(X, error, message):
    with pytest.raises(error, match=message):
        checks.check_descriptors(X, "X", "f")


def test_check_descriptors_names_the_rows_with_nan_or_inf():
    X = torch.zeros(9, 2)
    for r in (1, 2, 4, 5, 7, 8):
        X[r, r % 2] = float("nan") if r % 3 else float("inf")
    with pytest.raises(ValueError, match=r"f: X contains NaN or inf values: 6 row\(s\) hold NaN or inf "
                                         r"\(rows 1, 2, 4, 5, 7, \.\.\.\); recompute or drop those descriptors"):
        checks.check_descriptors(X, "X", "f")
    checks.check_descriptors(X, "X", "f", finite=False)  # the scan can be skipped by a caller that did it


def test_min_rows_and_as_descriptors():
    with pytest.raises(ValueError, match=r"g: X has 1 descriptor\(s\).*pass at least 2 rows"):
        checks.as_descriptors(np.ones((1, 3)), "X", "g", min_rows=2)
    X = checks.as_descriptors(np.ones((2, 3)), "X", "g", min_rows=2)
    assert isinstance(X, torch.Tensor) and X.shape == (2, 3)


def test_feature_map_eps_and_p_checks():
    checks.check_fmap(torch.rand(1, 2, 3, 3), "gem")
    with pytest.raises(ValueError, match=r"gem: expected a 4-D feature map"):
        checks.check_fmap(torch.rand(2, 3, 3), "gem")
    for bad in (0.0, -1e-6, float("nan"), True):
        with pytest.raises(ValueError, match="gem: eps must be a small positive number"):
            checks.check_eps(bad, "gem")
    checks.check_p(torch.tensor([2.0, 3.0]), 2, "gem")
    with pytest.raises(ValueError, match="gem: p must be a positive finite number"):
        checks.check_p(float("inf"), 2, "gem")


def test_check_fmap_channels_names_the_argument_to_change():
    x = torch.rand(2, 4, 3, 3)
    checks.check_fmap(x, "CGD", 4)
    with pytest.raises(ValueError, match=r"CGD: built for 8 channels but the feature map has 4 \(shape \(2, 4, 3, 3\)\); "
                                         r"build it with in_channels=4"):
        checks.check_fmap(x, "CGD", 8)
    with pytest.raises(ValueError, match=r"build it with channels=4"):  # a layer whose argument has another name
        checks.check_fmap(x, "Layer", 3, "channels")


def test_check_int_with_a_maximum():
    assert checks.check_int(np.int32(16), "nbits", "PQCodec", maximum=16) == 16
    for bad in (0, 17):
        with pytest.raises(ValueError, match=r"PQCodec: nbits must be an integer >= 1 and <= 16, got"):
            checks.check_int(bad, "nbits", "PQCodec", maximum=16)
