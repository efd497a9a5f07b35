"""layers.grads: the closed-form derivatives of GeM and wGeM against autograd, a finite difference
by hand and a hand-worked mask, and the chain through wGeM's softmax and convolution."""
import math

import pytest
import torch

from retrieval_lib.layers import functional
from retrieval_lib.layers.functional import wgem
from retrieval_lib.layers.grads import gem_grads, wgem_backward, wgem_grads
from retrieval_lib.layers.pooling import WGeM


# ------------------------------------------------------------------ GeM
def _relu_fmap(seed=0, B=2, C=5, H=3, W=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 6
    x[x < 1.0] = 0.0  # exact zeros, as after a ReLU: the clamp must block their gradient
    return x


@pytest.mark.parametrize("p", [1.0, 3.0, 7.5, torch.tensor([2.5], dtype=torch.float64),
                               torch.tensor([1.0, 2.0, 3.0, 4.0, 5.5], dtype=torch.float64)])
def test_gem_grads_match_autograd(p):
    x = _relu_fmap().requires_grad_(True)
    pt = (p.clone() if isinstance(p, torch.Tensor) else torch.tensor([p], dtype=torch.float64)).requires_grad_(True)
    f = functional.gem(x, pt)  # (B, C)
    dfdx, dfdp = gem_grads(x.detach(), p)
    # a random linear functional of f gives one backward pass that checks every entry
    w = torch.randn(f.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gp = torch.autograd.grad((w * f).sum(), (x, pt))
    assert torch.allclose(gx, w[..., None, None] * dfdx, atol=1e-12, rtol=0)
    want_p = (w * dfdp).sum(0) if pt.numel() > 1 else (w * dfdp).sum().reshape(1)
    assert torch.allclose(gp, want_p, atol=1e-11, rtol=0)
    assert (dfdx[x.detach() == 0] == 0).all()


def test_gem_grad_p_matches_a_finite_difference_by_hand():
    # one channel, values 1, 2, 4 (N = 3), p = 2: f(p) = ((1 + 2^p + 4^p) / 3)^(1/p)
    x = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).reshape(1, 1, 1, 3)

    def f(p):
        return ((1 + 2**p + 4**p) / 3) ** (1 / p)

    h = 1e-6
    numeric = (f(2 + h) - f(2 - h)) / (2 * h)
    _, dfdp = gem_grads(x, 2.0)
    assert dfdp.item() == pytest.approx(numeric, rel=1e-8)
    assert f(2.0) == pytest.approx(math.sqrt(7.0))  # the value itself: sqrt(21 / 3)
    dfdx, _ = gem_grads(x, 2.0)
    # d f / d x_i = 1/3 f^(1-2) x_i = x_i / (3 sqrt 7)
    assert torch.allclose(dfdx.flatten(), torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) / (3 * math.sqrt(7)))


def test_gem_grads_errors():
    with pytest.raises(ValueError, match="positive"):
        gem_grads(_relu_fmap(), 0.0)
    with pytest.raises(ValueError, match="4-D"):
        gem_grads(torch.rand(3, 4, 5), 3.0)


