"""Tests for retrieval_lib.layers.pooling: modules agree with the functions, learnable exponents get
gradients, WGeM attention is a spatial distribution, reprs, the name table and errors."""
import pytest
import torch

from retrieval_lib.layers import functional as F
from retrieval_lib.layers.pooling import GeM, MAC, POOLING, RMAC, SPoC, WGeM, make_pooling


def _fmap(B=2, C=4, H=5, W=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, C, H, W, generator=g) + 0.05).to(dtype)


def test_modules_equal_functions():
    x = _fmap()
    assert torch.equal(MAC()(x), F.mac(x))
    assert torch.equal(SPoC()(x), F.spoc(x))
    assert torch.equal(SPoC(center_prior=True)(x), F.spoc(x, center_prior=True))
    assert torch.allclose(GeM(p=2.5)(x), F.gem(x, 2.5))
    assert torch.allclose(GeM(p=2.5, learn_p=False)(x), F.gem(x, 2.5))
    assert torch.equal(RMAC(L=2, include_global=False)(x), F.rmac(x, L=2, include_global=False))
    assert torch.equal(RMAC()(x), F.rmac(x))


def test_only_rmac_output_is_normalised():
    x = _fmap()
    ones = torch.ones(2)
    assert torch.allclose(RMAC()(x).norm(dim=1), ones)
    for m in (MAC(), SPoC(), GeM(), WGeM(4)):
        assert not torch.allclose(m(x).norm(dim=1), ones, atol=1e-3)


def test_extra_repr():
    assert repr(GeM()) == "GeM(p=3.0000, eps=1e-06, learnable)"
    assert repr(GeM(p=2.5, eps=1e-3, learn_p=False)) == "GeM(p=2.5000, eps=1e-03, fixed)"
    assert repr(GeM(per_channel=True, in_channels=8)) == (
        "GeM(p=per-channel(8, mean=3.0000), eps=1e-06, learnable)"
    )
    assert repr(SPoC(center_prior=True)) == "SPoC(center_prior=True)"
    assert repr(MAC()) == "MAC()"
    assert repr(RMAC(L=2)) == "RMAC(L=2, include_global=True, eps=1e-06)"
    assert WGeM(16).extra_repr() == "in_channels=16, p=3.0000, eps=1e-06, learnable"


def test_gem_learnable_p_gets_gradient():
    x = _fmap()
    m = GeM(p=3.0)
    assert [n for n, _ in m.named_parameters()] == ["p"] and m.p.shape == (1,)
    m(x).sum().backward()
    assert m.p.grad is not None and m.p.grad.abs().item() > 0
    # gradient equals the functional one
    p = torch.tensor([3.0], requires_grad=True)
    F.gem(x, p).sum().backward()
    assert torch.allclose(m.p.grad, p.grad)


def test_gem_per_channel_p():
    x = _fmap(C=4)
    m = GeM(p=2.0, per_channel=True, in_channels=4)
    assert m.p.shape == (4,)
    with torch.no_grad():
        m.p.copy_(torch.tensor([1.0, 2.0, 3.0, 8.0]))
    out = m(x)
    assert torch.allclose(out, F.gem(x, torch.tensor([1.0, 2.0, 3.0, 8.0])))
    out.sum().backward()
    assert m.p.grad.shape == (4,) and torch.all(m.p.grad != 0)


def test_gem_fixed_p_is_a_buffer():
    m = GeM(p=4.0, learn_p=False)
    assert list(m.parameters()) == []
    assert "p" in m.state_dict() and not m.p.requires_grad


def test_gem_p_is_clamped_at_p_min():
    x = _fmap()
    m = GeM(p=3.0)
    with torch.no_grad():
        m.p.fill_(0.25)  # e.g. where an optimiser pushed it
    assert torch.allclose(m(x), F.gem(x, 1.0))  # acts as p_min = 1 (average pooling)
    m(x).sum().backward()
    assert m.p.grad.item() == 0.0  # below p_min: no gradient
    m2 = GeM(p=0.5, p_min=0.1)
    assert torch.allclose(m2(x), F.gem(x, 0.5))
    m3 = GeM(p=1.0)  # starting exactly at p_min must still learn
    m3(x).sum().backward()
    assert m3.p.grad.item() != 0.0


