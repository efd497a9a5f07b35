"""Tests for retrieval_lib.layers.functional: identities, plain-loop references, hand-worked R-MAC
regions, closed-form GeM gradients, dtype/device following and every documented error."""
import math

import pytest
import torch

from retrieval_lib.layers import functional as F


def _fmap(B=2, C=5, H=6, W=7, dtype=torch.float64, seed=0, low=0.05):
    """Positive random feature map (values in [low, 1 + low))."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g, dtype=dtype) + low


# ----------------------------------------------------------------------------------------
# plain references, written independently of the library
# ----------------------------------------------------------------------------------------
def loop_region_max(x, regions):
    """(B, C, H, W) -> (B, R, C) with Python loops over images, regions, channels."""
    B, C = x.shape[:2]
    out = torch.empty(B, len(regions), C, dtype=x.dtype)
    for b in range(B):
        for r, (x0, y0, w, h) in enumerate(regions):
            for c in range(C):
                best = -math.inf
                for i in range(y0, y0 + h):
                    for j in range(x0, x0 + w):
                        best = max(best, x[b, c, i, j].item())
                out[b, r, c] = best
    return out


def loop_rmac(x, regions, eps=1e-6, include_global=True):
    """R-MAC with a loop over images and regions, vectors as Python lists."""
    B, C, H, W = x.shape
    out = torch.empty(B, C, dtype=x.dtype)
    boxes = list(regions) + ([(0, 0, W, H)] if include_global else [])
    for b in range(B):
        acc = [0.0] * C
        for x0, y0, w, h in boxes:
            v = [x[b, c, y0:y0 + h, x0:x0 + w].max().item() for c in range(C)]
            n = math.sqrt(sum(t * t for t in v)) + eps
            acc = [a + t / n for a, t in zip(acc, v)]
        n = math.sqrt(sum(t * t for t in acc)) + eps
        out[b] = torch.tensor([a / n for a in acc], dtype=x.dtype)
    return out


# ----------------------------------------------------------------------------------------
# l2n, mac, spoc
# ----------------------------------------------------------------------------------------
def test_l2n_unit_norm_and_zero_vector():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    y = F.l2n(x, eps=0.0 + 1e-12)
    assert torch.allclose(y[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert torch.equal(y[1], torch.zeros(2, dtype=torch.float64))  # no NaN
    assert F.l2n(torch.tensor([3.0, 4.0]), eps=1.0).tolist() == pytest.approx([0.5, 4 / 6])


def test_mac_spoc_match_loops():
    x = _fmap(B=2, C=3, H=4, W=5)
    for b in range(2):
        for c in range(3):
            vals = [x[b, c, i, j].item() for i in range(4) for j in range(5)]
            assert F.mac(x)[b, c].item() == max(vals)
            assert F.spoc(x)[b, c].item() == pytest.approx(sum(vals) / 20, rel=1e-12)


def test_spoc_center_prior_matches_hand_gaussian():
    H, W = 5, 8
    x = _fmap(B=2, C=3, H=H, W=W)
    sigma = min(H, W) / 2 / 3  # a third of the centre-to-nearest-border distance (2.5)
    wts = [[math.exp(-((i + 0.5 - H / 2) ** 2 + (j + 0.5 - W / 2) ** 2) / (2 * sigma**2))
            for j in range(W)] for i in range(H)]
    total = sum(sum(row) for row in wts)
    got = F.spoc(x, center_prior=True)
    for b in range(2):
        for c in range(3):
            ref = sum(wts[i][j] * x[b, c, i, j].item() for i in range(H) for j in range(W)) / total
            assert got[b, c].item() == pytest.approx(ref, rel=1e-12)
    # the centre counts more than the corner: a map that is 1 only at the centre pixels
    # gives more than one that is 1 only in a corner
    centre = torch.zeros(1, 1, H, W, dtype=torch.float64)
    centre[..., 2, 3:5] = 1
    corner = torch.zeros(1, 1, H, W, dtype=torch.float64)
    corner[..., 0, 0:2] = 1
    assert F.spoc(centre, True).item() > 10 * F.spoc(corner, True).item()
    # constant map: weighted mean of a constant is the constant
    assert torch.allclose(F.spoc(torch.full((1, 2, H, W), 3.0), True), torch.full((1, 2), 3.0))


# ----------------------------------------------------------------------------------------
# GeM
# ----------------------------------------------------------------------------------------
def test_gem_p1_equals_spoc():
    x = _fmap()
    assert torch.allclose(F.gem(x, p=1.0), F.spoc(x), rtol=1e-12, atol=0)


def test_gem_large_p_approaches_mac():
    x = _fmap(H=5, W=7)
    m = F.mac(x)
    N = 5 * 7
    errs = []
    for p in (10.0, 50.0, 200.0):
        g = F.gem(x, p=p)
        # mean^(1/p) is between N^(-1/p) * max and max
        assert torch.all(g <= m * (1 + 1e-12)) and torch.all(g >= m * N ** (-1 / p) * (1 - 1e-12))
        errs.append(((m - g) / m).max().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.02


def test_gem_p_tensor_shared_and_per_channel_match_loop():
    x = _fmap(B=2, C=3, H=3, W=4)
    assert torch.allclose(F.gem(x, torch.tensor([2.5], dtype=torch.float64)), F.gem(x, 2.5))
    assert torch.allclose(F.gem(x, torch.tensor(2.5, dtype=torch.float64)), F.gem(x, 2.5))
    ps = [1.0, 2.0, 7.5]
    got = F.gem(x, torch.tensor(ps, dtype=torch.float64))
    for b in range(2):
        for c, p in enumerate(ps):
            vals = [x[b, c, i, j].item() for i in range(3) for j in range(4)]
            ref = (sum(v**p for v in vals) / len(vals)) ** (1 / p)
            assert got[b, c].item() == pytest.approx(ref, rel=1e-12)


def test_gem_clamps_at_eps():
    x = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 0] = 1.0
    eps = 1e-3
    got = F.gem(x, p=2.0, eps=eps)
    assert got[0, 0].item() == pytest.approx(((1 + 3 * eps**2) / 4) ** 0.5, rel=1e-12)
    assert got[0, 1].item() == pytest.approx(eps, rel=1e-12)


def test_gem_gradients_match_closed_form():
    # Radenović et al. TPAMI 2018: with m_k = mean_i x_ik^p and f_k = m_k^(1/p),
    #   df_k/dx_ik = (1/N) f_k^(1-p) x_ik^(p-1)
    #   df_k/dp    = f_k * ( -ln(m_k)/p^2 + sum_i x_ik^p ln x_ik / (p sum_i x_ik^p) )
    x = _fmap(B=2, C=3, H=4, W=5).requires_grad_(True)
    p = torch.tensor([2.7], dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    f = F.gem(x, p)
    (f * g).sum().backward()
    with torch.no_grad():
        pv, N = p.item(), 20
        xp = x**pv
        m = xp.mean(dim=(-2, -1))
        fk = m ** (1 / pv)
        dfdx = (1 / N) * fk[..., None, None] ** (1 - pv) * x ** (pv - 1)
        dfdp = fk * (-torch.log(m) / pv**2 + (xp * torch.log(x)).sum((-2, -1)) / (pv * xp.sum((-2, -1))))
    assert torch.allclose(f, fk)
    assert torch.allclose(x.grad, g[..., None, None] * dfdx, rtol=1e-10, atol=1e-12)
    assert p.grad.item() == pytest.approx((g * dfdp).sum().item(), rel=1e-10)


def test_gem_per_channel_p_gradient_matches_closed_form():
    x = _fmap(B=2, C=3, H=3, W=3)
    p = torch.tensor([1.5, 3.0, 4.5], dtype=torch.float64, requires_grad=True)
    F.gem(x, p).sum().backward()
    xp = x ** p.detach()[:, None, None]
    m = xp.mean(dim=(-2, -1))
    fk = m ** (1 / p.detach())
    pd = p.detach()
    dfdp = fk * (-torch.log(m) / pd**2 + (xp * torch.log(x)).sum((-2, -1)) / (pd * xp.sum((-2, -1))))
    assert torch.allclose(p.grad, dfdp.sum(0), rtol=1e-10)


# ----------------------------------------------------------------------------------------
# wGeM
# ----------------------------------------------------------------------------------------
def test_wgem_uniform_weights_equal_gem():
    x = _fmap(H=4, W=6)
    w = torch.full((2, 1, 4, 6), 1 / 24, dtype=torch.float64)
    for p in (1.0, 3.0, torch.tensor([2.0], dtype=torch.float64)):
        assert torch.allclose(F.wgem(x, w, p=p), F.gem(x, p=p), rtol=1e-12)
    # one shared mask (1, 1, H, W) broadcasts over the batch
    assert torch.allclose(F.wgem(x, w[:1]), F.gem(x), rtol=1e-12)


def test_wgem_matches_loop_and_one_hot():
    x = _fmap(B=2, C=3, H=3, W=4)
    logits = torch.randn(2, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.softmax(logits.flatten(2), -1).view(2, 1, 3, 4)
    p = 2.5
    got = F.wgem(x, w, p=p)
    for b in range(2):
        for c in range(3):
            s = sum(w[b, 0, i, j].item() * x[b, c, i, j].item() ** p for i in range(3) for j in range(4))
            assert got[b, c].item() == pytest.approx(s ** (1 / p), rel=1e-12)
    one_hot = torch.zeros(2, 1, 3, 4, dtype=torch.float64)
    one_hot[0, 0, 1, 2] = 1
    one_hot[1, 0, 2, 0] = 1
    got = F.wgem(x, one_hot, p=3.0)
    assert torch.allclose(got[0], x[0, :, 1, 2]) and torch.allclose(got[1], x[1, :, 2, 0])


def test_gem_and_wgem_share_one_power_mean():
    """GeM is wGeM with weights 1/(HW); both go through the one power mean, per-channel p too."""
    x = _fmap(B=2, C=3, H=3, W=4)
    p = torch.tensor([1.5, 3.0, 7.0], dtype=torch.float64)
    uniform = torch.full((1, 1, 3, 4), 1 / 12, dtype=torch.float64)
    torch.testing.assert_close(F.wgem(x, uniform, p=p), F.gem(x, p=p), rtol=1e-12, atol=0)
    for c in range(3):  # per-channel exponent against the plain formula
        ref = x[:, c].pow(p[c]).mean(dim=(-2, -1)).pow(1 / p[c])
        torch.testing.assert_close(F.gem(x, p=p)[:, c], ref, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------
# multi-scale power mean
# ----------------------------------------------------------------------------------------
def loop_multiscale(descs, p):
    """(mean_s f_s^p)^(1/p), then L2, one image and one dimension at a time in plain Python."""
    S, N, D = len(descs), descs[0].shape[0], descs[0].shape[1]
    out = []
    for n in range(N):
        ps = [p[d] for d in range(D)] if isinstance(p, list) else [p] * D
        v = [(sum(descs[s][n, d].item() ** ps[d] for s in range(S)) / S) ** (1 / ps[d]) for d in range(D)]
        norm = math.sqrt(sum(t * t for t in v)) + 1e-6
        out.append([t / norm for t in v])
    return torch.tensor(out, dtype=torch.float64)


def _unit_rows(N=4, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.l2n(torch.rand(N, D, generator=g, dtype=torch.float64) + 0.01)


@pytest.mark.parametrize("p", [1.0, 3.0, 0.5, [1.0, 2.0, 3.0, 4.0, 8.0]])
def test_multiscale_mean_matches_loop(p):
    descs = [_unit_rows(seed=s) for s in range(3)]
    pt = torch.tensor(p, dtype=torch.float64) if isinstance(p, list) else p
    got = F.multiscale_mean(descs, pt)
    torch.testing.assert_close(got, loop_multiscale(descs, p), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(F.multiscale_mean(torch.stack(descs), pt), got, rtol=0, atol=0)  # (S, N, D) too


def test_multiscale_mean_identities():
    f = _unit_rows()
    for p in (1.0, 3.0):  # one scale, or the same descriptor at every scale: unchanged (up to l2n's eps)
        torch.testing.assert_close(F.multiscale_mean([f], p), f, rtol=1e-5, atol=0)
        torch.testing.assert_close(F.multiscale_mean([f, f, f], p), f, rtol=1e-5, atol=0)
    g = _unit_rows(seed=1)
    torch.testing.assert_close(F.multiscale_mean([f, g], 1.0), F.l2n((f + g) / 2))  # p = 1: plain mean
    # a shared p given as a one-element tensor is the float p
    torch.testing.assert_close(F.multiscale_mean([f, g], torch.tensor([3.0])), F.multiscale_mean([f, g], 3.0))


def test_multiscale_mean_bad_inputs():
    f = _unit_rows()
    with pytest.raises(ValueError, match="no descriptors given"):
        F.multiscale_mean([], 3.0)
    with pytest.raises(ValueError, match="one shape"):
        F.multiscale_mean([f, f[:2]], 3.0)
    with pytest.raises(ValueError, match=r"\(S, N, D\)"):
        F.multiscale_mean(f, 3.0)
    with pytest.raises(ValueError, match="positive finite"):
        F.multiscale_mean([f, f], 0.0)
    with pytest.raises(ValueError, match=r"one per dimension \(5,\)"):
        F.multiscale_mean([f, f], torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        F.multiscale_mean([f, -f], 3.0)
    F.multiscale_mean([f, -f + 1e-3], 1.0)  # p = 1 takes any sign


# ----------------------------------------------------------------------------------------
# R-MAC regions: hand-worked cases
# ----------------------------------------------------------------------------------------
def _grid(wl, xs, ys):
    """Regions of one level in the library's order: rows (y) outer, columns (x) inner."""
    return [(x, y, wl, wl) for y in ys for x in xs]


