"""The released networks: registry, safe loading, the authors' forward, checked downloads.

Each format gets a small checkpoint with random weights in the authors' key layout; the
network ``load_network`` builds from it is compared with the authors' forward written out
here from their code (cirtorch: ``ImageRetrievalNet.forward``, ``extract_ms``, ``whitenapply``;
dirtorch: ``ResNet_RMAC.forward``, ``whiten_features``), on torchvision's ResNet-50 at 64 px.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import re
import sys
import threading
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from retrieval_lib.data.download import ChecksumError, DownloadError
from retrieval_lib.errors import FetchError, MissingDataError, UnsafeCheckpointError, UsageError
from retrieval_lib.models import registry, released
from retrieval_lib.models.released import fetch_network, hash_prefix, load_network, released_networks, safe_load

TOL = dict(rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- registry
def test_registry_has_every_field_and_consistent_urls():
    nets = released_networks()
    expected = {"retrievalSfM120k-vgg16-gem", "retrievalSfM120k-resnet101-gem", "rSfM120k-tl-resnet50-gem-w",
                "rSfM120k-tl-resnet101-gem-w", "rSfM120k-tl-resnet152-gem-w", "gl18-tl-resnet50-gem-w",
                "gl18-tl-resnet101-gem-w", "gl18-tl-resnet152-gem-w", "imagenet-caffe-resnet101",
                "retrieval-SfM-120k-resnet101-gem-whiten", "Resnet101-TL-MAC", "Resnet101-TL-GeM",
                "Resnet50-AP-GeM", "Resnet101-AP-GeM"}
    assert expected <= set(nets)
    for name, n in nets.items():
        assert n.name == name
        for f in ("paper", "format", "url", "architecture", "pooling", "whitening", "normalisation", "source"):
            assert getattr(n, f), (name, f)
        assert {"script", "scales", "msp", "resize"} <= set(n.setting), name
        if n.drive_id is None:  # cmp.felk.cvut.cz: the hash is the one in the file name
            assert n.url.startswith("http://cmp.felk.cvut.cz/cnnimageretrieval/data/")
            assert hash_prefix(n.file_name) == n.sha256_prefix and re.fullmatch(r"[0-9a-f]{7}", n.sha256_prefix)
            stem = n.file_name.rsplit("-", 1)[0]
            assert stem.replace("-features", "") == name or stem == name, name
        else:
            assert n.sha256_prefix is None and n.drive_id in n.url and n.file_name.endswith(".pt")
        for num in n.numbers:
            assert num["file"] in ("named", "implied") and 0 < num["value"] < 100 and num["table"] and num["row"]
        assert n.as_dict()["file_name"] == n.file_name


def test_registry_numbers_match_the_readmes():
    nets = released_networks()

    def get(name, ds, prot):
        return next(x["value"] for x in nets[name].numbers if x["dataset"] == ds and x["protocol"] == prot)

    assert [get("retrievalSfM120k-resnet101-gem", d, p) for d, p in
            (("roxford5k", "medium"), ("rparis6k", "medium"), ("roxford5k", "hard"), ("rparis6k", "hard"))] == \
        [65.4, 76.7, 40.1, 55.2]
    assert get("rSfM120k-tl-resnet101-gem-w", "roxford5k", "medium") == 67.8
    assert get("gl18-tl-resnet101-gem-w", "rparis6k", "hard") == 61.5
    assert get("Resnet101-AP-GeM", "roxford5k", "medium") == 67.1 and get("Resnet101-TL-MAC", "rparis6k", "hard") == 55.5
    # the README does not name the file behind the PyTorch rows: recorded as implied, never as named
    assert {x["file"] for x in nets["retrievalSfM120k-vgg16-gem"].numbers} == {"implied"}
    assert nets["rSfM120k-tl-resnet101-gem-w"].setting["scales"] == [1.0, 2 ** 0.5, 2 ** -0.5]
    assert nets["retrievalSfM120k-resnet101-gem"].setting["scales"] == [1.0, 2 ** -0.5, 0.5]


def test_unknown_name_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown released network"):
        load_network("resnet101-no-such-net")
    with pytest.raises(UsageError, match="unknown released network"):
        fetch_network("nope")


# ----------------------------------------------------------------------------- checkpoints
def _randomise_bn(net: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@functools.lru_cache(maxsize=None)
def _features(depth=50, seed=0):
    """torchvision's ResNet cut as cirtorch cuts it, random weights (built once per seed: tests only read it)."""
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    _randomise_bn(tv, seed)
    return nn.Sequential(*list(tv.children())[:-2]).eval()  # cirtorch's cut: conv1 ... layer4