def test_modules_follow_dtype():
    x = _fmap(dtype=torch.float64)
    for m in (MAC(), SPoC(True), GeM(), RMAC(), WGeM(4).double()):
        assert m(x).dtype == torch.float64
    # a float32 learnable p works on a float64 map and keeps float64
    assert GeM()(x).dtype == torch.float64


def test_wgem_attention_is_a_spatial_distribution():
    x = _fmap(B=3, C=4, H=5, W=6)
    m = WGeM(4)
    torch.manual_seed(0)
    with torch.no_grad():
        m.conv.weight.normal_(0, 0.5)
        m.conv.bias.fill_(0.3)
    a = m.attention(x)
    assert a.shape == (3, 1, 5, 6)
    assert torch.all(a >= 0)
    assert torch.allclose(a.sum(dim=(-2, -1)), torch.ones(3, 1))
    assert a.std() > 0  # not uniform once the conv has weights
    # the mask is softmax over H*W of a 3x3 conv with padding 1
    logits = torch.nn.functional.conv2d(x, m.conv.weight, m.conv.bias, padding=1)
    assert torch.allclose(a, torch.softmax(logits.flatten(2), -1).view(3, 1, 5, 6))
    assert torch.allclose(m(x), F.wgem(x, a, p=3.0))


def test_wgem_starts_as_gem_and_learns():
    x = _fmap(C=4)
    m = WGeM(4, p=2.0)
    assert torch.allclose(m(x), F.gem(x, 2.0), rtol=1e-5)
    m(x).pow(2).sum().backward()
    assert m.p.grad is not None and m.p.grad.abs().item() > 0
    assert m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum().item() > 0
    fixed = WGeM(4, learn_p=False)
    assert [n for n, _ in fixed.named_parameters()] == ["conv.weight", "conv.bias"]


def test_pooling_table_and_make_pooling():
    assert set(POOLING) == {"mac", "spoc", "gem", "rmac", "wgem"}
    assert isinstance(make_pooling("gem", p=2.0, learn_p=False), GeM)
    assert make_pooling("GeM").p.item() == 3.0
    assert make_pooling("rmac", L=2).L == 2
    assert make_pooling("spoc", center_prior=True).center_prior
    assert make_pooling("wgem", in_channels=8).in_channels == 8
    assert isinstance(make_pooling("mac"), MAC)
    with pytest.raises(ValueError, match="unknown pooling 'vlad'; valid names are gem, mac, rmac, spoc, wgem"):
        make_pooling("vlad")
    with pytest.raises(ValueError, match="valid names"):
        make_pooling(None)


def test_module_errors():
    with pytest.raises(ValueError, match="initial p must be a positive"):
        GeM(p=0.0)
    with pytest.raises(ValueError, match="below p_min"):
        GeM(p=0.5)
    with pytest.raises(ValueError, match="p_min must be a positive"):
        GeM(p_min=0.0)
    with pytest.raises(ValueError, match="per_channel=True needs the number of channels"):
        GeM(per_channel=True)
    with pytest.raises(ValueError, match="eps"):
        GeM(eps=0.0)
    with pytest.raises(ValueError, match="4 per-channel exponents but the feature map has 3"):
        GeM(per_channel=True, in_channels=4)(_fmap(C=3))
    with pytest.raises(ValueError, match="L must be an integer"):
        RMAC(L=0)
    with pytest.raises(ValueError, match="in_channels must be"):
        WGeM(0)
    with pytest.raises(ValueError, match="initial p must be a positive"):
        WGeM(4, p=-1.0)
    with pytest.raises(ValueError, match="built for 4 channels but the feature map has 3"):
        WGeM(4)(_fmap(C=3))
    with pytest.raises(ValueError, match="built for 4 channels"):
        WGeM(4).attention(_fmap(C=3))
    with pytest.raises(ValueError, match="4-D feature map"):
        GeM()(torch.rand(4, 5, 6))
    with pytest.raises(ValueError, match="4-D feature map"):
        WGeM(4)(torch.rand(4, 5, 6))