def test_rmac_regions_square_10x10():
    # H = W = 10: w = 10, no extra regions.
    # l=1: wl = floor(20/2) = 10, 1 x 1 region at 0.
    # l=2: wl = floor(20/3) = 6, 2 per side, b = (10-6)/1 = 4 -> starts 0, 4.
    # l=3: wl = floor(20/4) = 5, 3 per side, b = (10-5)/2 = 2.5 -> floor(0, 2.5, 5) = 0, 2, 5.
    expected = _grid(10, [0], [0]) + _grid(6, [0, 4], [0, 4]) + _grid(5, [0, 2, 5], [0, 2, 5])
    assert F.rmac_regions(10, 10, L=3).tolist() == [list(r) for r in expected]
    assert len(expected) == 1 + 4 + 9


def test_rmac_regions_4_to_3_landscape_24x32_has_20_regions():
    # H=24, W=32: w = 24, long side W, steps s: b = 8/(s-1); |(24^2 - 24 b)/24^2 - 0.4|:
    # s=2: b=8 -> |0.667-0.4| = 0.267; s=3: b=4 -> |0.833-0.4| = 0.433; larger s are worse,
    # so idx = 0 and the width gets 1 extra region per level.
    # l=1: wl=24; x: 2 regions, b=(32-24)/1=8 -> 0, 8; y: 1 region -> 0.
    # l=2: wl=16; x: 3, b=(32-16)/2=8 -> 0, 8, 16; y: 2, b=(24-16)/1=8 -> 0, 8.
    # l=3: wl=12; x: 4, b=(32-12)/3=6.67 -> floor(0, 6.67, 13.33, 20) = 0, 6, 13, 20;
    #             y: 3, b=(24-12)/2=6 -> 0, 6, 12.
    expected = (_grid(24, [0, 8], [0]) + _grid(16, [0, 8, 16], [0, 8])
                + _grid(12, [0, 6, 13, 20], [0, 6, 12]))
    got = F.rmac_regions(24, 32, L=3)
    assert got.dtype == torch.int64 and got.shape == (20, 4)  # + 1 global = 21 (DARAC setting)
    assert got.tolist() == [list(r) for r in expected]


