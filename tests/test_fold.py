"""BatchNorm folding for inference: the formula, the backbones, and extraction's default."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from retrieval_lib.engine import extract as extract_mod
from retrieval_lib.engine import fold as fold_mod
from retrieval_lib.engine.extract import extract_fmaps
from retrieval_lib.engine.fold import fold_batchnorm, foldable
from retrieval_lib.data.images import ImageList
from retrieval_lib.models.backbones import ResNetBackbone, efficientnet_lite


def _random_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def lite():
    torch.manual_seed(0)
    return _random_bn_stats(efficientnet_lite(0, pretrained=False))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    return _random_bn_stats(ResNetBackbone(net, "resnet18"))


def _count_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_one_conv_bn_pair_by_the_formula():
    """w' = w·γ/√(σ²+ε), b' = (b−μ)·γ/√(σ²+ε) + β, checked by hand on one pair."""
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)
    _random_bn_stats(nn.Sequential(conv, bn))
    seq = nn.Sequential(conv, bn).eval()
    n = fold_mod._fold_children(seq, (nn.Sequential,))
    assert n == 1 and isinstance(seq[1], nn.Identity)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(seq[0].weight, conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(seq[0].bias, (conv.bias - bn.running_mean) * scale + bn.bias)


@pytest.mark.parametrize("which", ["lite", "resnet"])
def test_folded_backbone_equals_the_original(which, request):
    model = request.getfixturevalue(which)
    n_bn = _count_bn(model)
    folded = fold_batchnorm(model)
    assert n_bn > 0 and _count_bn(folded) == 0  # every BatchNorm folded
    assert _count_bn(model) == n_bn  # the original untouched
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, got = model.features(x), folded.features(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()  # float32 rounding, relative


def test_unknown_layout_is_refused():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    assert not foldable(Other())
    with pytest.raises(ValueError, match="don't know where the BatchNorms"):
        fold_batchnorm(Other())


def test_check_catches_a_wrong_fold(lite, monkeypatch):
    def wrong(module, in_order):  # folds, then breaks one weight: what a wrong order would do
        n = real(module, in_order)
        if hasattr(module, "_conv_head"):
            module._conv_head.bias.data.add_(1.0)
        return n

    real = fold_mod._fold_children
    monkeypatch.setattr(fold_mod, "_fold_children", wrong)
    with pytest.raises(ValueError, match="differs from the original"):
        fold_batchnorm(lite)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fold_imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(120, 90), (90, 120), (100, 100)]):
        img = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        paths.append(str(folder / f"p{i}.jpg"))
        img.save(paths[-1], quality=95)
    return ImageList(paths)


def test_extraction_folds_by_default_on_cpu_and_keys_the_cache_apart(lite, photos, tmp_path, monkeypatch):
    calls = []
    real = extract_mod.fold_batchnorm
    monkeypatch.setattr(extract_mod, "fold_batchnorm", lambda m: calls.append(1) or real(m))
    folded = extract_fmaps(lite, photos, image_size=96, num_workers=0, progress=False, cache_dir=tmp_path)
    assert calls, "the default CPU extraction did not fold"
    plain = extract_fmaps(lite, photos, image_size=96, num_workers=0, progress=False, cache_dir=tmp_path,
                          fold_bn=False, channels_last=False)
    assert len(calls) == 1  # the second call ran the model as it is
    assert len(list(tmp_path.glob("*.pt"))) == 2  # one entry per numerics, never shared
    for a, b in zip(folded, plain):
        assert (a - b).abs().max().item() < 1e-4
    assert _count_bn(lite) > 0 and not lite.training  # the caller's model untouched


def test_fold_bn_true_is_refused_for_a_training_model(photos):
    model = efficientnet_lite(0, pretrained=False).train()
    with pytest.raises(ValueError, match="training mode"):
        extract_fmaps(model, photos, image_size=64, num_workers=0, progress=False, fold_bn=True)


def test_plan_defaults():
    model = efficientnet_lite(0, pretrained=False).eval()
    cpu = extract_mod._plan(model, "cpu", None, None, None)
    assert cpu == {"amp": False, "fold_bn": True, "channels_last": True, "numerics": "fp32-bnfold-cl"}
    assert extract_mod._plan(model, "cpu", None, False, None)["numerics"] == "fp32"
    assert extract_mod._plan(model.train(), "cpu", None, None, None)["fold_bn"] is False


def test_multiscale_extraction_folds_once(lite, photos, monkeypatch):
    from retrieval_lib.engine.extract import extract_descriptors

    calls = []
    real = extract_mod.fold_batchnorm
    monkeypatch.setattr(extract_mod, "fold_batchnorm", lambda m: calls.append(1) or real(m))
    X = extract_descriptors(lite, photos, "mac", scales=(1, 0.5), image_size=96, num_workers=0, progress=False)
    assert X.shape[0] == 3 and len(calls) == 1  # one folded copy serves every scale


def test_a_backbone_that_declares_no_order_is_not_folded():
    """foldable reads the backbone's declaration (in_order_modules), not its class name."""
    from retrieval_lib.models.base import Backbone

    class Plain(Backbone):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    class Declared(Plain):
        def in_order_modules(self):
            return (Declared,)

        def features(self, x):
            return self.bn(self.conv(x))

    assert not foldable(Plain()) and foldable(Declared())
    folded = fold_batchnorm(_random_bn_stats(Declared()).eval())
    assert _count_bn(folded) == 0 and isinstance(folded.bn, nn.Identity)