def _cirtorch_ckpt(path, whitening: bool, lw: bool, legacy_bn=False):
    """A cirtorch checkpoint: {'state_dict': features.N.*, pool.p, whiten.*; 'meta': {..., 'Lw'}}."""
    feats = _features()
    sd = {f"features.{k}": v.clone() for k, v in feats.state_dict().items()
          if not (legacy_bn and k.endswith("num_batches_tracked"))}
    sd["pool.p"] = torch.tensor([2.7])
    rng = np.random.default_rng(0)
    if whitening:
        sd["whiten.weight"] = torch.randn(2048, 2048) / 45
        sd["whiten.bias"] = torch.randn(2048) * 0.01
    meta = {"architecture": "resnet50", "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": whitening, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "outputdim": 2048}
    if lw:
        meta["Lw"] = {"retrieval-SfM-120k": {k: {"m": rng.normal(size=(2048, 1)) * 0.01,
                                                 "P": rng.normal(size=(2048, 2048)) / 45} for k in ("ss", "ms")}}
    torch.save({"state_dict": sd, "meta": meta, "epoch": 3}, path)
    return feats, sd, meta


def _cir_forward(feats, sd, x):
    """cirtorch's ImageRetrievalNet.forward: features -> GeM -> l2n -> (whiten -> l2n)."""
    p = sd["pool.p"].item()
    o = feats(x)
    o = F.avg_pool2d(o.clamp(min=1e-6).pow(p), (o.size(-2), o.size(-1))).pow(1.0 / p)
    o = o / (torch.norm(o, p=2, dim=1, keepdim=True) + 1e-6)
    o = o.squeeze(-1).squeeze(-1)
    if "whiten.weight" in sd:
        o = F.linear(o, sd["whiten.weight"], sd["whiten.bias"])
        o = o / (torch.norm(o, p=2, dim=1, keepdim=True) + 1e-6)
    return o


def _cir_ms(feats, sd, x, ms, msp):
    """cirtorch's extract_ms on one image (PyTorch 1.0's interpolate: the grid follows the output size)."""
    v = 0
    for s in ms:
        xt = x.clone() if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                    recompute_scale_factor=True)
        v = v + _cir_forward(feats, sd, xt).pow(msp)
    v = (v / len(ms)).pow(1.0 / msp)
    return v / v.norm(dim=-1, keepdim=True)


def _whitenapply(X_dn, m, P):
    """cirtorch/utils/whiten.py whitenapply, D x N columns, numpy."""
    X = np.dot(P, X_dn - m)
    return X / (np.linalg.norm(X, ord=2, axis=0, keepdims=True) + 1e-6)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 64, 72, generator=g)


@pytest.mark.parametrize("whitening", [False, True])
def test_cirtorch_forward_equals_the_authors(tmp_path, images, whitening):
    feats, sd, meta = _cirtorch_ckpt(tmp_path / "net.pth", whitening=whitening, lw=not whitening)
    net = load_network(tmp_path / "net.pth")
    assert net.info["format"] == "cirtorch" and net.info["whitening"] == whitening
    with torch.no_grad():
        ours, ref = net(images), _cir_forward(feats, sd, images)
        assert ours.shape == (2, 2048)
        torch.testing.assert_close(ours, ref, **TOL)
        # multi-scale with test.py's msp rule: GeM's p without a whitening layer, else 1
        ms = [1, 1 / 2 ** 0.5, 1 / 2]
        msp = released.cirtorch_msp(net.info, ms)
        assert msp == (1.0 if whitening else pytest.approx(2.7))
        for i in range(2):  # cirtorch extracts one image at a time
            x = images[i:i + 1]
            torch.testing.assert_close(net.multiscale(x, ms, msp), _cir_ms(feats, sd, x, ms, msp), **TOL)
        if not whitening:  # post-processing Lw, single- and multi-scale matrices
            X = torch.cat([net.multiscale(images[i:i + 1], ms, msp) for i in range(2)])
            for key, multi in (("ss", False), ("ms", True)):
                L = meta["Lw"]["retrieval-SfM-120k"][key]
                ref_w = _whitenapply(X.double().numpy().T, L["m"], L["P"]).T
                np.testing.assert_allclose(net.post_whiten(X, multiscale=multi).numpy(), ref_w, rtol=1e-4, atol=1e-6)