def test_rmac_regions_4_to_3_portrait_32x24():
    # Transpose of the case above: the extra region goes to the height (Hd = 1).
    expected = (_grid(24, [0], [0, 8]) + _grid(16, [0, 8], [0, 8, 16])
                + _grid(12, [0, 6, 12], [0, 6, 13, 20]))
    assert F.rmac_regions(32, 24, L=3).tolist() == [list(r) for r in expected]


def test_rmac_regions_12x16_and_16x12():
    # H=12, W=16: w=12, b = 4/(s-1): s=2 -> |1 - 4/12 - 0.4| = 0.267 (best), s=3 -> 0.433.
    # l=1: wl=12; x: 2, b=4 -> 0, 4; y: 0.
    # l=2: wl=8;  x: 3, b=(16-8)/2=4 -> 0, 4, 8; y: 2, b=(12-8)/1=4 -> 0, 4.
    # l=3: wl=6;  x: 4, b=(16-6)/3=3.33 -> floor(0, 3.33, 6.67, 10) = 0, 3, 6, 10;
    #             y: 3, b=(12-6)/2=3 -> 0, 3, 6.
    land = _grid(12, [0, 4], [0]) + _grid(8, [0, 4, 8], [0, 4]) + _grid(6, [0, 3, 6, 10], [0, 3, 6])
    assert F.rmac_regions(12, 16).tolist() == [list(r) for r in land]
    port = _grid(12, [0], [0, 4]) + _grid(8, [0, 4], [0, 4, 8]) + _grid(6, [0, 3, 6], [0, 3, 6, 10])
    assert F.rmac_regions(16, 12).tolist() == [list(r) for r in port]
    assert len(land) == len(port) == 20


