"""retrieval_lib.book.explain: arg-max locations, receptive fields, input gradients, correspondences.

Every vectorised function is checked against a plain reference: Python loops over
channels and cells, the support of autograd gradients through all-positive linear
networks (whose support is exactly the theoretical receptive field), hand-derived
receptive-field sizes, and hand-made maps.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import retrieval_lib.book.receptive_fields as rf_mod
from retrieval_lib.models.backbones import efficientnet_lite, resnet, tf_same_padding
from retrieval_lib.models.effnet_lite import Conv2dSame
from retrieval_lib.book.explain import (
    Correspondences,
    argmax_locations,
    clipped_channels,
    count_clipped,
    fmap_of,
    implicit_correspondences,
    rank_channels,
    top_channels,
)
from retrieval_lib.book.receptive_fields import (
    ConvSpec,
    cell_boxes,
    cell_centers,
    conv_chain,
    input_gradients,
    mass_box,
    receptive_field,
)
from retrieval_lib.layers.functional import l2n, mac


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return efficientnet_lite(0, pretrained=False).eval()


# ------------------------------------------------------------------ arg-max locations
def _argmax_loop(f):
    C, h, w = f.shape
    locs, vals = [], []
    for c in range(C):
        best, where = -math.inf, None
        for r in range(h):
            for q in range(w):
                if f[c, r, q].item() > best:  # strict: the first maximum in row-major order wins
                    best, where = f[c, r, q].item(), (r, q)
        locs.append(where)
        vals.append(best)
    return torch.tensor(locs), torch.tensor(vals)


def test_argmax_locations_match_a_loop_with_ties():
    g = torch.Generator().manual_seed(1)
    f = torch.randint(0, 4, (6, 3, 5), generator=g).float()  # many ties
    locs, vals = argmax_locations(f)
    ref_locs, ref_vals = _argmax_loop(f)
    assert torch.equal(locs, ref_locs)
    assert torch.equal(vals, ref_vals)
    assert locs.dtype == torch.int64 and locs.shape == (6, 2)


def test_argmax_locations_batch_and_mac_values():
    f = torch.rand(3, 7, 4, 6, generator=torch.Generator().manual_seed(2))
    locs, vals = argmax_locations(f)
    assert locs.shape == (3, 7, 2) and vals.shape == (3, 7)
    assert torch.equal(vals, f.amax(dim=(-2, -1)))
    for b in range(3):
        ref_locs, _ = _argmax_loop(f[b])
        assert torch.equal(locs[b], ref_locs)


def test_argmax_tiebreak_picks_the_tied_cell_with_the_largest_tiebreak():
    g = torch.Generator().manual_seed(7)
    f = torch.randint(0, 3, (5, 4, 4), generator=g).float()
    f[0] = 0.0  # a channel zero everywhere: every cell ties
    tb = torch.randn(5, 4, 4, generator=g)
    locs, vals = argmax_locations(f, tiebreak=tb)
    for c in range(5):
        best, where = -math.inf, None
        for r in range(4):
            for q in range(4):
                if f[c, r, q] == f[c].max() and tb[c, r, q].item() > best:
                    best, where = tb[c, r, q].item(), (r, q)
        assert tuple(locs[c].tolist()) == where
    assert torch.equal(vals, f.amax(dim=(-2, -1)))
    batched, _ = argmax_locations(f[None].repeat(2, 1, 1, 1), tiebreak=tb[None].repeat(2, 1, 1, 1))
    assert torch.equal(batched[1], locs)
    with pytest.raises(ValueError, match="tiebreak"):
        argmax_locations(f, tiebreak=tb[:, :2])


@pytest.mark.parametrize("bad, err", [(np.zeros((2, 3, 3)), TypeError), (torch.zeros(3, 3), ValueError),
                                      (torch.zeros(2, 0, 3), ValueError)])
def test_argmax_locations_rejects_bad_maps(bad, err):
    with pytest.raises(err):
        argmax_locations(bad)


# ------------------------------------------------------------------ clipped maxima and ties
def _clipped_loop(f, clip):
    """Number of channels of a (C, h, w) map whose largest value equals clip (plain loops)."""
    n = 0
    for c in range(f.shape[0]):
        best = -math.inf
        for r in range(f.shape[1]):
            for q in range(f.shape[2]):
                best = max(best, f[c, r, q].item())
        n += best == clip
    return n


@pytest.mark.parametrize("clip", [6.0, 3])
def test_count_clipped_matches_a_loop(clip):
    g = torch.Generator().manual_seed(11)
    f = (torch.randn(3, 40, 4, 5, generator=g) * (clip / 2)).clamp(0, clip)  # about a third of the channels reach clip
    f[0, 7] = 0.0  # dead channel
    f[1, 3] = clip - 1e-3  # close to the clip but below it
    counts = count_clipped(f, clip)
    ref = [_clipped_loop(f[b], clip) for b in range(3)]
    assert counts.tolist() == ref and counts.dtype == torch.int64
    assert 0 < min(ref) and max(ref) < 40
    assert count_clipped(f[2], clip) == ref[2] and isinstance(count_clipped(f[2], clip), int)
    mask = clipped_channels(f, clip)
    assert mask.shape == (3, 40) and mask.dtype == torch.bool and not mask[1, 3] and not mask[0, 7]
    assert count_clipped(f.clamp(max=clip / 2), clip).tolist() == [0, 0, 0]


def test_count_clipped_on_a_real_relu6_map_and_none_on_the_relu_map():
    from skimage import data as skdata

    photo = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float()[None] / 255
    photo = torch.nn.functional.interpolate(photo, size=(224, 288), mode="bilinear", antialias=True)[0]
    m6 = efficientnet_lite(0, last_activation="relu6")
    m1 = efficientnet_lite(0, last_activation="relu")
    f6, f1, pre = fmap_of(m6, photo), fmap_of(m1, photo), fmap_of(m6, photo, pre_activation=True)
    n = count_clipped(f6)
    assert n == _clipped_loop(f6, 6.0) == int((pre.amax(dim=(1, 2)) > 6).sum()) > 0
    assert count_clipped(f1) == 0 and torch.equal(f1, pre.clamp(min=0))


def _rank_loop(values, tiebreak):
    """Sort by (-value, -tiebreak, index) with Python's sort."""
    D = len(values)
    tb = [0.0] * D if tiebreak is None else tiebreak
    return sorted(range(D), key=lambda d: (-values[d], -tb[d], d))