def test_each_pooling_declares_its_multiscale_exponent():
    assert MAC().multiscale_p == SPoC().multiscale_p == RMAC().multiscale_p == 1.0
    assert GeM(p=2.5).multiscale_p == 2.5 and isinstance(GeM(p=2.5).multiscale_p, float)
    assert WGeM(4, p=4.0, learn_p=False).multiscale_p == 4.0
    g = GeM(p=3.0)
    with torch.no_grad():
        g.p.fill_(0.5)  # learned below p_min: the forward uses p_min, so does the multi-scale mean
    assert g.multiscale_p == 1.0
    per = GeM(p=2.0, per_channel=True, in_channels=3)
    with torch.no_grad():
        per.p.copy_(torch.tensor([2.0, 3.0, 5.0]))
    assert torch.equal(per.multiscale_p, torch.tensor([2.0, 3.0, 5.0]))
    assert not per.multiscale_p.requires_grad


def test_gem_in_float64_survives_large_p():
    x = torch.rand(2, 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 6
    g64 = GeM(p=3.0, learn_p=False, dtype=torch.float64)
    assert g64.p.dtype == torch.float64
    assert g64(x).dtype == torch.float32  # the input's dtype comes back
    torch.testing.assert_close(g64(x), F.gem(x, 3.0), rtol=1e-5, atol=0)
    x[:, :, 0, 0] = 6.0
    assert not torch.isfinite(GeM(p=60.0, learn_p=False)(x)).all()  # float32 overflows at 6^60 ...
    big = GeM(p=60.0, learn_p=False, dtype=torch.float64)(x)
    assert torch.isfinite(big).all()  # ... float64 does not, and it is close to the max
    torch.testing.assert_close(big, x.amax((2, 3)), rtol=0.05, atol=0)
    torch.testing.assert_close(big, F.gem(x.double(), 60.0).float())
    assert repr(g64) == "GeM(p=3.0000, eps=1e-06, fixed, dtype=torch.float64)"


def test_wgem_dtype_and_gradients():
    x = _fmap()
    w64 = WGeM(4, p=3.0, dtype=torch.float64)
    out = w64(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.gem(x.double(), 3.0).float())  # zero conv: uniform weights
    out.sum().backward()
    assert w64.p.grad is not None and w64.conv.weight.grad is not None
    assert "dtype=torch.float64" in repr(w64)


def test_dtype_and_p_errors():
    with pytest.raises(ValueError, match="floating point torch.dtype"):
        GeM(dtype=torch.int64)
    with pytest.raises(ValueError, match="floating point torch.dtype"):
        WGeM(4, dtype="float64")
    with pytest.raises(ValueError, match="positive finite"):
        GeM(p=float("inf"))


# ------------------------------------------------------------------ WGeM with normalised mask input
def _wgem_l2_loop(x, weight, bias, p, eps=1e-6):
    """WGeM(mask_input="l2") by plain loops: per image, each cell's C-vector to unit length, the 3x3
    convolution (zero padding) cell by cell, the softmax over cells, the weighted power mean per channel."""
    B, C, H, W = x.shape
    out = torch.zeros(B, C, dtype=x.dtype)
    for b in range(B):
        unit = torch.zeros(C, H, W, dtype=x.dtype)
        for r in range(H):
            for c in range(W):
                unit[:, r, c] = x[b, :, r, c] / (x[b, :, r, c].norm() + eps)
        z = torch.zeros(H, W, dtype=x.dtype)
        for r in range(H):
            for c in range(W):
                z[r, c] = bias[0]
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        if 0 <= r + dr < H and 0 <= c + dc < W:
                            z[r, c] = z[r, c] + (weight[0, :, dr + 1, dc + 1] * unit[:, r + dr, c + dc]).sum()
        omega = torch.exp(z - z.max())
        omega = omega / omega.sum()
        for k in range(C):
            xk = x[b, k].clamp(min=eps)
            out[b, k] = (omega * xk ** p).sum() ** (1.0 / p)
    return out


def test_wgem_l2_mask_input_matches_a_loop_and_starts_as_gem():
    x = _fmap(B=2, C=3, H=4, W=5, dtype=torch.float64) * 5.0
    m = WGeM(3, p=2.5, mask_input="l2").double()
    torch.testing.assert_close(m(x), F.gem(x, 2.5), rtol=1e-12, atol=1e-12)  # untrained: uniform mask = GeM
    torch.testing.assert_close(m.attention(x), torch.full((2, 1, 4, 5), 1 / 20, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.conv.weight.copy_(torch.randn(m.conv.weight.shape, generator=gen, dtype=torch.float64))
        m.conv.bias.fill_(0.2)
    ref = _wgem_l2_loop(x, m.conv.weight.detach(), m.conv.bias.detach(), 2.5)
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    # the mask sees directions only: scaling a cell's vector leaves the mask (nearly: eps) unchanged
    scaled = x.clone()
    scaled[:, :, 1, 2] *= 10.0
    torch.testing.assert_close(m.attention(scaled), m.attention(x), rtol=1e-5, atol=1e-7)
    raw = WGeM(3, p=2.5).double()
    raw.load_state_dict(m.state_dict())  # same parameters, raw input: another mask
    assert not torch.allclose(raw.attention(x), m.attention(x))
    assert m.extra_repr().endswith("learnable, mask_input=l2") and "mask_input" not in raw.extra_repr()


def test_wgem_l2_mask_input_gradcheck():
    x = (_fmap(B=1, C=3, H=3, W=4, dtype=torch.float64) + 0.1).requires_grad_(True)
    m = WGeM(3, p=3.0, mask_input="l2").double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        m.conv.weight.copy_(torch.randn(m.conv.weight.shape, generator=gen, dtype=torch.float64))
    w = m.conv.weight.detach().clone().requires_grad_(True)
    p = m.p.detach().clone().requires_grad_(True)

    def g(x_, w_, p_):  # the same forward with the weights as inputs, so gradcheck differentiates them
        unit = x_ / (torch.linalg.vector_norm(x_, dim=1, keepdim=True) + m.eps)
        z = torch.nn.functional.conv2d(unit, w_, m.conv.bias, padding=1)
        omega = torch.softmax(z.flatten(2), -1).view_as(z)
        return F.wgem(x_, omega, p_)

    torch.testing.assert_close(m(x.detach()), g(x.detach(), w.detach(), p.detach()), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(g, (x, w, p), eps=1e-6, atol=1e-6)  # dy/dx (both paths), dy/dW, dy/dp
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)  # the layer's own backward in x
    m(x).sum().backward()  # the layer's dL/dW and dL/dp are those of the checked function
    gw, gp = torch.autograd.grad(g(x, w, p).sum(), (w, p))
    assert m.conv.weight.grad.abs().sum() > 0
    torch.testing.assert_close(m.conv.weight.grad, gw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.p.grad, gp, rtol=1e-10, atol=1e-12)


def test_wgem_mask_input_errors_and_default_is_unchanged():
    with pytest.raises(ValueError, match="mask_input"):
        WGeM(4, mask_input="L2")
    x = _fmap(C=4)
    a, b = WGeM(4), WGeM(4, mask_input="raw")
    with torch.no_grad():
        a.conv.weight.normal_(0, 0.3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x)) and list(a.state_dict()) == ["p", "conv.weight", "conv.bias"]
    logits = torch.nn.functional.conv2d(x, a.conv.weight, a.conv.bias, padding=1)  # raw: the map itself
    assert torch.equal(a.attention(x), torch.softmax(logits.flatten(2), -1).view_as(logits))