def test_rmac_regions_wide_map_gets_three_extra():
    # H=10, W=30: w=10, b = 20/(s-1): s=2 b=20 -> |1-2-0.4| = 1.4; s=3 b=10 -> 0.4;
    # s=4 b=6.67 -> |0.333-0.4| = 0.067 (best); s=5 b=5 -> 0.1; s=6 -> 0.2; s=7 -> 0.267.
    # idx = 2, so the width gets 3 extra regions per level.
    # l=1: wl=10; x: 4, b=20/3=6.67 -> 0, 6, 13, 20; y: 0.
    # l=2: wl=6;  x: 5, b=24/4=6 -> 0, 6, 12, 18, 24; y: 2, b=4 -> 0, 4.
    # l=3: wl=5;  x: 6, b=25/5=5 -> 0, 5, 10, 15, 20, 25; y: 3, b=2.5 -> 0, 2, 5.
    expected = (_grid(10, [0, 6, 13, 20], [0]) + _grid(6, [0, 6, 12, 18, 24], [0, 4])
                + _grid(5, [0, 5, 10, 15, 20, 25], [0, 2, 5]))
    assert F.rmac_regions(10, 30).tolist() == [list(r) for r in expected]
    assert len(expected) == 4 + 10 + 18


def test_rmac_regions_tiny_maps():
    # 1x1: l=1 wl=1 -> one region; l=2,3: wl = floor(2/3) = floor(2/4) = 0 -> skipped.
    assert F.rmac_regions(1, 1).tolist() == [[0, 0, 1, 1]]
    # 2x3: w=2, b = 1/(s-1): s=2 -> |(4-2)/4 - 0.4| = 0.1 (best), s=3 -> 0.35; extra width 1.
    # l=1: wl=2; x: 2, b=1 -> 0, 1; y: 0.
    # l=2: wl=floor(4/3)=1, wl2=floor(0.5-1)=-1; x: 3, b=1 -> 0, 1, 2; y: 2, b=1 -> 0, 1.
    # l=3: wl=1, wl2=-1; x: 4, b=2/3 -> floor(-1+0)+1=0, floor(-1+0.67)+1=0,
    #      floor(-1+1.33)+1=1, floor(-1+2)+1=2; y: 3, b=0.5 -> 0, 0, 1. (duplicates are kept)
    expected = _grid(2, [0, 1], [0]) + _grid(1, [0, 1, 2], [0, 1]) + _grid(1, [0, 0, 1, 2], [0, 0, 1])
    assert F.rmac_regions(2, 3).tolist() == [list(r) for r in expected]
    assert len(expected) == 20