def test_rank_channels_hand_case():
    values = torch.tensor([6.0, 6.0, 2.0, 6.0, 0.0])
    pre = torch.tensor([7.0, 9.0, 100.0, 6.5, -1.0])
    channels, vals = rank_channels(values, tiebreak=pre)
    assert channels.tolist() == [1, 0, 3, 2, 4]  # among the three 6s: pre 9 > 7 > 6.5
    assert vals.tolist() == [6.0, 6.0, 6.0, 2.0, 0.0]
    assert rank_channels(values)[0].tolist() == [0, 1, 3, 2, 4]  # no tiebreak: index order, not topk's
    assert rank_channels(values, k=2, tiebreak=pre)[0].tolist() == [1, 0]


def test_rank_channels_matches_a_sort_with_many_ties():
    g = torch.Generator().manual_seed(12)
    values = torch.randint(0, 4, (5, 50), generator=g).float()
    tb = torch.randint(0, 3, (5, 50), generator=g).float()  # ties in the tiebreak too: index decides
    channels, vals = rank_channels(values, k=17, tiebreak=tb)
    plain, _ = rank_channels(values, k=17)
    for n in range(5):
        assert channels[n].tolist() == _rank_loop(values[n].tolist(), tb[n].tolist())[:17]
        assert plain[n].tolist() == _rank_loop(values[n].tolist(), None)[:17]
        assert torch.equal(vals[n], values[n][channels[n]])


@pytest.mark.parametrize("values, k, tiebreak", [(torch.ones(2, 2, 3), None, None), (np.ones(3), None, None),
                                                 (torch.ones(4), 0, None), (torch.ones(4), 5, None),
                                                 (torch.ones(4), 2, torch.ones(3))])
