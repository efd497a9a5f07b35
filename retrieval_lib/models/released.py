"""The papers' own networks: a registry of the released files and one safe loader.

This module is their face: it builds a network from a released file (:func:`load_network`) and
re-exports the registry (:mod:`~retrieval_lib.models.registry`), the safe reader
(:mod:`~retrieval_lib.models.safe_load`) and the network (:mod:`~retrieval_lib.models.released_net`).
:func:`released_networks` lists every file the authors released for the revisited
Oxford/Paris numbers the book cites (:class:`ReleasedNetwork`: URL, the hash that checks it,
architecture, pooling, whitening, input normalisation, the authors' test setting and the
numbers they publish for it, each with the table it comes from). :func:`fetch_network`
downloads one into the cache and checks it; :func:`load_network` turns a name or a local file
into a :class:`ReleasedNet` whose ``forward`` computes what the authors' ``forward`` computes
on the same weights. Taught in ``notebooks/09_reproductions.ipynb``; the reproduction run
is :mod:`retrieval_lib.book.paper_networks`.

Sources (read in the code index; facts cite file and function, since the index gives no
line numbers):

* cirtorch = ``filipradenovic/cnnimageretrieval-pytorch``: ``cirtorch/examples/test.py``
  (``PRETRAINED``, ``main``: the ``msp`` rule, ``Lw`` from ``meta``), ``cirtorch/examples/test_e2e.py``
  (the end-to-end whitened networks, ``msp`` left at 1), ``cirtorch/networks/imageretrievalnet.py``
  (``FEATURES``, ``WHITENING``, ``ImageRetrievalNet.forward``, ``init_network``, ``extract_ms``),
  ``cirtorch/layers/functional.py`` (``gem``, ``mac``, ``l2n``), ``cirtorch/utils/whiten.py``
  (``whitenapply``), ``cirtorch/datasets/genericdataset.py`` + ``datahelpers.py``
  (``ImagesFromList``: crop to the box, ``imresize`` = PIL ``thumbnail`` with ANTIALIAS),
  ``README.md`` (the tables).
* dirtorch = ``naver/deep-image-retrieval``: ``dirtorch/test_dir.py`` (``load_model``,
  ``eval_model``, the default ``--whitenp 0.25``), ``dirtorch/utils/common.py``
  (``load_checkpoint`` strips ``module.``, ``whiten_features`` / ``transform``),
  ``dirtorch/nets/__init__.py`` (``create_model``: ``preprocess`` = mean/std of the net),
  ``dirtorch/utils/pytorch_loader.py`` (``get_loader``: with no transform only ToTensor +
  Normalize, i.e. the image at its own size), ``README.md`` (table, Drive links). Its
  ``nets/rmac_resnet.py``, ``nets/layers/pooling.py`` and ``nets/backbones/resnet.py`` are
  not in the index under naver's name; their content was read from copies in other
  repositories (same class names and code): ``ResNet_RMAC.forward`` = backbone ->
  ``adpool`` (``GeneralizedMeanPoolingP``: ``clamp(eps).pow(p)``, average, ``pow(1/p)``,
  parameter ``adpool.p``; or ``AdaptiveMaxPool2d`` for ``pooling='max'``) -> optional L2
  (``norm_features``) -> ``fc`` -> L2 (``F.normalize``).

Safe loading: every file goes through ``torch.load(weights_only=True)``; besides tensors
and plain containers only numpy's array/dtype/scalar rebuilders are allowed, and three
record classes the dirtorch files may name (scikit-learn's ``PCA``, dirtorch's ``Watch`` /
``AverageMeter``), which are replaced by an inert record that only stores its attributes.
Anything else (a function call, another class) is refused with
:class:`~retrieval_lib.errors.UnsafeCheckpointError` before it runs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from retrieval_lib.errors import UnsafeCheckpointError, UsageError
from retrieval_lib.layers.pooling import GeM, MAC, SPoC
from retrieval_lib.models.paper_backbones import CIRTORCH_RESNET_INDEX, PAPER_ARCHITECTURES, paper_backbone
from retrieval_lib.models.registry import (ReleasedNetwork, fetch_network, hash_prefix, network_cache, registry_entry,
                                           released_networks)
from retrieval_lib.models.released_net import ReleasedNet, cirtorch_msp, whiten_lw, whiten_pca
from retrieval_lib.models.safe_load import PCARecord, safe_load

__all__ = ["ReleasedNetwork", "ReleasedNet", "released_networks", "fetch_network", "load_network",
           "safe_load", "hash_prefix", "cirtorch_msp", "whiten_lw", "whiten_pca", "network_cache"]


# --------------------------------------------------------------------------- building
def _refuse(path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"refusing {path}: {what}")


def _tensor(v, path, key) -> torch.Tensor:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.array(v, dtype=np.float64))
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float64)
    raise _refuse(path, f"{key} is a {type(v).__name__}, expected an array")


def _load_backbone(backbone: nn.Module, state: dict, path, skip=("fc.",)) -> None:
    """Load ``state`` (already renamed to the backbone's names) and insist on a perfect match."""
    # BatchNorm's num_batches_tracked (PyTorch >= 0.4.1) is absent from older files and unused in eval mode
    own = {k for k in backbone.state_dict() if not k.startswith(skip) and not k.endswith("num_batches_tracked")}
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - set(backbone.state_dict()))
    if missing or unexpected:
        raise _refuse(path, f"its weights do not fit a {backbone.name}: missing {missing[:4]}"
                            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                            f"{'...' if len(unexpected) > 4 else ''}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(backbone.state_dict()[k].shape)]
    if bad:
        raise _refuse(path, f"wrong shapes for {bad[:4]}")
    backbone.load_state_dict(state, strict=False)


def _cirtorch_features(arch: str, feats: dict, path) -> dict:
    """cirtorch ``features.<i>.<rest>`` (prefix already removed) -> the backbone's names."""
    out = {}
    for k, v in feats.items():
        i, _, rest = k.partition(".")
        if arch == "vgg16":
            out[f"body.{i}.{rest}"] = v
        elif i in CIRTORCH_RESNET_INDEX:
            out[f"{CIRTORCH_RESNET_INDEX[i]}.{rest}"] = v
        else:
            raise _refuse(path, f"unexpected key features.{k} for a {arch}")
    return out


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _fixed_gem(p: torch.Tensor) -> GeM:
    p = float(p.reshape(-1)[0])
    return GeM(p=p, learn_p=False, p_min=min(1.0, p))


def _from_cirtorch(ckpt: dict, path, entry: Optional[ReleasedNetwork]) -> ReleasedNet:
    meta, sd = ckpt.get("meta"), ckpt.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(sd, dict):
        raise _refuse(path, "a cirtorch checkpoint needs 'meta' and 'state_dict'")
    arch, pooling = meta.get("architecture"), meta.get("pooling")
    if arch not in PAPER_ARCHITECTURES:
        raise _refuse(path, f"architecture {arch!r} is not one of {list(PAPER_ARCHITECTURES)}")
    if meta.get("local_whitening") or meta.get("regional"):
        raise _refuse(path, "local or regional whitening networks are not supported (none is released)")
    backbone = paper_backbone(arch, meta.get("mean", (0.485, 0.456, 0.406)), meta.get("std", (0.229, 0.224, 0.225)))
    feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    rest = sorted(set(sd) - {f"features.{k}" for k in feats})
    expected = ({"pool.p"} if pooling == "gem" else set()) | ({"whiten.weight", "whiten.bias"} if meta.get("whitening") else set())
    if set(rest) != expected:
        raise _refuse(path, f"keys besides features.* are {rest}, expected {sorted(expected)} for pooling "
                            f"{pooling!r}, whitening={bool(meta.get('whitening'))}")
    _load_backbone(backbone, _cirtorch_features(arch, feats, path), path)
    pools = {"gem": lambda: _fixed_gem(sd["pool.p"]), "mac": MAC, "spoc": SPoC}
    if pooling not in pools:
        raise _refuse(path, f"pooling {pooling!r} is not one of {sorted(pools)}")
    whiten = _linear(sd["whiten.weight"], sd["whiten.bias"]) if meta.get("whitening") else None
    lw = {}
    for name, sets in (meta.get("Lw") or {}).items():
        lw[name] = {k: (_tensor(v["m"], path, f"Lw[{name}][{k}]['m']").reshape(-1),
                        _tensor(v["P"], path, f"Lw[{name}][{k}]['P']")) for k, v in sets.items()}
    info = {"format": "cirtorch", "architecture": arch, "pooling": pooling, "regional": False,
            "whitening": bool(meta.get("whitening")), "p": float(sd["pool.p"].reshape(-1)[0]) if pooling == "gem" else None,
            "mean": list(backbone.mean), "std": list(backbone.std), "Lw": sorted(lw)}
    return ReleasedNet(backbone, pools[pooling](), whiten, "cirtorch", True, lw=lw, info=info)


def _from_features(sd: dict, path, arch: str, pooling: str, p: float, whitening, root=None,
                   progress: bool = True) -> ReleasedNet:
    backbone = paper_backbone(arch)
    _load_backbone(backbone, _cirtorch_features(arch, sd, path), path)
    pools = {"gem": lambda: GeM(p=p, learn_p=False), "mac": MAC, "spoc": SPoC}
    if pooling not in pools:
        raise UsageError(f"pooling must be one of {sorted(pools)}, got {pooling!r}")
    whiten = None
    if whitening is not None:
        wpath = fetch_network(whitening, root, progress) if whitening in released_networks() else Path(whitening)
        w = safe_load(wpath)
        if not (isinstance(w, dict) and set(w) == {"weight", "bias"}):
            raise _refuse(wpath, "a whitening file holds exactly 'weight' and 'bias'")
        whiten = _linear(w["weight"], w["bias"])
    info = {"format": "cirtorch-features", "architecture": arch, "pooling": pooling, "regional": False,
            "whitening": whiten is not None, "p": p if pooling == "gem" else None,
            "mean": list(backbone.mean), "std": list(backbone.std), "Lw": []}
    return ReleasedNet(backbone, pools[pooling](), whiten, "cirtorch", True, info=info)


def _from_dirtorch(ckpt: dict, path) -> ReleasedNet:
    opts, sd = ckpt.get("model_options"), ckpt.get("state_dict")
    if not isinstance(opts, dict) or not isinstance(sd, dict):
        raise _refuse(path, "a dirtorch checkpoint needs 'model_options' and 'state_dict'")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}  # common.load_checkpoint
    arch = str(opts.get("arch", "")).replace("_rmac", "")
    if arch not in PAPER_ARCHITECTURES or arch == "vgg16":
        raise _refuse(path, f"model_options['arch'] = {opts.get('arch')!r}; supported: resnet50/101/152_rmac")
    if opts.get("center_bias", 0) or opts.get("scales") not in (None, [1]):
        raise _refuse(path, "center_bias or multi-scale dirtorch networks are not supported")
    pre = ckpt.get("preprocess") or {}
    backbone = paper_backbone(arch, pre.get("mean", (0.485, 0.456, 0.406)), pre.get("std", (0.229, 0.224, 0.225)))
    pooling = str(opts.get("pooling", "gem"))
    if pooling.startswith("gem"):
        if "adpool.p" not in sd:
            raise _refuse(path, "GeM pooling without 'adpool.p'")
        pool = _fixed_gem(sd["adpool.p"])
    elif pooling == "max":
        pool = MAC()
    else:
        raise _refuse(path, f"pooling {pooling!r} is not 'gem' or 'max'")
    without_fc = bool(opts.get("without_fc", False))
    head = set() if without_fc else {"fc.weight", "fc.bias"}
    body = {k: v for k, v in sd.items() if k not in head and k != "adpool.p"}
    _load_backbone(backbone, body, path)
    whiten = None if without_fc else _linear(sd["fc.weight"], sd["fc.bias"])
    pca = None
    rec = ckpt.get("pca")
    if rec is not None:
        if not isinstance(rec, PCARecord):
            raise _refuse(path, f"'pca' is a {type(rec).__name__}, expected a scikit-learn PCA")
        pca = {"mean": _tensor(rec.mean_, path, "pca.mean_"), "components": _tensor(rec.components_, path, "pca.components_"),
               "explained_variance": _tensor(rec.explained_variance_, path, "pca.explained_variance_"),
               "whiten": bool(getattr(rec, "whiten", False))}
    info = {"format": "dirtorch", "architecture": arch, "pooling": "gem" if pooling.startswith("gem") else "mac",
            "p": float(sd["adpool.p"].reshape(-1)[0]) if pooling.startswith("gem") else None,
            "whitening": whiten is not None, "norm_features": bool(opts.get("norm_features", False)),
            "mean": list(backbone.mean), "std": list(backbone.std), "pca": pca is not None,
            "model_options": {k: v for k, v in opts.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    return ReleasedNet(backbone, pool, whiten, "dirtorch", info["norm_features"], pca=pca, info=info)


def load_network(name_or_path, root=None, progress: bool = True, pooling: str = "gem", p: float = 3.0,
                 whitening: Optional[str] = None) -> ReleasedNet:
    """A released network, by registry name (downloaded once, checked) or local file, in eval mode.

    The format is read from the file: cirtorch (``state_dict`` + ``meta``), dirtorch
    (``model_options`` + ``state_dict``), or cirtorch's ImageNet ``features`` file (a bare state
    dict ``<i>.<param>``; then ``pooling`` (``"gem"`` with ``p``, ``"mac"``, ``"spoc"``) and the
    optional FC ``whitening`` (a name such as ``"retrieval-SfM-120k-resnet101-gem-whiten"`` or a
    path) say the head, as cirtorch's off-the-shelf networks do). Every file goes through
    :func:`safe_load`. ``root``: the download cache (see :func:`network_cache`).

    Returns a :class:`ReleasedNet`; its ``info`` holds the settings read from the file and,
    when loaded by name, ``info["registry"]`` the :class:`ReleasedNetwork`.

    Raises:
        UsageError: an unknown name that is not a file either.
        MissingDataError: a path that does not exist.
        FetchError / ChecksumError: the download failed or did not verify.
        UnsafeCheckpointError: the file holds code, or keys that do not make a supported network.
    """
    entry = released_networks().get(str(name_or_path))
    if entry is None and not Path(name_or_path).expanduser().exists() and os.sep not in str(name_or_path) \
            and not str(name_or_path).endswith((".pth", ".pt")):
        registry_entry(str(name_or_path))  # raises the UsageError naming the choices
    path = fetch_network(entry.name, root, progress) if entry else Path(name_or_path).expanduser()
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise _refuse(path, f"it holds a {type(ckpt).__name__}, not a dict")
    if "meta" in ckpt:
        net = _from_cirtorch(ckpt, path, entry)
    elif "model_options" in ckpt:
        net = _from_dirtorch(ckpt, path)
    elif ckpt and all(re.match(r"^\d+\.", str(k)) for k in ckpt):
        arch = entry.architecture if entry else next((a for a in PAPER_ARCHITECTURES if a in path.name), None)
        if arch is None:
            raise UsageError(f"cannot tell the architecture of the features file {path}: its name should "
                             f"contain one of {list(PAPER_ARCHITECTURES)}")
        net = _from_features(ckpt, path, arch, pooling, p, whitening, root, progress)
    else:
        raise _refuse(path, f"keys {sorted(map(str, ckpt))[:6]} are neither cirtorch's ('state_dict', 'meta') "
                            "nor dirtorch's ('model_options', 'state_dict') nor a features state dict")
    net.info["file"] = str(path)
    if entry is not None:
        net.info["registry"] = entry
    net.backbone.weights = f"file:{path}"
    return net.eval()