def test_rmac_regions_levels_and_tie_break():
    # L=1 is the first level only.
    assert F.rmac_regions(24, 32, L=1).tolist() == [[0, 0, 24, 24], [8, 0, 24, 24]]
    # H=10, W=18: s=2 (b=8) and s=3 (b=4) both miss 0.4 by exactly 0.2. Like cirtorch's
    # float32 arithmetic we take the first (s=2): 1 extra region, 2 + 6 + 12 = 20 regions.
    # (MATLAB's float64 arithmetic picks s=3 here: 3 + 8 + 15 = 26.)
    got = F.rmac_regions(10, 18, L=3)
    assert len(got) == 20
    assert got[:2].tolist() == [[0, 0, 10, 10], [8, 0, 10, 10]]


def test_rmac_regions_invariants_many_sizes():
    for H in range(1, 40, 3):
        for W in range(1, 40, 4):
            regs = F.rmac_regions(H, W, L=3)
            x, y, w, h = regs.unbind(1)
            assert torch.all(w == h) and torch.all(w >= 1)
            assert torch.all(x >= 0) and torch.all(y >= 0)
            assert torch.all(x + w <= W) and torch.all(y + h <= H)
            assert w[0].item() == min(H, W)  # level 1 uses the short side
            # the regions of level 1 touch both ends of the long side
            first = regs[w == min(H, W)]
            assert (first[:, 0] + first[:, 2]).max().item() == W
            assert (first[:, 1] + first[:, 3]).max().item() == H