# ------------------------------------------------------------------ wGeM
def _fmap(B=2, C=5, H=4, W=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 3
    x[0, 0, 0, 0] = 0.0  # below eps: the clamp passes no gradient there
    return x


@pytest.mark.parametrize("p", [1.0, 2.5, 7.0])
def test_wgem_grads_equal_autograd(p):
    x = _fmap().requires_grad_(True)
    logits = torch.randn(2, 1, 4, 3, dtype=torch.float64)
    w = torch.softmax(logits.flatten(2), -1).view_as(logits).requires_grad_(True)
    pt = torch.tensor([p], dtype=torch.float64, requires_grad=True)
    y = wgem(x, w, pt)  # (B, C)
    g = torch.randn_like(y)
    gx, gw, gp = torch.autograd.grad((g * y).sum(), (x, w, pt))
    dydx, dydw, dydp = wgem_grads(x.detach(), w.detach(), p)
    assert torch.allclose(gx, g[..., None, None] * dydx, rtol=0, atol=1e-12)
    assert torch.allclose(gw, (g[..., None, None] * dydw).sum(1, keepdim=True), rtol=0, atol=1e-12)
    assert torch.allclose(gp, (g * dydp).sum().reshape(1), rtol=0, atol=1e-12)
    assert dydx[0, 0, 0, 0] == 0


def test_uniform_weights_give_gems_derivatives():
    x = _fmap()
    uniform = torch.full((1, 1, 4, 3), 1 / 12, dtype=torch.float64)
    dydx, _, dydp = wgem_grads(x, uniform, 3.0)
    dfdx, dfdp = gem_grads(x, 3.0)
    assert torch.allclose(dydx, dfdx, rtol=0, atol=1e-13) and torch.allclose(dydp, dfdp, rtol=0, atol=1e-13)


def test_the_mask_gradient_vanishes_as_one_over_p():
    # one channel, values 1 and 2 on a uniform 2-cell mask: dy/dw at the max -> y * 2 / p
    x = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    w = torch.full((1, 1, 1, 2), 0.5, dtype=torch.float64)
    scaled = []
    for p in (10.0, 100.0, 400.0):
        _, dydw, _ = wgem_grads(x, w, p)
        y = float(wgem(x, w, p))
        # by hand: (1/p) 2^p y^(1-p) with y = (0.5 + 0.5 * 2^p)^(1/p)
        yh = (0.5 + 0.5 * 2.0**p) ** (1 / p)
        assert float(dydw[0, 0, 0, 1]) == pytest.approx(2.0**p * yh ** (1 - p) / p, rel=1e-12)
        scaled.append(p * float(dydw[0, 0, 0, 1]) / y)
    assert scaled[-1] == pytest.approx(2.0, rel=1e-3)  # p * dy/dw_max -> y / w_max = 2 y
    assert abs(scaled[0] - 2) > abs(scaled[-1] - 2)


def test_wgem_backward_matches_autograd_through_both_paths():
    torch.manual_seed(0)
    x = _fmap(C=6).requires_grad_(True)
    layer = WGeM(6, p=2.5).double()
    with torch.no_grad():
        layer.conv.weight.normal_(0, 0.3)
        layer.conv.bias.fill_(0.2)
    y = layer(x)
    g = torch.randn_like(y)
    gx, gp, gW, gb = torch.autograd.grad((g * y).sum(), (x, layer.p, layer.conv.weight, layer.conv.bias))
    by_hand = wgem_backward(layer, x.detach(), g)
    assert torch.allclose(by_hand["x"], gx, rtol=0, atol=1e-11)
    assert torch.allclose(by_hand["p"].reshape(1), gp, rtol=0, atol=1e-11)
    assert torch.allclose(by_hand["conv_weight"], gW, rtol=0, atol=1e-11)
    assert torch.allclose(by_hand["conv_bias"], gb, rtol=0, atol=1e-11)
    assert by_hand["x_mask"].abs().max() > 1e-3  # the mask path is really there
    # without the mask path the gradient is wrong
    assert not torch.allclose(by_hand["x_pool"], gx, atol=1e-6)
    with pytest.raises(ValueError, match="g must have shape"):
        wgem_backward(layer, x.detach(), g[:, :3])
    # the closed forms chain the convolution on the raw map: a unit-length mask input is refused, never wrong
    with pytest.raises(ValueError, match="mask_input is 'l2'"):
        wgem_backward(WGeM(6, p=2.5, mask_input="l2").double(), x.detach(), g)


def test_wgem_grads_errors():
    x = _fmap()
    with pytest.raises(ValueError, match="weights must have shape"):
        wgem_grads(x, torch.ones(2, 1, 3, 3), 3.0)
    with pytest.raises(ValueError, match="p must be a positive"):
        wgem_grads(x, torch.ones(2, 1, 4, 3) / 12, 0.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        wgem_grads(x[0], torch.ones(1, 1, 4, 3), 3.0)
