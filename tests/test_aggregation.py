"""Learned regional aggregation (layers/aggregation.py): Gordo's trainable R-MAC and DARAC.

Checked against plain references: a loop over regions for the 42 vectors, R-MAC for the
max-only DARAC and the identity-initialised trainable R-MAC, the plain sum for the untrained
DARAC, a hand-built PCA whitening, and the layout rule on landscape, portrait and square maps.
"""
import numpy as np
import pytest
import torch

from retrieval_lib.models.retrieval_net import RetrievalNet
from retrieval_lib.layers.aggregation import (DARAC, N_DARAC_REGIONS, TrainableRMAC, darac_regions, darac_slots,
                                              darac_vectors)
from retrieval_lib.layers.functional import l2n, rmac, rmac_regions

# landscape 4:3 .. 16:9 maps, in cells (H, W)
LANDSCAPE = [(3, 4), (6, 8), (9, 12), (12, 16), (9, 16), (18, 32), (24, 32), (10, 16), (12, 19), (7, 10), (5, 7)]


def _maps(B=3, C=5, H=6, W=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g, dtype=dtype) * 3  # non-negative, like ReLU features


def _plain_vectors(x):
    """The 42 vectors by a loop over images and regions."""
    B = x.shape[0]
    regions = darac_regions(*x.shape[-2:]).tolist()
    out = torch.zeros(B, 42, x.shape[1], dtype=x.dtype)
    for b in range(B):
        for r, (x0, y0, w, h) in enumerate(regions):
            patch = x[b, :, y0:y0 + h, x0:x0 + w]
            avg = patch.mean(dim=(1, 2))
            mx = patch.amax(dim=(1, 2))
            out[b, r] = avg / (avg.norm() + 1e-6)
            out[b, 21 + r] = mx / (mx.norm() + 1e-6)
    return out


# ---------------------------------------------------------------- the layout
@pytest.mark.parametrize("hw", LANDSCAPE)
def test_layout_is_rmac_plus_whole_map_on_landscape_maps(hw):
    H, W = hw
    regions = darac_regions(H, W)
    assert regions.shape == (N_DARAC_REGIONS, 4)
    assert regions[0].tolist() == [0, 0, W, H]
    assert torch.equal(regions[1:], rmac_regions(H, W, 3))


@pytest.mark.parametrize("hw", LANDSCAPE)
def test_portrait_maps_use_the_transposed_landscape_layout(hw):
    H, W = hw
    portrait = darac_regions(W, H)  # a W x H (tall) map
    transposed = darac_regions(H, W)[:, [1, 0, 3, 2]]  # (x, y, w, h) -> (y, x, h, w)
    assert torch.equal(portrait, transposed)
    # R-MAC's grid is symmetric too: the same squares, listed in the landscape slots' order
    assert sorted(map(tuple, portrait[1:].tolist())) == sorted(map(tuple, rmac_regions(W, H, 3).tolist()))