# ----------------------------------------------------------------------------------------
# region_mac and rmac: vectorised against loops
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (3, 4, 6, 9), (2, 3, 11, 5), (1, 2, 1, 1), (2, 2, 2, 3)])
def test_region_mac_equals_loop(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    regions = F.rmac_regions(shape[2], shape[3], L=3).tolist()
    assert torch.equal(F.region_mac(x, regions), loop_region_max(x, regions))


def test_region_mac_arbitrary_regions():
    x = torch.randn(2, 3, 8, 10, dtype=torch.float32, generator=torch.Generator().manual_seed(4))
    regions = [(0, 0, 10, 8), (3, 1, 4, 2), (9, 7, 1, 1), (2, 5, 7, 3), (3, 1, 4, 2), (0, 4, 1, 4)]
    ref = loop_region_max(x, regions)
    assert torch.equal(F.region_mac(x, regions), ref)
    assert torch.equal(F.region_mac(x, torch.tensor(regions, dtype=torch.int32)), ref)
    assert F.region_mac(x, []).shape == (2, 0, 3)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 5, 6, 8), (2, 4, 9, 6), (1, 3, 12, 16), (2, 3, 1, 1)])
@pytest.mark.parametrize("include_global", [True, False])
def test_rmac_equals_loop(shape, include_global):
    x = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    regions = F.rmac_regions(shape[2], shape[3], L=3).tolist()
    got = F.rmac(x, L=3, include_global=include_global)
    assert torch.allclose(got, loop_rmac(x, regions, include_global=include_global), rtol=1e-12)
    assert torch.allclose(got.norm(dim=1), torch.ones(shape[0], dtype=torch.float64))