def test_a_released_network_is_the_librarys_retrieval_net(tmp_path, images):
    from retrieval_lib.models.retrieval_net import RetrievalNet

    feats, sd, meta = _cirtorch_ckpt(tmp_path / "net.pth", whitening=True, lw=False)
    net = load_network(tmp_path / "net.pth")
    assert isinstance(net, RetrievalNet) and isinstance(net.whiten, nn.Linear)
    small = torch.nn.functional.interpolate(images[:1], size=(48, 40), mode="bilinear", align_corners=False)
    with torch.no_grad():  # RetrievalNet's list input: images of different sizes in one call, order kept
        got = net([images[0], small[0], images[1]])
        torch.testing.assert_close(got, torch.cat([_cir_forward(feats, sd, images[:1]), _cir_forward(feats, sd, small),
                                                   _cir_forward(feats, sd, images[1:])]), **TOL)


def test_cirtorch_legacy_checkpoint_without_num_batches_tracked(tmp_path, images):
    feats, sd, _ = _cirtorch_ckpt(tmp_path / "old.pth", whitening=False, lw=False, legacy_bn=True)
    with torch.no_grad():
        torch.testing.assert_close(load_network(tmp_path / "old.pth")(images), _cir_forward(feats, sd, images), **TOL)


def test_cirtorch_features_file_with_fc_whitening(tmp_path, images):
    feats = _features(seed=1)
    torch.save({k: v for k, v in feats.state_dict().items()}, tmp_path / "imagenet-caffe-resnet50-features-0000000.pth")
    W = {"weight": torch.randn(2048, 2048) / 45, "bias": torch.randn(2048) * 0.01}
    torch.save(W, tmp_path / "w.pth")
    net = load_network(tmp_path / "imagenet-caffe-resnet50-features-0000000.pth", whitening=str(tmp_path / "w.pth"))
    sd = {"pool.p": torch.tensor([3.0]), "whiten.weight": W["weight"], "whiten.bias": W["bias"]}
    with torch.no_grad():
        torch.testing.assert_close(net(images), _cir_forward(feats, sd, images), **TOL)


class _FakePCA:
    """Pickled under scikit-learn's name, the way dirtorch stores its whitening."""