@pytest.mark.parametrize("hw", [(8, 8), (16, 32), (12, 30), (1, 1), (1, 5), (2, 3), (5, 5)])
def test_other_shapes_keep_21_slots_inside_the_map(hw):
    H, W = hw
    regions = darac_regions(H, W)
    assert regions.shape == (21, 4)
    x0, y0, w, h = regions.T
    assert bool(((x0 >= 0) & (y0 >= 0) & (w >= 1) & (h >= 1) & (x0 + w <= W) & (y0 + h <= H)).all())
    # levels: 1 + 2 + 6 + 12 squares, level l of side max(1, floor(2 min / (l + 1)))
    sides = [max(1, 2 * min(H, W) // (l + 1)) for l in (1, 2, 3)]
    assert regions[1:3, 2].tolist() == [sides[0]] * 2
    assert regions[3:9, 2].tolist() == [sides[1]] * 6
    assert regions[9:, 2].tolist() == [sides[2]] * 12


def test_layout_is_rmac_exactly_where_rmac_gives_20_regions():
    for H in range(1, 25):
        for W in range(1, 25):
            ours = sorted(map(tuple, darac_regions(H, W)[1:].tolist()))
            theirs = rmac_regions(H, W, 3)
            assert (ours == sorted(map(tuple, theirs.tolist()))) == (theirs.shape[0] == 20), (H, W)
            if theirs.shape[0] == 20:
                assert H != W and max(H, W) / min(H, W) <= 1.8


def test_square_map_differs_from_rmac_as_documented():
    # R-MAC gives 14 regions on a square map (1 + 4 + 9); DARAC keeps 20 squares, the two
    # level-1 squares both the whole map
    assert rmac_regions(8, 8, 3).shape[0] == 14
    r = darac_regions(8, 8)
    assert r[1].tolist() == r[2].tolist() == [0, 0, 8, 8]
    assert rmac_regions(16, 32, 3).shape[0] == 26


def test_slot_names():
    names = darac_slots()
    assert len(names) == 21 and names[0] == "global" and names[1] == "L1 (0,0)" and names[-1] == "L3 (2,3)"


# ---------------------------------------------------------------- the 42 vectors
@pytest.mark.parametrize("hw", [(6, 8), (8, 6), (5, 5), (9, 16), (1, 3)])
def test_vectors_equal_a_plain_loop(hw):
    x = _maps(H=hw[0], W=hw[1])
    V = darac_vectors(x)
    assert V.shape == (3, 42, 5)
    torch.testing.assert_close(V, _plain_vectors(x), rtol=0, atol=1e-12)


def test_vectors_reject_bad_maps():
    with pytest.raises(ValueError, match="4-D feature map"):
        darac_vectors(torch.rand(5, 6, 8))
    with pytest.raises(TypeError, match="floating-point"):
        darac_vectors(torch.ones(1, 2, 3, 4, dtype=torch.int64))


# ---------------------------------------------------------------- DARAC
def test_darac_shapes_and_unit_norm():
    x = _maps(B=4, C=7, dtype=torch.float32)
    f = DARAC()(x)
    assert f.shape == (4, 7)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(6, 8), (8, 6), (5, 5), (12, 16)])
def test_untrained_darac_is_the_normalised_plain_sum(hw):
    x = _maps(H=hw[0], W=hw[1])
    layer = DARAC(kernels=16).double()
    plain = _plain_vectors(x).sum(dim=1)
    expected = plain / plain.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    # the weights are float32 numbers summing to 1 over the kernels, up to float32 rounding
    torch.testing.assert_close(layer.vector_weights(), torch.ones(42, dtype=torch.float64), rtol=0, atol=1e-6)


def test_untrained_kernels_differ():
    layer = DARAC(kernels=16)
    assert float(layer.weight.detach().std(dim=0).min()) > 0.01  # symmetry broken, so the kernels can learn apart
    assert float(layer.weight.detach().min()) > 0  # positive: the ReLU passes non-negative vectors


@pytest.mark.parametrize("hw", LANDSCAPE + [(w, h) for h, w in LANDSCAPE])
def test_max_only_darac_reproduces_rmac_with_the_whole_map(hw):
    x = _maps(C=6, H=hw[0], W=hw[1], seed=1)
    layer = DARAC().double().set_vector_weights([0.0] * 21 + [1.0] * 21)
    torch.testing.assert_close(layer(x), rmac(x, L=3, include_global=True), rtol=0, atol=1e-6)


def test_max_only_darac_is_not_rmac_on_a_square_map():
    x = _maps(C=6, H=8, W=8, seed=1)
    layer = DARAC().double().set_vector_weights([0.0] * 21 + [1.0] * 21)
    assert float((layer(x).detach() - rmac(x, L=3)).abs().max()) > 1e-4  # other grid, as documented


def test_set_vector_weights_rejects_bad_weights():
    with pytest.raises(ValueError, match="42 finite non-negative"):
        DARAC().set_vector_weights([1.0] * 21)
    with pytest.raises(ValueError, match="negative"):
        DARAC().set_vector_weights([-1.0] + [1.0] * 41)