def test_rank_channels_errors(values, k, tiebreak):
    with pytest.raises(ValueError):
        rank_channels(values, k, tiebreak)


@pytest.mark.parametrize("clip", [None, math.inf, True, "6"])
def test_clipped_channels_errors(clip):
    with pytest.raises(ValueError, match="clip"):
        count_clipped(torch.zeros(2, 3, 3), clip)
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        clipped_channels(torch.zeros(3, 3))


# ------------------------------------------------------------------ theoretical receptive field
@pytest.mark.parametrize("k, s, d, n", [(3, 2, 1, 10), (3, 2, 1, 11), (5, 2, 1, 16), (5, 2, 1, 17),
                                        (3, 1, 1, 9), (5, 1, 2, 12), (1, 1, 1, 7), (4, 3, 1, 13)])
def test_same_padding_matches_the_layer(k, s, d, n):
    """pad_before / out_size agree with the padded convolution Conv2dSame actually runs."""
    spec = ConvSpec(k, s, d, "same")
    assert spec.pad_before(n) == tf_same_padding(n, k, s, d)[0]
    conv = Conv2dSame(1, 1, k, stride=s)
    conv.dilation = (d, d)
    if d != 1:  # the static symmetric padding only holds for undilated kernels
        conv._static, conv.padding = False, (0, 0)
    assert spec.out_size(n) == conv(torch.zeros(1, 1, n, n)).shape[-1]


@pytest.mark.parametrize("k, s, p, d, n", [(7, 2, 3, 1, 31), (3, 2, 1, 1, 16), (3, 1, 0, 2, 12), (2, 2, 0, 1, 9)])
def test_fixed_padding_out_size_matches_torch(k, s, p, d, n):
    spec = ConvSpec(k, s, d, p)
    conv = nn.Conv2d(1, 1, k, stride=s, padding=p, dilation=d)
    assert spec.out_size(n) == conv(torch.zeros(1, 1, n, n)).shape[-1]
    assert spec.pad_before(n) == p


def _positive_linear_net(specs):
    """Convolutions with all-positive weights and no non-linearity: the gradient of an
    output cell is non-zero exactly on its theoretical receptive field."""
    layers = []
    for sp in specs:
        if sp.padding == "same":
            conv = Conv2dSame(1, 1, sp.kernel, stride=sp.stride)
            conv.dilation = (sp.dilation, sp.dilation)
            if sp.dilation != 1:
                conv._static, conv.padding = False, (0, 0)
        else:
            conv = nn.Conv2d(1, 1, sp.kernel, stride=sp.stride, padding=sp.padding, dilation=sp.dilation,
                             bias=False)
        nn.init.constant_(conv.weight, 1.0)
        layers.append(conv)
    return nn.Sequential(*layers)


def _support_box(grad):
    """(x, y, w, h) bounding box of the non-zero entries of a 2-D map (plain loops)."""
    ys, xs = [], []
    for r in range(grad.shape[0]):
        for c in range(grad.shape[1]):
            if grad[r, c] != 0:
                ys.append(r)
                xs.append(c)
    return (min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1)


CHAINS = [
    [ConvSpec(3, 2, 1, "same"), ConvSpec(3, 1, 1, "same"), ConvSpec(5, 2, 1, "same"), ConvSpec(1, 1, 1, "same")],
    [ConvSpec(7, 2, 1, 3), ConvSpec(3, 2, 1, 1), ConvSpec(3, 1, 1, 1), ConvSpec(3, 2, 1, 1)],
    [ConvSpec(3, 1, 2, 2), ConvSpec(5, 2, 1, "same"), ConvSpec(3, 2, 1, 0), ConvSpec(3, 1, 1, "same")],
]