def test_rmac_L_changes_regions():
    x = torch.rand(2, 3, 10, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for L in (1, 2, 4):
        ref = loop_rmac(x, F.rmac_regions(10, 13, L=L).tolist())
        assert torch.allclose(F.rmac(x, L=L), ref, rtol=1e-12)


def test_rmac_and_region_mac_gradients_reach_the_maxima():
    x = torch.rand(2, 3, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x.requires_grad_(True)
    F.region_mac(x, [(0, 0, 3, 3)]).sum().backward()
    expect = torch.zeros_like(x)
    win = x.detach()[:, :, :3, :3].flatten(2)
    idx = win.argmax(-1)  # random values: the max is unique
    for b in range(2):
        for c in range(3):
            i, j = divmod(idx[b, c].item(), 3)
            expect[b, c, i, j] = 1
    assert torch.equal(x.grad, expect)
    x.grad = None
    F.rmac(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------
# dtype and device following
# ----------------------------------------------------------------------------------------
_FNS = {
    "mac": F.mac,
    "spoc": F.spoc,
    "spoc_center": lambda x: F.spoc(x, center_prior=True),
    "gem": F.gem,
    "gem_tensor_p": lambda x: F.gem(x, torch.tensor([3.0])),
    "wgem": lambda x: F.wgem(x, torch.full((x.shape[0], 1, *x.shape[-2:]), 1 / x[0, 0].numel())),
    "rmac": F.rmac,
    "region_mac": lambda x: F.region_mac(x, F.rmac_regions(*x.shape[-2:])),
}


@pytest.mark.parametrize("name", list(_FNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_dtype(name, dtype):
    x = _fmap(B=2, C=3, H=5, W=6, dtype=dtype)
    out = _FNS[name](x)
    assert out.dtype == dtype and out.device == x.device
    assert out.shape[0] == 2 and out.shape[-1] == 3


@pytest.mark.parametrize("name", [n for n in _FNS if n != "gem_tensor_p"])
def test_output_follows_device(name):
    # The "meta" device has no data: any tensor silently created on the CPU would fail.
    x = torch.empty(2, 3, 5, 6, device="meta")
    fn = _FNS[name]
    if name == "wgem":
        out = F.wgem(x, torch.empty(2, 1, 5, 6, device="meta"))
    else:
        out = fn(x)
    assert out.device.type == "meta"


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [F.mac, F.spoc, F.gem, F.rmac, lambda x: F.region_mac(x, [(0, 0, 1, 1)])])
def test_bad_feature_maps(fn):
    with pytest.raises(ValueError, match=r"4-D feature map \(B, C, H, W\), got shape \(3, 4, 5\)"):
        fn(torch.rand(3, 4, 5))
    with pytest.raises(ValueError, match="at least 1"):
        fn(torch.rand(2, 3, 0, 4))
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(1, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([[1.0]])


def test_gem_bad_p():
    x = _fmap(C=3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            F.gem(x, p=bad)
    with pytest.raises(ValueError, match="every element of p"):
        F.gem(x, p=torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(1,\).*or \(3,\)"):
        F.gem(x, p=torch.tensor([2.0, 3.0]))
    with pytest.raises(TypeError, match="float or a tensor"):
        F.gem(x, p="3")
    with pytest.raises(TypeError, match="floating point"):
        F.gem(x, p=torch.tensor([3]))
    with pytest.raises(ValueError, match="eps"):
        F.gem(x, eps=0.0)
    with pytest.raises(ValueError, match="positive finite"):
        F.wgem(x, torch.full((2, 1, 6, 7), 1 / 42), p=-2.0)


def test_wgem_bad_weights():
    x = _fmap(B=2, H=4, W=5)
    for bad in (torch.ones(2, 4, 5), torch.ones(2, 2, 4, 5), torch.ones(2, 1, 5, 4), torch.ones(3, 1, 4, 5)):
        with pytest.raises(ValueError, match=r"weights must have shape \(B, 1, H, W\) = \(2, 1, 4, 5\)"):
            F.wgem(x, bad)
    with pytest.raises(TypeError, match="weights must be a tensor"):
        F.wgem(x, 0.05)


def test_rmac_regions_and_rmac_bad_arguments():
    for args in ((0, 5, 3), (5, 0, 3), (5, 5, 0), (5.0, 5, 3), (5, 5, True)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            F.rmac_regions(*args)
    x = _fmap()
    with pytest.raises(ValueError, match="L must be an integer"):
        F.rmac(x, L=0)
    with pytest.raises(ValueError, match="eps"):
        F.rmac(x, eps=-1.0)


def test_region_mac_bad_regions():
    x = _fmap(H=6, W=7)
    with pytest.raises(ValueError, match=r"does not fit in the 6 x 7"):
        F.region_mac(x, [(0, 0, 3, 3), (5, 0, 3, 3)])  # x + w = 8 > 7
    with pytest.raises(ValueError, match="does not fit"):
        F.region_mac(x, [(0, 0, 0, 2)])  # empty region
    with pytest.raises(ValueError, match="does not fit"):
        F.region_mac(x, [(-1, 0, 2, 2)])
    with pytest.raises(ValueError, match=r"shape \(R, 4\)"):
        F.region_mac(x, torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(R, 4\)"):
        F.region_mac(x, [(0, 0, 2)])
    with pytest.raises(TypeError, match="integers"):
        F.region_mac(x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="integers"):
        F.region_mac(x, [(0.0, 0, 2, 2)])


def test_l2n_bad_input():
    with pytest.raises(ValueError, match="at least one dimension"):
        F.l2n(torch.tensor(3.0))