def test_gradients_reach_every_darac_parameter():
    x = _maps(C=6, dtype=torch.float32)
    layer = DARAC(kernels=4)
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    (layer(x) * g).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().min()) > 0, f"{name}: some entries get no gradient"


def test_darac_gradients_match_finite_differences():
    x = _maps(B=2, C=4, H=5, W=7, seed=3)
    layer = DARAC(kernels=3, seed=2).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([-0.5, 0.3, 0.0], dtype=torch.float64))  # let some ReLUs cut
    g = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w, a, c: _with(layer, w, a, c, x, g),
                                    (layer.weight.detach().clone().requires_grad_(),
                                     layer.bias.detach().clone().requires_grad_(),
                                     layer.combine.detach().clone().requires_grad_()))


def _with(layer, w, a, c, x, g):
    V = darac_vectors(x)
    Z = torch.einsum("kj,bjc->bkc", w, V) + a[None, :, None]
    return (l2n(torch.einsum("k,bkc->bc", c, torch.relu(Z)), layer.eps) * g).sum()


def test_contributions_sum_to_one_and_match_the_plain_sum_untrained():
    x = _maps(C=6)
    layer = DARAC(kernels=5).double()
    shares = layer.contributions(x)
    assert shares.shape == (3, 43)
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-10)
    V = _plain_vectors(x)
    s = V.sum(dim=1)
    expected = (V * s[:, None]).sum(dim=2) / (s * s).sum(dim=1, keepdim=True)
    torch.testing.assert_close(shares[:, :42], expected, rtol=0, atol=1e-6)
    assert float(shares[:, 42].abs().max()) == 0.0  # no bias yet