@pytest.mark.parametrize("chain", CHAINS, ids=["same", "fixed", "mixed-dilated"])
@pytest.mark.parametrize("H, W", [(37, 40), (41, 33)])
def test_receptive_field_equals_gradient_support(chain, H, W):
    net = _positive_linear_net(chain)
    x = torch.ones(1, 1, H, W, requires_grad=True)
    out = net(x)
    rf_y, rf_x = receptive_field(chain, H), receptive_field(chain, W)
    assert (rf_y.n_cells, rf_x.n_cells) == tuple(out.shape[-2:])
    h, w = out.shape[-2:]
    cells = [(0, 0), (h - 1, w - 1), (h // 2, w // 2), (0, w - 1)]
    for r, c in cells:
        (g,) = torch.autograd.grad(out[0, 0, r, c], x, retain_graph=True)
        expect = _support_box(g[0, 0])
        got = cell_boxes([(r, c)], rf_y, rf_x)[0]
        assert tuple(got) == expect, (r, c, got, expect)


def test_efficientnet_lite0_receptive_field_is_851_px_with_stride_32(lite0):
    chain = conv_chain(lite0)
    assert len(chain) == 49  # stem + 16 blocks (15 with expansion: 3 convs, 1 without: 2) + head
    for n in (224, 341, 512, 383, 97):
        rf = receptive_field(chain, n)
        assert (rf.size, rf.stride) == (851, 32)
        assert rf.n_cells == math.ceil(n / 32)


def test_efficientnet_lite0_field_equals_gradient_support_through_the_real_blocks():
    """The real Lite0 modules (with residual shortcuts, BN, ReLU6) made linear and positive:
    tiny positive inputs keep every ReLU6 in its linear range, so the gradient's support
    is the theoretical receptive field, clipped to the image."""
    torch.manual_seed(0)
    model = efficientnet_lite(0, pretrained=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / (m.weight[0].numel()))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
    # heights / widths of 481 and 470 px (odd, not multiples of 32: asymmetric TF "SAME"
    # padding) are enough to see both edges of the corner cells' fields along that axis
    for H, W in ((481, 40), (40, 470)):
        image = torch.full((3, H, W), 0.505)  # normalised: 0.01, positive
        rf_y, rf_x = receptive_field(conv_chain(model), H), receptive_field(conv_chain(model), W)
        cells = torch.tensor([[5, 0, 0], [9, rf_y.n_cells - 1, rf_x.n_cells - 1]])
        g = input_gradients(model, image, cells, batch_size=2, pre_activation=False)
        for k, (_, r, c) in enumerate(cells.tolist()):
            assert tuple(cell_boxes([(r, c)], rf_y, rf_x)[0]) == _support_box(g[k])


def test_resnet_chains_match_the_hand_derivation():
    """torchvision ResNet (stride in the 3x3 conv2): conv1 7/2 -> R=7, J=2; max-pool 3/2 ->
    R=11, J=4; layer1: 3 blocks x 2*4 -> 35; layer2: first block 2*4 -> 43, J=8, then
    3 x 2*8 -> 91; layer3: first 2*8 -> 107, J=16, then (n-1) x 32; layer4: first 2*16,
    J=32, then 2 x 64. ResNet-50 (6 blocks in layer3): 107+160 = 267 -> 299 -> 427.
    ResNet-101 (23 blocks): 107+704 = 811 -> 843 -> 971."""
    with torch.device("meta"):  # structure and shapes only: no weights are initialised
        for depth, size in ((50, 427), (101, 971)):
            net = resnet(depth, pretrained=False)
            rf = receptive_field(conv_chain(net), 224)
            assert (rf.size, rf.stride) == (size, 32)
            for n in (224, 161):
                assert receptive_field(conv_chain(net), n).n_cells == net.features(torch.zeros(1, 3, n, 32)).shape[2]
        net1 = resnet(50, pretrained=False, last_stride=1)
        assert receptive_field(conv_chain(net1), 224).stride == 16


def test_cell_centers_and_unclipped_boxes():
    rf = receptive_field([ConvSpec(3, 2, 1, 1), ConvSpec(3, 2, 1, 1)], 16)  # R=7, J=4, start=-3
    assert (rf.size, rf.stride, rf.start, rf.n_cells) == (7, 4, -3, 4)
    box = cell_boxes([(0, 3)], rf, rf, clip=False)[0]
    assert tuple(box) == (-3 + 12, -3, 7, 7)
    assert tuple(cell_boxes([(0, 3)], rf, rf)[0]) == (9, 0, 7, 4)  # clipped to [0, 16)
    assert np.allclose(cell_centers([(1, 2)], rf, rf), [[-3 + 8 + 3.5, -3 + 4 + 3.5]])


def test_receptive_field_errors():
    with pytest.raises(ValueError, match="positive number of pixels"):
        receptive_field([ConvSpec(3)], 0)
    with pytest.raises(ValueError, match="empty"):
        receptive_field([], 32)
    with pytest.raises(TypeError, match="ConvSpec"):
        receptive_field([(3, 2)], 32)
    with pytest.raises(ValueError, match="no cells"):
        receptive_field([ConvSpec(7, 1, 1, 0)], 5)
    rf = receptive_field([ConvSpec(3, 2, 1, 1)], 8)
    with pytest.raises(ValueError, match="must lie in"):
        cell_boxes([(4, 0)], rf, rf)
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        cell_boxes([1, 2, 3], rf, rf)


def test_conv_chain_errors():
    with pytest.raises(TypeError, match="ConvSpec along its deepest path"):
        conv_chain(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match="non-square"):
        rf_mod._spec(nn.Conv2d(1, 1, (3, 5)))
    with pytest.raises(ValueError, match="ceil_mode"):
        rf_mod._spec(nn.MaxPool2d(3, 2, ceil_mode=True))
    with pytest.raises(TypeError, match="cannot describe"):
        rf_mod._spec(nn.ReLU())
    assert rf_mod._spec(nn.MaxPool2d(3, 2, 1)) == ConvSpec(3, 2, 1, 1)


# ------------------------------------------------------------------ effective receptive field
def test_input_gradients_batched_equal_one_cell_at_a_time(lite0):
    """The copies-in-a-batch trick gives the same maps as one backward pass per cell."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 40, 56, generator=g)
    cells = torch.tensor([[0, 0, 0], [17, 1, 0], [1279, 0, 1]])
    got = input_gradients(lite0, image, cells, batch_size=2)
    got_post = input_gradients(lite0, image, cells, batch_size=3, pre_activation=False)
    for k, (c, r, q) in enumerate(cells.tolist()):
        for pre, maps in ((True, got), (False, got_post)):
            x = lite0.normalize(image)[None].clone().requires_grad_(True)
            store = {}
            handle = lite0._bn1.register_forward_hook(lambda m, i, o: store.__setitem__("o", o))
            out = lite0.features(x)
            handle.remove()
            act = (store["o"] if pre else out)[0, c, r, q]
            (ref,) = torch.autograd.grad(act, x)
            assert torch.allclose(maps[k], ref[0].abs().sum(0), rtol=1e-4, atol=1e-7)
    assert got.shape == (3, 40, 56) and (got >= 0).all()
    assert not any(p.grad is not None for p in lite0.parameters())


def test_input_gradients_accepts_pil_and_uint8(lite0):
    from PIL import Image

    arr = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    cells = [[3, 0, 1]]
    a = input_gradients(lite0, Image.fromarray(arr), cells)
    b = input_gradients(lite0, arr, cells)
    c = input_gradients(lite0, torch.from_numpy(arr).permute(2, 0, 1).float() / 255, cells)
    assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-6)


def test_fmap_of_equals_the_backbone_on_the_normalised_image(lite0):
    from PIL import Image

    arr = (np.random.default_rng(1).random((45, 61, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        ref = lite0.features(lite0.normalize(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)[None])[0]
    got = fmap_of(lite0, Image.fromarray(arr))
    assert got.shape == (1280, 2, 2) and got.device.type == "cpu"
    assert torch.allclose(got, ref, atol=1e-6)


def test_pre_activation_map_clips_to_the_map_and_breaks_its_ties(lite0):
    """ReLU6 is monotone, so the maximum of the map before it is one of the tied maxima after it."""
    image = torch.rand(3, 96, 64, generator=torch.Generator().manual_seed(8))
    post, pre = fmap_of(lite0, image), fmap_of(lite0, image, pre_activation=True)
    assert torch.allclose(pre.clamp(0, 6), post, atol=1e-6)
    assert torch.equal(argmax_locations(post, tiebreak=pre)[0], argmax_locations(pre)[0])
    with torch.device("meta"):
        net = resnet(50, pretrained=False)
        with pytest.raises(ValueError, match="EfficientNet-Lite"):
            fmap_of(net, torch.rand(3, 32, 32), pre_activation=True)


def test_input_gradients_errors(lite0):
    image = torch.rand(3, 40, 40)
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        input_gradients(lite0, image, [[1, 2]])
    with pytest.raises(ValueError, match="outside"):
        input_gradients(lite0, image, [[0, 5, 0]])
    with pytest.raises(ValueError, match="batch_size"):
        input_gradients(lite0, image, [[0, 0, 0]], batch_size=0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        input_gradients(lite0, torch.rand(40, 40), [[0, 0, 0]])
    with pytest.raises(ValueError, match=r"RGB image"):
        input_gradients(lite0, np.zeros((40, 40)), [[0, 0, 0]])
    lite0.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            input_gradients(lite0, image, [[0, 0, 0]])
    finally:
        lite0.eval()


def _mass_box_loop(H, mass):
    total = H.sum()

    def span(marg):
        acc, lo, hi = 0.0, None, None
        for i, v in enumerate(marg):
            acc += v
            if lo is None and acc / total >= (1 - mass) / 2 - 1e-12:
                lo = i
            if hi is None and acc / total >= (1 + mass) / 2 - 1e-12:
                hi = i
        return lo, (len(marg) - 1 if hi is None else hi)

    y0, y1 = span([sum(row) for row in H.tolist()])
    x0, x1 = span([sum(col) for col in H.T.tolist()])
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


@pytest.mark.parametrize("mass", [0.5, 0.9, 1.0])
def test_mass_box_matches_a_loop(mass):
    rng = np.random.default_rng(4)
    for _ in range(5):
        H = rng.random((13, 17)) ** 4
        assert mass_box(H, mass) == _mass_box_loop(H, mass)
        assert mass_box(torch.from_numpy(H), mass) == _mass_box_loop(H, mass)


def test_mass_box_hand_cases():
    H = np.zeros((9, 12))
    H[4, 7] = 2.0
    assert mass_box(H, 0.9) == (7.0, 4.0, 1.0, 1.0)
    assert mass_box(np.ones((6, 8)), 1.0) == (0.0, 0.0, 8.0, 6.0)
    # a uniform 10-column strip: the central 50 % is 5 columns, from index 2 (F=0.3 >= 0.25) to 7
    assert mass_box(np.ones((1, 10)), 0.5) == (2.0, 0.0, 6.0, 1.0)


@pytest.mark.parametrize("bad, mass", [(np.zeros((3, 3)), 0.5), (-np.ones((3, 3)), 0.5), (np.ones(5), 0.5),
                                       (np.ones((3, 3)), 0.0), (np.ones((3, 3)), 1.5),
                                       (np.full((2, 2), np.nan), 0.5)])
def test_mass_box_errors(bad, mass):
    with pytest.raises(ValueError):
        mass_box(bad, mass)


# ------------------------------------------------------------------ contributions and correspondences
def test_top_channels_matches_sorting_the_products():
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 4, 30, generator=g)
    channels, values, share = top_channels(x, y, k=6)
    for n in range(4):
        prods = [(x[n, d] * y[n, d]).item() for d in range(30)]
        order = sorted(range(30), key=lambda d: -prods[d])[:6]
        assert channels[n].tolist() == order
        assert torch.allclose(values[n], torch.tensor([prods[d] for d in order]))
        assert torch.allclose(share[n], values[n] / sum(prods))
    assert top_channels(x[0], y[0], k=np.int64(6))[0].tolist() == channels[0].tolist()
    full = top_channels(x[0], y[0], k=30)[2]
    assert torch.isclose(full.sum(), torch.tensor(1.0))


def test_top_channels_breaks_equal_terms_by_the_tiebreak():
    """Three channels clipped at 6 in both images give three equal terms; the tiebreak
    (e.g. the product of the maxima before the clip) orders them, then the index."""
    x = l2n(torch.tensor([6.0, 6.0, 6.0, 1.0, 6.0]))
    y = l2n(torch.tensor([6.0, 6.0, 6.0, 2.0, 0.1]))
    prod = x * y
    assert prod[0] == prod[1] == prod[2]  # exactly tied
    tb = torch.tensor([7.0 * 8.0, 9.0 * 6.5, 6.1 * 6.1, 0.0, 0.0])
    channels, values, share = top_channels(x, y, k=4, tiebreak=tb)
    assert channels.tolist() == [1, 0, 2, 3]  # 58.5 > 56 > 37.21, then the smaller term
    assert torch.equal(values, prod[[1, 0, 2, 3]])
    assert top_channels(x, y, k=3)[0].tolist() == [0, 1, 2]  # without a tiebreak: index order
    both = top_channels(torch.stack([x, y]), torch.stack([y, x]), k=2, tiebreak=torch.stack([tb, tb.flip(0)]))[0]
    assert both.tolist() == [[1, 0], [2, 0]]  # flipped tiebreak: 37.21 for channel 2, 0 for 0 and 1
    with pytest.raises(ValueError, match="tiebreak"):
        top_channels(x, y, k=2, tiebreak=tb[:3])


@pytest.mark.parametrize("x, y, k, err", [(torch.ones(5), torch.ones(4), 2, ValueError),
                                          (torch.ones(5), torch.ones(5), 0, ValueError),
                                          (torch.ones(5), torch.ones(5), 6, ValueError),
                                          (torch.ones(2, 2, 5), torch.ones(2, 2, 5), 1, ValueError),
                                          (np.ones(5), np.ones(5), 1, TypeError)])
def test_top_channels_errors(x, y, k, err):
    with pytest.raises(err):
        top_channels(x, y, k)


def test_implicit_correspondences_match_a_plain_reference():
    g = torch.Generator().manual_seed(6)
    fa, fb = torch.rand(24, 5, 7, generator=g), torch.rand(24, 4, 6, generator=g)
    res = implicit_correspondences(fa, fb, k=4)
    assert isinstance(res, Correspondences)
    la, va = _argmax_loop(fa)
    lb, vb = _argmax_loop(fb)
    x, y = va / va.norm(), vb / vb.norm()
    prods = [(x[c] * y[c]).item() for c in range(24)]
    order = sorted(range(24), key=lambda c: -prods[c])[:4]
    assert res.channels.tolist() == order
    assert torch.equal(res.loc_a, la[order]) and torch.equal(res.loc_b, lb[order])
    assert math.isclose(res.similarity, sum(prods), rel_tol=1e-5)
    assert torch.allclose(res.share, torch.tensor(prods)[order] / sum(prods), rtol=1e-4)


def test_implicit_correspondences_use_the_tiebreaks():
    g = torch.Generator().manual_seed(9)
    fa, fb = torch.randint(0, 3, (16, 4, 5), generator=g).float(), torch.randint(0, 3, (16, 3, 3), generator=g).float()
    ta, tb = torch.randn(16, 4, 5, generator=g), torch.randn(16, 3, 3, generator=g)
    res = implicit_correspondences(fa, fb, k=3, tiebreak_a=ta, tiebreak_b=tb)
    assert torch.equal(res.loc_a, argmax_locations(fa, ta)[0][res.channels])
    assert torch.equal(res.loc_b, argmax_locations(fb, tb)[0][res.channels])


def test_implicit_correspondences_errors():
    with pytest.raises(ValueError, match="same backbone"):
        implicit_correspondences(torch.rand(8, 3, 3), torch.rand(9, 3, 3))
    with pytest.raises(ValueError, match="one map"):
        implicit_correspondences(torch.rand(1, 8, 3, 3), torch.rand(8, 3, 3))


def test_implicit_correspondences_rank_clipped_terms_by_the_pre_activation():
    """Hand-made pre-activation maps: channels 0-2 clip at 6 in both images, so their MAC
    terms tie; the pre-activation maxima (8*7, 6.5*6.5, 9*9) put channel 2 first, then 0, then 1."""
    za = torch.full((4, 2, 3), -1.0)
    zb = torch.full((4, 3, 2), -1.0)
    za[0, 0, 1], za[1, 1, 2], za[2, 1, 0], za[3, 0, 0] = 8.0, 6.5, 9.0, 3.0
    zb[0, 2, 1], zb[1, 0, 0], zb[2, 1, 1], zb[3, 2, 0] = 7.0, 6.5, 9.0, 2.0
    za[2, 0, 2] = 6.2  # a second clipped cell in channel 2 of A: the arg-max must pick (1, 0)
    fa, fb = za.clamp(0, 6), zb.clamp(0, 6)
    res = implicit_correspondences(fa, fb, k=3, tiebreak_a=za, tiebreak_b=zb)
    assert res.channels.tolist() == [2, 0, 1]
    assert res.loc_a.tolist() == [[1, 0], [0, 1], [1, 2]]
    assert res.loc_b.tolist() == [[1, 1], [2, 1], [0, 0]]
    assert res.contributions[0] == res.contributions[1] == res.contributions[2]
    # one tiebreak only: the other image's own (clipped) maxima stand in, 9 > 8 > 6.5 in A
    one = implicit_correspondences(fa, fb, k=3, tiebreak_a=za)
    assert one.channels.tolist() == [2, 0, 1]
    assert implicit_correspondences(fa, fb, k=3).channels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="tiebreak_b"):
        implicit_correspondences(fa, fb, k=3, tiebreak_b=za)


def test_fmap_of_pre_activation_is_the_backbones_preactivation():
    m6 = efficientnet_lite(0, pretrained=False, last_activation="relu6")
    m1 = efficientnet_lite(0, pretrained=False, last_activation="relu")
    m1.load_state_dict(m6.state_dict())
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ref = m6.preactivation(m6.normalize(image)[None])[0]
    pre6, pre1 = fmap_of(m6, image, pre_activation=True), fmap_of(m1, image, pre_activation=True)
    assert torch.equal(pre6, ref) and torch.equal(pre1, ref)
    assert torch.equal(fmap_of(m6, image), ref.clamp(0, 6)) and torch.equal(fmap_of(m1, image), ref.clamp(min=0))


def test_input_gradients_batches_by_pixels_not_count(lite0, monkeypatch):
    image = torch.rand(3, 40, 48)
    cells = [[0, 0, 0], [1, 1, 1], [2, 0, 1], [3, 1, 0], [4, 0, 0]]
    one_by_one = input_gradients(lite0, image, cells, batch_size=1)
    sizes = []
    run = lite0.preactivation

    def counting(x):
        sizes.append(x.shape[0])
        return run(x)

    monkeypatch.setattr(lite0, "preactivation", counting)
    monkeypatch.setattr(rf_mod, "GRADIENT_PIXELS", 2 * 40 * 48 + 1)  # two copies of this image per pass
    got = input_gradients(lite0, image, cells)
    assert sizes == [2, 2, 1]
    torch.testing.assert_close(got, one_by_one, rtol=1e-5, atol=1e-7)
    sizes.clear()
    monkeypatch.setattr(rf_mod, "GRADIENT_PIXELS", 10)  # smaller than one image: still one copy per pass
    input_gradients(lite0, image, cells[:2])
    assert sizes == [1, 1]


def test_conv_chain_reads_the_backbone_declaration():
    """conv_chain is the backbone's own conv_path(); a backbone without one is refused by name."""
    from retrieval_lib.models.base import Backbone

    class Tiny(Backbone):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.MaxPool2d(2)

        def conv_path(self):
            return [self.a, self.b]

    assert conv_chain(Tiny()) == [ConvSpec(3, 2, 1, 1), ConvSpec(2, 2, 1, 0)]

    class Silent(Backbone):
        pass

    with pytest.raises(TypeError, match="lists its conv_path"):
        conv_chain(Silent())