@pytest.fixture
def sklearn_names(monkeypatch):
    """Make `sklearn.decomposition._pca.PCA` picklable without scikit-learn installed."""
    for mod in ("sklearn", "sklearn.decomposition", "sklearn.decomposition._pca"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    _FakePCA.__module__, _FakePCA.__qualname__ = "sklearn.decomposition._pca", "PCA"
    sys.modules["sklearn.decomposition._pca"].PCA = _FakePCA
    return _FakePCA


def _dirtorch_ckpt(path, pca_cls, pooling="gem", norm_features=False):
    torch.manual_seed(5)
    tv = torchvision.models.resnet50(weights=None)
    _randomise_bn(tv, 5)
    body = nn.Sequential(*list(tv.children())[:-2]).eval()
    sd = {f"module.{k}": v.clone() for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    if pooling == "gem":
        sd["module.adpool.p"] = torch.tensor([3.2])
    sd["module.fc.weight"] = torch.randn(128, 2048) / 45
    sd["module.fc.bias"] = torch.randn(128) * 0.01
    rng = np.random.default_rng(1)
    pca = pca_cls()
    pca.__dict__.update(mean_=rng.normal(size=128) * 0.01, components_=np.linalg.qr(rng.normal(size=(128, 128)))[0],
                        explained_variance_=rng.uniform(0.1, 2, size=128), whiten=True, n_components=None,
                        noise_variance_=np.float64(0.0), _sklearn_version="0.20.3")
    opts = {"arch": "resnet50_rmac", "out_dim": 128, "pooling": pooling, "gemp": 3, "without_fc": False,
            "norm_features": norm_features, "dropout_p": None}
    torch.save({"model_options": opts, "state_dict": sd, "epoch": 9, "best_score": 0.5,
                "preprocess": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": 224},
                "pca": pca}, path)
    return body, {k[len("module."):]: v for k, v in sd.items()}, pca


def _dir_forward(body, sd, x, pooling, norm_features):
    """dirtorch's ResNet_RMAC.forward: backbone -> adpool -> (L2) -> fc -> F.normalize."""
    x = body(x)
    if pooling == "gem":
        p = sd["adpool.p"]
        x = F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(p), 1).pow(1.0 / p)
    else:
        x = F.adaptive_max_pool2d(x, 1)
    if norm_features:
        x = F.normalize(x, p=2, dim=1)
    x = x.squeeze(-1).squeeze(-1)
    return F.normalize(F.linear(x, sd["fc.weight"], sd["fc.bias"]), p=2, dim=-1)


@pytest.mark.parametrize("pooling,norm_features", [("gem", False), ("max", True)])
def test_dirtorch_forward_and_pca_equal_the_authors(tmp_path, images, sklearn_names, pooling, norm_features):
    body, sd, pca = _dirtorch_ckpt(tmp_path / "Resnet-50-AP-GeM.pt", sklearn_names, pooling, norm_features)
    net = load_network(tmp_path / "Resnet-50-AP-GeM.pt")
    assert net.info["format"] == "dirtorch" and net.info["pca"]
    with torch.no_grad():
        ours = net(images)
        torch.testing.assert_close(ours, _dir_forward(body, sd, images, pooling, norm_features), **TOL)
    # dirtorch/utils/common.py whiten_features with --whitenp 0.25 (scikit-learn's transform, then L2)
    X = ours.double().numpy()
    Y = np.dot(X - pca.mean_, pca.components_.T) / np.power(pca.explained_variance_, 0.25)
    Y = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    np.testing.assert_allclose(net.post_whiten(ours).double().numpy(), Y, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- safe loading
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"meta": _Evil(marker), "state_dict": {}}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_network(path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        safe_load(path)
    assert not marker.exists()


def test_other_classes_and_garbage_are_refused(tmp_path):
    torch.save({"state_dict": {}, "meta": {"architecture": "resnet50"}, "x": threading.Lock}, tmp_path / "a.pth")
    with pytest.raises(UnsafeCheckpointError):
        load_network(tmp_path / "a.pth")
    (tmp_path / "b.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UnsafeCheckpointError):
        load_network(tmp_path / "b.pth")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "c.pth")
    with pytest.raises(UnsafeCheckpointError, match="neither cirtorch"):
        load_network(tmp_path / "c.pth")
    with pytest.raises(MissingDataError):
        load_network(tmp_path / "missing.pth")


def test_wrong_keys_are_refused(tmp_path):
    _, sd, meta = _cirtorch_ckpt(tmp_path / "n.pth", whitening=False, lw=False)
    del sd["features.7.2.conv3.weight"]
    torch.save({"state_dict": sd, "meta": meta}, tmp_path / "n.pth")
    with pytest.raises(UnsafeCheckpointError, match="missing"):
        load_network(tmp_path / "n.pth")
    meta["architecture"] = "alexnet"
    torch.save({"state_dict": sd, "meta": meta}, tmp_path / "n.pth")
    with pytest.raises(UnsafeCheckpointError, match="architecture"):
        load_network(tmp_path / "n.pth")


# ----------------------------------------------------------------------------- downloads
class _Server:
    """A local HTTP server: /good (the file), /short (Content-Length larger than the body),
    /redirect (302 to /good), /bad (other bytes)."""

    def __init__(self, body: bytes):
        outer = self
        self.body = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", "/good/" + self.path.rsplit("/", 1)[-1])
                    self.end_headers()
                    return
                data = {"good": outer.body, "short": outer.body, "bad": b"x" * len(outer.body)}[self.path.strip("/").split("/")[0]]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) + (100 if "short" in self.path else 0)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if "short" in self.path else data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_release(monkeypatch, tmp_path):
    """A registry entry pointing at a local server; its file name carries the body's sha256 prefix."""
    body = b"weights " * 1000
    prefix = hashlib.sha256(body).hexdigest()[:7]
    server = _Server(body)
    entries = {}
    for route in ("good", "short", "redirect", "bad"):
        name = f"test-{route}"
        entries[name] = released.ReleasedNetwork(
            name=name, paper="p", format="cirtorch", url=f"{server.url}/{route}/{name}-{prefix}.pth",
            sha256_prefix=prefix, architecture="resnet50", pooling="gem", whitening="none", normalisation="n",
            setting={}, source="test")
    monkeypatch.setattr(registry, "_REGISTRY", {**registry._REGISTRY, **entries})
    yield body, prefix
    server.close()


def test_fetch_good_file_then_cached(fake_release, tmp_path):
    body, prefix = fake_release
    path = fetch_network("test-good", root=tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / f"test-good-{prefix}.pth" and path.read_bytes() == body
    assert fetch_network("test-good", root=tmp_path / "cache", progress=False) == path  # no second transfer
    assert fetch_network("test-redirect", root=tmp_path / "cache", progress=False).read_bytes() == body


def test_fetch_refuses_truncated_and_wrong_hash(fake_release, tmp_path):
    _, prefix = fake_release
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError):
        fetch_network("test-short", root=cache, progress=False)
    with pytest.raises(ChecksumError, match="does not start with"):
        fetch_network("test-bad", root=cache, progress=False)
    assert not any(p.name.startswith(("test-short", "test-bad")) for p in cache.iterdir())  # nothing kept
    # a damaged file already in the cache is replaced by a verified one
    (cache / f"test-good-{prefix}.pth").write_bytes(b"damaged")
    assert fetch_network("test-good", root=cache, progress=False).read_bytes() != b"damaged"


def test_drive_hosted_networks_say_how_to_get_them(tmp_path):
    with pytest.raises(FetchError, match="gdown 1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy"):
        fetch_network("Resnet101-AP-GeM", root=tmp_path)
    (tmp_path / "Resnet-101-AP-GeM.pt").write_bytes(b"x")
    assert fetch_network("Resnet101-AP-GeM", root=tmp_path) == tmp_path / "Resnet-101-AP-GeM.pt"


def test_legacy_format_with_old_numpy_names_loads(tmp_path, images):
    """The released files predate PyTorch 1.6's zip format and numpy 2's rename of numpy.core:
    a legacy-format file whose Lw arrays are pickled under ``numpy.core.multiarray`` loads too."""
    feats, sd, meta = _cirtorch_ckpt(tmp_path / "zip.pth", whitening=False, lw=True)
    torch.save({"state_dict": sd, "meta": meta}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "legacy.pth").read_bytes()
    assert raw[:2] != b"PK" and b"numpy._core.multiarray" in raw
    (tmp_path / "legacy.pth").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    net = load_network(tmp_path / "legacy.pth")
    m, P = net.lw["retrieval-SfM-120k"]["ms"]
    np.testing.assert_array_equal(P.numpy(), meta["Lw"]["retrieval-SfM-120k"]["ms"]["P"])
    np.testing.assert_array_equal(m.numpy(), meta["Lw"]["retrieval-SfM-120k"]["ms"]["m"].reshape(-1))
    with torch.no_grad():
        torch.testing.assert_close(net(images), _cir_forward(feats, sd, images), **TOL)


def test_load_by_name_uses_the_verified_cache(tmp_path, monkeypatch, images):
    """A name resolves to the cached file when its sha256 starts with the prefix in its name."""
    feats, sd, _ = _cirtorch_ckpt(tmp_path / "ckpt.pth", whitening=True, lw=False)
    prefix = hashlib.sha256((tmp_path / "ckpt.pth").read_bytes()).hexdigest()[:7]
    cache = tmp_path / "cache"
    cache.mkdir()
    os.replace(tmp_path / "ckpt.pth", cache / f"tiny-net-{prefix}.pth")
    entry = released.ReleasedNetwork(
        name="tiny-net", paper="p", format="cirtorch", url=f"http://127.0.0.1:9/tiny-net-{prefix}.pth",
        sha256_prefix=prefix, architecture="resnet50", pooling="gem", whitening="fc", normalisation="n",
        setting={}, source="test")
    monkeypatch.setattr(registry, "_REGISTRY", {**registry._REGISTRY, "tiny-net": entry})
    net = load_network("tiny-net", root=cache, progress=False)  # port 9 is never asked: the cache verifies
    assert net.info["registry"] is entry and net.info["file"] == str(cache / f"tiny-net-{prefix}.pth")
    with torch.no_grad():
        torch.testing.assert_close(net(images), _cir_forward(feats, sd, images), **TOL)