def test_contributions_sum_to_one_when_relus_cut():
    x = _maps(C=6)
    layer = DARAC(kernels=5).double()
    with torch.no_grad():
        layer.weight.add_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(4),
                                      dtype=torch.float64))
        layer.bias.copy_(torch.linspace(-2, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(layer.contributions(x).sum(dim=1), torch.ones(3, dtype=torch.float64),
                               rtol=0, atol=1e-10)


def test_darac_as_retrievalnet_pooling():
    net = RetrievalNet(DARAC())
    maps = [torch.rand(6, 4, 5), torch.rand(6, 5, 4), torch.rand(6, 4, 5)]
    out = net(maps)
    assert out.shape == (3, 6)
    torch.testing.assert_close(out[0], l2n(DARAC()(maps[0][None]))[0], rtol=0, atol=1e-5)
    assert DARAC.multiscale_p == 1.0


def test_darac_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernels"):
        DARAC(kernels=0)
    with pytest.raises(ValueError, match="eps"):
        DARAC(eps=0)


# ---------------------------------------------------------------- Gordo's trainable R-MAC
@pytest.mark.parametrize("hw,L,glob", [((6, 8), 3, True), ((8, 6), 2, True), ((5, 5), 3, False), ((9, 16), 1, True)])
def test_identity_trainable_rmac_is_rmac(hw, L, glob):
    x = _maps(C=6, H=hw[0], W=hw[1])
    layer = TrainableRMAC(6, L=L, include_global=glob).double()
    torch.testing.assert_close(layer(x), rmac(x, L=L, include_global=glob), rtol=0, atol=1e-6)


def _gordo_loop(x, shift, W, L, eps=1e-6):
    """Gordo's trainable R-MAC by a loop over images and regions, with the FC matrix ``W`` given whole."""
    H, Wd = x.shape[-2:]
    regions = rmac_regions(H, Wd, L).tolist() + [[0, 0, Wd, H]]
    out = []
    for b in range(x.shape[0]):
        acc = torch.zeros(W.shape[0], dtype=torch.float64)
        for x0, y0, w, h in regions:
            v = x[b, :, y0:y0 + h, x0:x0 + w].amax(dim=(1, 2))
            v = v / (v.norm() + eps)
            u = W @ (v + shift)
            acc += u / (u.norm() + eps)
        out.append(acc / (acc.norm() + eps))
    return torch.stack(out)


def _set_start(layer, seed=5):
    """A random start: shift b and W0 (what fit_pca would set), Delta left at 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.shift.copy_(torch.randn(layer.in_channels, generator=gen, dtype=torch.float64))
        layer.w0.copy_(torch.randn(layer.dim, layer.in_channels, generator=gen, dtype=torch.float64) * 30)
    return gen


def test_trainable_rmac_at_zero_delta_is_the_fc_layer_of_its_start():
    """Delta = 0: the layer is W0 applied directly (the old parametrisation, an FC layer holding W0)."""
    x = _maps(C=4, H=6, W=8)
    layer = TrainableRMAC(4, L=2, dim=3).double()
    _set_start(layer)
    assert float(layer.delta.detach().abs().max()) == 0.0
    ref = _gordo_loop(x, layer.shift.detach(), layer.w0, L=2)
    torch.testing.assert_close(layer(x).detach(), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.weight, layer.w0, rtol=0, atol=0)
    assert layer.relative_change() == 0.0


def test_trainable_rmac_equals_a_plain_loop_with_delta():
    x = _maps(C=4, H=6, W=8)
    layer = TrainableRMAC(4, L=2, dim=3).double()
    gen = _set_start(layer)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.1)
    W = layer.w0 @ (torch.eye(4, dtype=torch.float64) + layer.delta.detach())  # W0 (I + Delta), by hand
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x).detach(), _gordo_loop(x, layer.shift.detach(), W, L=2), rtol=0, atol=1e-10)
    rel = float((W - layer.w0).norm() / layer.w0.norm())
    assert layer.relative_change() == pytest.approx(rel, rel=1e-12)


def test_trainable_rmac_gradients_match_finite_differences():
    x = _maps(B=2, C=4, H=5, W=7, seed=2)
    layer = TrainableRMAC(4, L=2, dim=3).double()
    gen = _set_start(layer)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.1)
    target = torch.randn(2, 3, generator=gen, dtype=torch.float64)

    def f(shift, delta):
        return torch.func.functional_call(layer, {"shift": shift, "delta": delta}, (x,)) @ target.T

    shift = layer.shift.detach().clone().requires_grad_(True)
    delta = layer.delta.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (shift, delta), eps=1e-6, atol=1e-7)


def _toy_groups(n_groups=6, per=3, C=8, seed=0):
    """Maps of ``n_groups`` groups: each group shares one bright pattern, at a random place, over clutter."""
    g = torch.Generator().manual_seed(seed)
    maps, labels = [], []
    for k in range(n_groups):
        pattern = torch.rand(C, generator=g, dtype=torch.float64) * 4
        for _ in range(per):
            x = torch.rand(C, 6, 8, generator=g, dtype=torch.float64) * 2
            r, c = int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(0, 7, (1,), generator=g))
            x[:, r:r + 2, c:c + 2] += pattern[:, None, None]
            maps.append(x)
            labels.append(k)
    return torch.stack(maps), torch.tensor(labels)


@pytest.mark.parametrize("start", ["identity", "pca"])
def test_a_few_adam_steps_move_held_rankings(start):
    """At Adam's usual rate the relative parametrisation moves W by a visible fraction and the
    held-out rankings change (asserted as moved, not as better)."""
    x_fit, y_fit = _toy_groups(seed=0)
    x_held, _ = _toy_groups(seed=1)
    layer = TrainableRMAC(8, L=2).double()
    if start == "pca":
        layer.fit_pca(x_fit)
        assert float(layer.w0.abs().max()) > 3  # a whitening start: entries far from unit size
    with torch.no_grad():
        before = layer(x_held)
    ranks_before = torch.argsort(before @ before.T, dim=1, descending=True)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    same = (y_fit[:, None] == y_fit[None, :]).double() - torch.eye(len(y_fit), dtype=torch.float64)
    for _ in range(5):
        f = layer(x_fit)
        S = f @ f.T
        loss = ((1 - S) * same).sum() / same.sum() + (S * (1 - same - torch.eye(len(y_fit)))).clamp(min=0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert 1e-3 < layer.relative_change() < 1.0
    with torch.no_grad():
        after = layer(x_held)
    ranks_after = torch.argsort(after @ after.T, dim=1, descending=True)
    assert not torch.equal(ranks_before, ranks_after)


def test_fit_pca_whitens_the_region_vectors():
    maps = [_maps(B=1, C=4, H=6, W=8, seed=s)[0] for s in range(6)]  # 6 maps x 9 regions (L=2 + global)
    layer = TrainableRMAC(4, L=2).double().fit_pca(maps)
    V = torch.cat([layer.region_vectors(m[None])[0] for m in maps])
    Y = layer.project(V).detach()
    torch.testing.assert_close(Y.mean(dim=0), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cov(Y.T), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-8)
    # a reference: mean and eigenvectors by hand; the same projections up to the sign of each component
    Xc = V - V.mean(dim=0)
    lam, E = torch.linalg.eigh(Xc.T @ Xc / (V.shape[0] - 1))
    ref = Xc @ (E / lam.sqrt()).flip(1)
    torch.testing.assert_close(Y.abs(), ref.abs(), rtol=0, atol=1e-8)


def test_from_pca_reduces_dimension_and_trains():
    maps = [_maps(B=1, C=6, H=6, W=8, seed=s)[0].float() for s in range(4)]
    layer = TrainableRMAC.from_pca(maps, L=2, dim=3)
    out = layer(torch.stack(maps))
    assert out.shape == (4, 3)
    out.sum().backward()
    assert layer.shift.grad.abs().min() > 0 and layer.delta.grad.abs().min() > 0
    assert float(layer.delta.detach().abs().max()) == 0.0  # the start: W = W0


def test_fit_pca_errors():
    maps = [_maps(B=1, C=6, H=3, W=4, seed=s)[0] for s in range(2)]
    with pytest.raises(ValueError, match="cannot whiten 6 dimensions"):
        TrainableRMAC(6, L=1).double().fit_pca(maps)
    with pytest.raises(ValueError, match="shrinkage"):
        TrainableRMAC(6, L=1, dim=2).double().fit_pca(maps, shrinkage=-1)
    with pytest.raises(ValueError, match="no feature maps"):
        TrainableRMAC(6).fit_pca([])
    with pytest.raises(ValueError, match="exceeds"):
        TrainableRMAC(6, dim=7)
    with pytest.raises(ValueError, match="built for 6 channels"):
        TrainableRMAC(6)(torch.rand(1, 5, 4, 4))


# ---------------------------------------------------------------- book/darac.py
def test_fixed_poolings_are_the_named_poolings():
    from retrieval_lib.book.darac import fixed_poolings
    from retrieval_lib.layers.functional import mac, spoc

    x = _maps(C=6, H=6, W=8)
    p = {k: m.double() for k, m in fixed_poolings().items()}
    assert len(p) == 6
    ok = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # noqa: E731
    ok(p["global average"](x), l2n(spoc(x), eps=0))
    ok(p["global max"](x), l2n(mac(x), eps=0))
    ok(p["global average+max"](x), l2n(l2n(spoc(x)) + l2n(mac(x)), eps=0))
    ok(p["regional max (R-MAC + whole map)"](x), rmac(x, L=3, include_global=True))
    ok(p["regional average+max (untrained DARAC)"](x), DARAC().double()(x))
    V = _plain_vectors(x)
    ok(p["regional average"](x), l2n(V[:, :21].sum(dim=1), eps=0))


def test_layout_checks_and_contributions_on_maps():
    from retrieval_lib.book.darac import grid_class, layout_checks, mean_contributions

    maps = [_maps(B=1, C=4, H=h, W=w, seed=k)[0].float()
            for k, (h, w) in enumerate([(6, 8), (8, 6), (6, 7), (5, 5), (4, 9)])]
    out = layout_checks(maps, kernels=4)
    assert out["shapes"] == {"R-MAC's grid": 3, "square": 1, "other": 1}
    assert out["plain_sum_max_abs_err"] < 1e-6 and out["rmac_max_abs_err"] < 1e-12
    assert out["rmac_gap_other_shapes"] > 1e-4
    assert grid_class(9, 16) == "R-MAC's grid" and grid_class(10, 18) == "R-MAC's grid"
    assert grid_class(9, 17) == "other"  # longer than 1.8 : 1
    s = mean_contributions(DARAC(kernels=4), maps)
    assert s.shape == (43,) and abs(s.sum() - 1) < 1e-5


def test_book_figures_draw():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retrieval_lib.book.darac import show_contributions, show_heldout, show_region_weights, show_size_study

    for fig in (show_region_weights(torch.linspace(0, 2, 42)), show_contributions({"a": torch.full((43,), 1 / 43)}),
                show_size_study([224, 448], {"global max": [0.5, 0.4], "regional average": [0.6, 0.5]}, "t"),
                show_heldout(["a", "b"], [0.5, 0.6], [(None, None), (0.01, 0.2)], "a", "t")):
        assert fig.axes and fig.axes[0].get_title()
        plt.close(fig)
    with pytest.raises(ValueError, match="42 values"):
        show_region_weights(torch.ones(21))


def test_fit_pca_with_fewer_vectors_than_channels_whitens_too():
    maps = [_maps(B=1, C=40, H=3, W=4, seed=s)[0] for s in range(5)]  # 5 maps x 3 regions (L=1: 2, + global) = 15 < 40
    layer = TrainableRMAC(40, L=1, dim=12).double().fit_pca(maps)
    V = torch.cat([layer.region_vectors(m[None])[0] for m in maps])
    assert V.shape == (15, 40)
    Y = layer.project(V).detach()
    torch.testing.assert_close(torch.cov(Y.T), torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-8)
    W = layer.weight
    P = W / W.norm(dim=1, keepdim=True)  # unit eigenvectors: orthonormal rows
    torch.testing.assert_close(P @ P.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-8)


# ---------------------------------------------------------------- where the objects are, which loss, why not
def _coverage_by_pixels(box, size, long_side=16, fine=8):
    """slot_coverage for one image by counting the pixels of a fine raster of the (transposed) image."""
    (x0, y0, x1, y1), (W, H) = box, size
    if H > W:
        x0, y0, x1, y1, W, H = y0, x0, y1, x1, H, W
    h = max(1, int(round(long_side * H / W)))
    regions = darac_regions(h, long_side).tolist()
    gw, gh = long_side * fine, h * fine  # fine grid over the map, pixel centres in fractions of the image
    xs, ys = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw, (torch.arange(gh, dtype=torch.float64) + 0.5) / gh
    inside = ((ys[:, None] >= y0 / H) & (ys[:, None] < y1 / H) & (xs[None] >= x0 / W) & (xs[None] < x1 / W))
    return [float(inside[ry * fine:(ry + rh) * fine, rx * fine:(rx + rw) * fine].double().mean())
            for rx, ry, rw, rh in regions]


def test_slot_coverage_equals_counting_pixels():
    from retrieval_lib.book.darac import slot_coverage

    # boxes on cell boundaries of the fine raster, so counting pixels is exact
    cases = [((0, 0, 256, 192), (512, 384)), ((128, 96, 384, 288), (512, 384)), ((96, 0, 288, 256), (384, 512)),
             ((0, 0, 512, 384), (512, 384)), ((32, 32, 96, 160), (512, 384))]
    for box, size in cases:
        np.testing.assert_allclose(slot_coverage([box], [size]), _coverage_by_pixels(box, size), atol=1e-12)
    both = slot_coverage([c[0] for c in cases], [c[1] for c in cases])
    np.testing.assert_allclose(both, np.mean([_coverage_by_pixels(*c) for c in cases], axis=0), atol=1e-12)
    whole = slot_coverage([(0, 0, 512, 384)], [(512, 384)])
    np.testing.assert_allclose(whole, np.ones(21))
    assert slot_coverage([(0, 0, 256, 192)], [(512, 384)])[0] == pytest.approx(0.25)  # whole-map slot: the area share
    with pytest.raises(ValueError, match="one \\(width, height\\) per box"):
        slot_coverage([(0, 0, 1, 1)], [(4, 4), (4, 4)])
    with pytest.raises(ValueError, match="positive"):
        slot_coverage([(0, 0, 1, 1)], [(0, 4)])


def test_a_portrait_image_reads_transposed():
    from retrieval_lib.book.darac import slot_coverage

    np.testing.assert_allclose(slot_coverage([(10, 40, 100, 200)], [(384, 512)]),
                               slot_coverage([(40, 10, 200, 100)], [(512, 384)]), atol=1e-12)


def test_choose_by_validation_names_ties():
    from retrieval_lib.book.darac import choose_by_validation

    assert choose_by_validation({"a": 0.5, "b": 0.7, "c": 0.6}, "a")[0] == "b"
    kept, why = choose_by_validation({"a": 0.7, "b": 0.7, "c": 0.6}, "b")
    assert kept == "b" and "tie" in why and "(the default)" in why
    kept, why = choose_by_validation({"a": 0.7, "b": 0.7, "c": 0.6}, "c")
    assert kept == "a" and "the default" not in why
    with pytest.raises(ValueError, match="not one of"):
        choose_by_validation({"a": 0.1}, "z")
    with pytest.raises(ValueError, match="no validation"):
        choose_by_validation({}, "z")


def test_training_diagnosis_names_the_measured_causes():
    from retrieval_lib.book.darac import training_diagnosis

    flat = {"val_mAP": [1.0, 1.0, 0.99], "kept_epoch": 0, "saturated": True}
    cmp0 = {"delta": 0.0, "significant": False, "ci": (0.0, 0.0), "n": 9, "n_groups": 3}
    out = training_diagnosis(flat, cmp0, moved=0.0, moved_what="largest weight change")
    assert len(out) == 3 and "saturated" in out[0] and "untrained head was kept" in out[1] and "barely" in out[2]
    flat = {"val_mAP": [0.4, 0.4, 0.4], "kept_epoch": 2, "saturated": False}
    out = training_diagnosis(flat, {**cmp0, "identical": True}, moved=0.3, moved_what="w")
    assert len(out) == 2 and "never changed" in out[0] and "every one of the 9 held-out queries" in out[1]
    up = {"val_mAP": [0.5, 0.6], "kept_epoch": 1, "saturated": False}
    out = training_diagnosis(up, {**cmp0, "delta": -0.02}, moved=0.3, moved_what="w")
    assert out == [out[0]] and "did not carry over" in out[0]
    out = training_diagnosis(up, {**cmp0, "delta": 0.02, "ci": (-0.01, 0.05)}, moved=0.3, moved_what="w")
    assert len(out) == 1 and "within the noise of 3 groups" in out[0]
    assert training_diagnosis(up, {**cmp0, "delta": 0.02, "significant": True, "ci": (0.01, 0.03)}, 0.3, "w") == []


def test_paired_rows_are_paired_comparisons():
    from retrieval_lib.book.darac import paired_rows
    from retrieval_lib.search.compare import paired_comparison

    rng = np.random.default_rng(0)
    aps = {"a": rng.random(12), "b": rng.random(12)}
    aps["c"] = aps["a"].copy()
    groups = np.repeat(np.arange(4), 3)
    header, rows, cmps = paired_rows(aps, [("a", "b"), ("c", "a")], {"a": "A", "b": "B", "c": "C"}, groups=groups)
    ref = paired_comparison(aps["a"], aps["b"], groups=groups)
    assert cmps[("a", "b")]["ci"] == ref["ci"] and cmps[("a", "b")]["resampled"] == "groups"
    assert len(rows) == 2 and all(len(r) == len(header) for r in rows)
    assert rows[0][:3] == ["A", "B", pytest.approx(aps["a"].mean())] and rows[1][-1] == "identical"


# ---------------------------------------------------------------- heads on vectors computed once
def test_heads_on_frozen_vectors_equal_heads_on_maps():
    from retrieval_lib.book.darac import frozen_vectors
    from retrieval_lib.engine.extract import pool_fmaps

    maps = [_maps(B=1, C=6, H=h, W=w, seed=s)[0] for s, (h, w) in enumerate([(6, 8), (8, 6), (6, 8), (5, 9)])]
    gen = torch.Generator().manual_seed(3)
    darac = DARAC(kernels=4).double()
    gordo = TrainableRMAC(6, L=3, dim=4).double()
    with torch.no_grad():
        darac.weight.add_(torch.randn(darac.weight.shape, generator=gen, dtype=torch.float64))
        darac.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64) * 0.1)
        gordo.shift.copy_(torch.randn(6, generator=gen, dtype=torch.float64) * 0.1)
        gordo.delta.copy_(torch.randn(6, 6, generator=gen, dtype=torch.float64) * 0.1)
    for layer in (darac, gordo):
        V = frozen_vectors(layer, maps)
        assert len(V) == len(maps) and V[0].dim() == 2
        torch.testing.assert_close(pool_fmaps(V, layer), pool_fmaps(maps, layer), rtol=0, atol=1e-12)
        for m, v in zip(maps, V):  # one map at a time, as a loop would
            torch.testing.assert_close(layer(v[None]), layer(m[None]), rtol=0, atol=1e-12)
    assert frozen_vectors(darac, maps)[0].shape == (42, 6)
    assert frozen_vectors(gordo, maps)[0].shape == (21, 6)  # R-MAC's 20 squares of a 6 x 8 map + the whole map
    torch.testing.assert_close(darac.contributions(frozen_vectors(darac, maps)[0][None]), darac.contributions(maps[0][None]))


def test_vector_inputs_are_checked():
    from retrieval_lib.book.darac import frozen_vectors

    with pytest.raises(ValueError, match="precomputed vectors"):
        DARAC(kernels=2)(torch.rand(2, 21, 6))
    with pytest.raises(ValueError, match="precomputed vectors"):
        TrainableRMAC(6)(torch.rand(2, 21, 5))
    with pytest.raises(TypeError, match="DARAC or a TrainableRMAC"):
        frozen_vectors(torch.nn.Identity(), [torch.rand(6, 4, 4)])


def test_not_beaten_note_and_rank_correlation():
    from retrieval_lib.book.darac import not_beaten_note, rank_correlation

    rec = {"val_mAP": [0.5, 0.6], "kept_epoch": 1, "saturated": False}
    win = {"delta": 0.1, "significant": True, "ci": (0.05, 0.15), "n": 9, "n_groups": 3}
    assert not_beaten_note("H", rec, win, 0.3, "w") == ""
    note = not_beaten_note("H", rec, {**win, "significant": False, "ci": (-0.01, 0.2)}, 0.3, "w")
    assert note.startswith("**H did not beat") and "within the noise of 3 groups" in note
    note = not_beaten_note("H", rec, {**win, "delta": 0.0, "significant": False, "ci": (0.0, 0.0)}, 0.3, "w")
    assert "not a gain" not in note and "did not carry over" in note
    a = [0.1, 0.5, 0.3, 0.9]
    assert rank_correlation(a, [1, 3, 2, 4]) == pytest.approx(1.0)
    assert rank_correlation(a, [4, 2, 3, 1]) == pytest.approx(-1.0)
    ra, rb = [0, 2, 1, 3], [1, 0, 3, 2]  # the ranks by hand; Pearson of ranks
    assert rank_correlation(a, [2, 1, 4, 3]) == pytest.approx(float(np.corrcoef(ra, rb)[0, 1]))
    assert np.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        rank_correlation([1, 2], [1, 2, 3])
