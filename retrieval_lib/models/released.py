"""The papers' own networks: a registry of the released files and one safe loader.

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

import dataclasses
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval_lib.data.download import ChecksumError, download, file_hash
from retrieval_lib.errors import FetchError, MissingDataError, UnsafeCheckpointError, UsageError
from retrieval_lib.layers.pooling import GeM, MAC, SPoC
from retrieval_lib.models.paper_backbones import CIRTORCH_RESNET_INDEX, PAPER_ARCHITECTURES, paper_backbone
from retrieval_lib.models.retrieval_net import RetrievalNet

__all__ = ["ReleasedNetwork", "ReleasedNet", "released_networks", "fetch_network", "load_network",
           "safe_load", "hash_prefix", "cirtorch_msp", "whiten_lw", "whiten_pca", "network_cache"]

_CMP = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/"
_CIR_README = "filipradenovic/cnnimageretrieval-pytorch README.md"
_DIR_README = "naver/deep-image-retrieval README.md"
# torch.hub's convention (torch/hub.py HASH_REGEX = r'-([a-f0-9]*)\.'), which cirtorch's load_url
# relied on: the hex run after the last '-' of the file name is a prefix of the file's sha256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.[A-Za-z]+$")


@dataclass(frozen=True)
class ReleasedNetwork:
    """One released file.

    ``format``: ``"cirtorch"`` (``{'state_dict', 'meta'}``), ``"cirtorch-features"`` (a state
    dict of cirtorch's ``features``: ImageNet weights converted from Caffe),
    ``"cirtorch-whiten"`` (a ``{'weight', 'bias'}`` FC whitening for off-the-shelf features) or
    ``"dirtorch"`` (``{'model_options', 'state_dict', 'preprocess', 'pca', ...}``).
    ``sha256_prefix``: the hash in the file name (``None``: the authors publish none).
    ``setting``: the authors' test setting (``script``, ``image_size``, ``scales``, ``msp``,
    ``post_whitening``, ``resize``). ``numbers``: ``{"dataset", "protocol", "value", "table",
    "row", "file"}`` where ``file`` says whether the source ties the number to this file
    (``"named"``: the row links this file; ``"implied"``: the README does not name the file).
    """

    name: str
    paper: str
    format: str
    url: str
    sha256_prefix: Optional[str]
    architecture: str
    pooling: str
    whitening: str
    normalisation: str
    setting: dict
    numbers: tuple = ()
    source: str = ""
    notes: str = ""
    drive_id: Optional[str] = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.drive_id is None else _DRIVE_FILES[self.name]

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["numbers"] = [dict(n) for n in self.numbers]
        out["file_name"] = self.file_name
        return out


def _rows(table: str, row: str, file: str, values: dict) -> tuple:
    """``{"roxford5k/medium": 65.4, ...}`` -> number records of one table row."""
    out = []
    for key, value in values.items():
        dataset, protocol = key.split("/")
        out.append({"dataset": dataset, "protocol": protocol, "value": value, "table": table,
                    "row": row, "file": file})
    return tuple(out)


def _six(vals) -> dict:
    """The cirtorch README's column order: Oxford, Paris, ROxf (M), RPar (M), ROxf (H), RPar (H)."""
    keys = ("oxford5k/all", "paris6k/all", "roxford5k/medium", "rparis6k/medium", "roxford5k/hard",
            "rparis6k/hard")
    return dict(zip(keys, vals))


def _four(vals) -> dict:
    """ROxf (M), RPar (M), ROxf (H), RPar (H) (cirtorch's end-to-end table)."""
    return dict(zip(("roxford5k/medium", "rparis6k/medium", "roxford5k/hard", "rparis6k/hard"), vals))


_TPAMI = "Radenović, Tolias & Chum, Fine-tuning CNN Image Retrieval with No Human Annotation, TPAMI 2018"
_GORDO = "Gordo, Almazán, Revaud & Larlus, End-to-end Learning of Deep Visual Representations for Image Retrieval, IJCV 2017"
_REVAUD = "Revaud, Almazán, Rezende & de Souza, Learning with Average Precision, ICCV 2019"
_IMNET = "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225] on RGB in [0, 1]"

_CIR_POST = {
    "script": "cirtorch/examples/test.py", "image_size": 1024, "scales": [1.0, 2 ** -0.5, 0.5],
    "msp": "GeM's p (test.py: multi-scale, GeM, not regional, no whitening layer)",
    "post_whitening": "Lw 'retrieval-SfM-120k' from meta['Lw'] ('ms' for several scales)",
    "resize": "PIL thumbnail to 1024 on the longer side (never enlarges), ANTIALIAS; queries cropped to their box first",
    "datasets": "roxford5k, rparis6k (and oxford5k, paris6k)", "ap": "trapezoidal",
}
_CIR_E2E = {
    "script": "cirtorch/examples/test_e2e.py", "image_size": 1024, "scales": [1.0, 2 ** 0.5, 2 ** -0.5],
    "msp": 1, "post_whitening": None,
    "resize": "PIL thumbnail to 1024 on the longer side (never enlarges), ANTIALIAS; queries cropped to their box first",
    "datasets": "roxford5k, rparis6k", "ap": "trapezoidal",
}
_DIR_SET = {
    "script": "dirtorch/test_dir.py", "image_size": None, "scales": [1.0], "msp": 1,
    "post_whitening": "PCA-whitening 'Landmarks_clean' stored in the checkpoint, power 0.25 (--whitenp)",
    "resize": "none: the image at its own size (test_dir's default --trfs ''); queries cropped to their box",
    "datasets": "ROxford5K, RParis6K (and Oxford5K, Paris6K)",
    "ap": "non-interpolated",  # datasets/generic.py eval_query_AP -> utils/evaluation.py compute_AP (scikit-learn)
}
_E2E_TABLE = "cirtorch README, 'Testing our pretrained networks with whitening learned end-to-end' (multi-scale)"
_POST_TABLE = "cirtorch README, 'Testing our pretrained networks' (the networks 'trained with this framework')"
_DIR_TABLE = "dirtorch README, 'Pre-trained models' (single resolution, whitening learned on Landmarks-clean)"

_DRIVE_FILES = {  # the file names the dirtorch README uses (only one is written out there)
    "Resnet101-TL-MAC": "Resnet-101-TL-MAC.pt", "Resnet101-TL-GeM": "Resnet-101-TL-GeM.pt",
    "Resnet50-AP-GeM": "Resnet-50-AP-GeM.pt", "Resnet101-AP-GeM": "Resnet-101-AP-GeM.pt",
    "Resnet101-AP-GeM-LM18": "Resnet-101-AP-GeM-LM18.pt",
}


def _registry() -> dict:
    nets = []
    # --- cirtorch, post-processing whitening Lw inside meta (cirtorch/examples/test.py, PRETRAINED)
    for arch, tag, pt, matconv in (
            ("vgg16", "b4dcdc6", (87.3, 87.8, 60.9, 69.3, 32.9, 44.2), (87.9, 87.7, 61.9, 69.3, 33.7, 44.3)),
            ("resnet101", "b80fb85", (88.2, 92.5, 65.4, 76.7, 40.1, 55.2), (87.8, 92.7, 64.7, 77.2, 38.5, 56.3))):
        row = {"vgg16": "VGG16-GeM", "resnet101": "ResNet101-GeM"}[arch]
        nets.append(ReleasedNetwork(
            name=f"retrievalSfM120k-{arch}-gem", paper=_TPAMI, format="cirtorch",
            url=f"{_CMP}networks/retrieval-SfM-120k/retrievalSfM120k-{arch}-gem-{tag}.pth", sha256_prefix=tag,
            architecture=arch, pooling="GeM (learned p, in state_dict 'pool.p')",
            whitening="post-processing Lw in meta['Lw']['retrieval-SfM-120k'] ('ss' / 'ms': numpy m, P)",
            normalisation="meta['mean'], meta['std'] (ImageNet: " + _IMNET + ")", setting=dict(_CIR_POST),
            numbers=_rows(_POST_TABLE, f"{row} (PyTorch)", "implied", _six(pt)),
            source="cirtorch/examples/test.py PRETRAINED; README 'Testing our pretrained networks'",
            notes=(f"The README gives two rows per network: '{row} (PyTorch)', networks 'trained with this "
                   "framework', and '(MatConvNet)', 'the networks used in the paper'. It does not name this "
                   "file for either row; the PyTorch row is the one the released file belongs to by that "
                   f"wording. MatConvNet row (not this file): {dict(_six(matconv))}.")))
    # --- cirtorch, whitening learned end to end as an FC layer (cirtorch/examples/test_e2e.py)
    e2e = {"rSfM120k-tl-resnet50-gem-w": ("retrieval-SfM-120k", "97bf910", (64.7, 76.3, 39.0, 54.9)),
           "rSfM120k-tl-resnet101-gem-w": ("retrieval-SfM-120k", "a155e54", (67.8, 77.6, 41.7, 56.3)),
           "rSfM120k-tl-resnet152-gem-w": ("retrieval-SfM-120k", "f39cada", (68.8, 78.0, 41.3, 57.2)),
           "gl18-tl-resnet50-gem-w": ("gl18", "83fdc30", (63.6, 78.0, 40.9, 57.5)),
           "gl18-tl-resnet101-gem-w": ("gl18", "a4d43db", (67.3, 80.6, 44.3, 61.5)),
           "gl18-tl-resnet152-gem-w": ("gl18", "21278d5", (68.7, 79.7, 44.2, 60.3))}
    for name, (folder, tag, vals) in e2e.items():
        arch = re.search(r"resnet\d+", name).group(0)
        nets.append(ReleasedNetwork(
            name=name, paper=_TPAMI + " (toolbox networks; triplet loss, whitening as an FC layer)",
            format="cirtorch", url=f"{_CMP}networks/{folder}/{name}-{tag}.pth", sha256_prefix=tag,
            architecture=arch, pooling="GeM (learned p, 'pool.p')",
            whitening="learned FC layer 'whiten.weight' / 'whiten.bias' (meta['whitening'] = True)",
            normalisation="meta['mean'], meta['std']", setting=dict(_CIR_E2E),
            numbers=_rows(_E2E_TABLE, name, "named", _four(vals)),
            source="cirtorch/examples/test_e2e.py PRETRAINED; README end-to-end table (rows link the file)",
            notes="Trained on " + ("retrieval-SfM-120k" if folder != "gl18" else "google-landmarks-2018")
                  + ". test_e2e.py's msp is extract_vectors' default 1."))
    # --- cirtorch, ImageNet features converted from Caffe (imageretrievalnet.py FEATURES)
    for arch, tag in (("vgg16", "d369c8e"), ("resnet50", "ac468af"), ("resnet101", "10a101d"),
                      ("resnet152", "1011020")):
        nets.append(ReleasedNetwork(
            name=f"imagenet-caffe-{arch}", paper=_TPAMI + " (off-the-shelf rows)", format="cirtorch-features",
            url=f"{_CMP}networks/imagenet/imagenet-caffe-{arch}-features-{tag}.pth", sha256_prefix=tag,
            architecture=arch, pooling="chosen at load time (cirtorch's off-the-shelf default GeM p=3)",
            whitening="none, or one of the retrieval-SfM-120k-*-whiten files", normalisation=_IMNET,
            setting=dict(_CIR_POST, msp="GeM's p (3) for GeM without whitening layer, else 1",
                         post_whitening="optional Lw learned by test.py (not shipped: no Lw in these files)"),
            source="cirtorch/networks/imageretrievalnet.py FEATURES",
            notes="Only the convolutions (keys '<i>.<param>' of cirtorch's features Sequential). No README "
                  "number is tied to these files; the paper's off-the-shelf tables are not in the sources read."))
    # --- cirtorch, precomputed FC whitening for off-the-shelf GeM (imageretrievalnet.py WHITENING)
    for arch, tag in (("vgg16", "eaa6695"), ("resnet101", "22ab0c1")):
        nets.append(ReleasedNetwork(
            name=f"retrieval-SfM-120k-{arch}-gem-whiten", paper=_TPAMI, format="cirtorch-whiten",
            url=f"{_CMP}whiten/retrieval-SfM-120k/retrieval-SfM-120k-{arch}-gem-whiten-{tag}.pth",
            sha256_prefix=tag, architecture=arch, pooling="GeM (off the shelf)",
            whitening="FC layer {'weight', 'bias'} learned on retrieval-SfM-120k", normalisation=_IMNET,
            setting=dict(_CIR_POST, msp=1, post_whitening=None),
            source="cirtorch/networks/imageretrievalnet.py WHITENING ('<arch>-gem')",
            notes=f"Goes with imagenet-caffe-{arch}: load_network('imagenet-caffe-{arch}', "
                  f"whitening='retrieval-SfM-120k-{arch}-gem-whiten'). No README number is tied to it."))
    # --- dirtorch (README 'Pre-trained models'; hosted on Google Drive, no hash published)
    dirt = {"Resnet101-TL-MAC": ("13MUGNwn_CYGZvqDBD8FGD8fVYxThsSDg", "resnet101", "MAC", _GORDO, (85.6, 90.1, 63.3, 35.7, 76.6, 55.5)),
            "Resnet101-TL-GeM": ("1vhm1GYvn8T3-1C4SPjPNJOuTU9UxKAG6", "resnet101", "GeM", _GORDO, (85.7, 93.4, 64.5, 40.9, 78.8, 59.2)),
            "Resnet50-AP-GeM": ("1oPtE_go9tnsiDLkWjN4NMpKjh-_md1G5", "resnet50", "GeM", _REVAUD, (87.7, 91.9, 65.5, 41.0, 77.6, 57.1)),
            "Resnet101-AP-GeM": ("1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy", "resnet101", "GeM", _REVAUD, (89.1, 93.0, 67.1, 42.3, 80.3, 60.9)),
            "Resnet101-AP-GeM-LM18": ("1r76NLHtJsH-Ybfda4aLkUIoW3EEsi25I", "resnet101", "GeM", _REVAUD, (88.1, 93.1, 66.3, 42.5, 80.2, 60.8))}
    for name, (drive, arch, pool, paper, v) in dirt.items():
        values = {"oxford5k/all": v[0], "paris6k/all": v[1], "roxford5k/medium": v[2], "roxford5k/hard": v[3],
                  "rparis6k/medium": v[4], "rparis6k/hard": v[5]}
        notes = ("Hosted on Google Drive; the authors publish no checksum, so the file cannot be verified "
                 "(the safe loader still refuses anything but weights). Architecture, pooling and whitening "
                 "are read from the checkpoint's 'model_options' and 'pca'.")
        if name == "Resnet101-AP-GeM":
            notes += (" The README's example links a second Drive id for 'Resnet-101-AP-GeM.pt' "
                      "(1mi50tG6oXY1eE9yJnmGCPdTmlIjG7mr0) and prints RParis6K mAP-easy/medium/hard "
                      "0.907568 / 0.803098 / 0.608556 for it.")
        if name.endswith("LM18"):
            notes += " Trained on Google-Landmarks 2018, not Landmarks-clean (README footnote)."
        nets.append(ReleasedNetwork(
            name=name, paper=paper, format="dirtorch", drive_id=drive,
            url=f"https://drive.google.com/uc?export=download&id={drive}", sha256_prefix=None,
            architecture=arch, pooling=pool + (" (adpool.p)" if pool == "GeM" else " (AdaptiveMaxPool2d)"),
            whitening="FC layer 'fc' inside the network + post-processing PCA-whitening in checkpoint['pca'], power 0.25",
            normalisation="checkpoint['preprocess'] mean/std (dirtorch ResNet default: ImageNet)",
            setting=dict(_DIR_SET), numbers=_rows(_DIR_TABLE, name, "named", values),
            source="dirtorch README 'Pre-trained models' (rows link the Drive file); dirtorch/test_dir.py",
            notes=notes))
    return {n.name: n for n in nets}


_REGISTRY = _registry()


def released_networks() -> dict:
    """Every released file the book knows: ``{name: ReleasedNetwork}`` in a fixed order.

    Names are the authors' (cirtorch's ``PRETRAINED`` keys, ``imagenet-caffe-<arch>`` for its
    ``FEATURES``, the whitening files' stems without hash, dirtorch's README model names).
    Taught in ``notebooks/09_reproductions.ipynb``.
    """
    return dict(_REGISTRY)


def hash_prefix(file_name: str) -> Optional[str]:
    """The sha256 prefix a file name carries (``...-b80fb85.pth`` -> ``"b80fb85"``), or ``None``."""
    m = _HASH_IN_NAME.search(file_name)
    return m.group(1) if m else None


def network_cache(root=None) -> Path:
    """Where downloaded networks go: ``root``, else ``$RETRIEVAL_CACHE/networks``, else
    ``~/.cache/retrieval_lib/networks``."""
    if root is not None:
        return Path(root).expanduser()
    value = os.environ.get("RETRIEVAL_CACHE", "").strip()
    return (Path(value).expanduser() if value else Path.home() / ".cache" / "retrieval_lib") / "networks"


def _lookup(name: str) -> ReleasedNetwork:
    if name not in _REGISTRY:
        raise UsageError(f"unknown released network {name!r}; choose one of {sorted(_REGISTRY)} "
                         "(retrieval_lib.released_networks() lists them), or pass a local file path")
    return _REGISTRY[name]


def _verify_prefix(path: Path, prefix: str, url: str) -> None:
    got = file_hash(path, "sha256")
    if not got.startswith(prefix):
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{url} downloaded with sha256 {got}, which does not start with {prefix} "
                            "(the hash in its file name); the file was deleted. Run again; if it "
                            "persists the file on the server changed")


def fetch_network(name: str, root=None, progress: bool = True) -> Path:
    """The released file ``name`` in the cache (downloaded once, checked); its path.

    The file goes to ``network_cache(root) / <file name>``. Its sha256 must start with the hash
    in its file name (torch.hub's convention, which cirtorch's ``load_url`` used): a cached or
    downloaded file that does not is deleted and :class:`ChecksumError` raised (exit code 4).
    A transfer cut short raises :class:`~retrieval_lib.data.download.DownloadError`.

    dirtorch's files are on Google Drive, which answers large files with a confirmation page
    rather than the file, and publish no hash: they are not downloaded here. When the file is
    already in the cache it is returned; otherwise :class:`~retrieval_lib.errors.FetchError`
    says how to get it (``pip install gdown; gdown <id> -O <cache>/<file>``, the route that
    works in Colab, or a browser download), after which ``load_network(name)`` finds it.
    """
    entry = _lookup(name)
    dest = network_cache(root) / entry.file_name
    if entry.drive_id is not None:
        if dest.is_file():
            return dest
        raise FetchError(
            f"{name} is hosted on Google Drive (id {entry.drive_id}) without a published checksum, so it is "
            f"not downloaded automatically. Get it with `pip install gdown && gdown {entry.drive_id} -O {dest}` "
            f"(works in Colab), or open https://drive.google.com/file/d/{entry.drive_id} in a browser and save "
            f"the file as {dest}; then load_network({name!r}) finds it (or pass the file's path)")
    prefix = entry.sha256_prefix
    if dest.is_file():
        if file_hash(dest, "sha256").startswith(prefix):
            return dest
        dest.unlink()  # a damaged or foreign file: fetch it again
    tmp = dest.with_name(dest.name + ".unverified")
    download(entry.url, tmp, progress=progress, resume=False)
    _verify_prefix(tmp, prefix, entry.url)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------- safe loading
class _InertRecord:
    """Stands in for a class a checkpoint names (scikit-learn's PCA, dirtorch's meters): it only
    stores the pickled attributes, so loading runs none of that class's code."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state of type {type(state).__name__} for a record")
        self.__dict__.update(state)


class _PCARecord(_InertRecord):
    """The attributes of a pickled ``sklearn.decomposition.PCA`` (``mean_``, ``components_``,
    ``explained_variance_``, ``whiten``...), without scikit-learn."""


class _MeterRecord(_InertRecord):
    """dirtorch's ``utils.watcher`` objects, which some of its checkpoints pickle."""


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    out = [np.ndarray, np.dtype, (np.dtype, "numpy.dtype")]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(core.multiarray._reconstruct, f"{mod}._reconstruct"), (core.multiarray.scalar, f"{mod}.scalar")]
    for t in (np.float64, np.float32, np.int64, np.int32, np.bool_):  # numpy >= 1.25 pickles dtypes by class
        out.append((type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}"))
    return out


def _record_globals() -> list:
    return [(_PCARecord, "sklearn.decomposition.pca.PCA"), (_PCARecord, "sklearn.decomposition._pca.PCA"),
            (_MeterRecord, "utils.watcher.AverageMeter"), (_MeterRecord, "utils.watcher.Watch"),
            (_MeterRecord, "dirtorch.utils.watcher.AverageMeter"), (_MeterRecord, "dirtorch.utils.watcher.Watch")]


def safe_load(path) -> dict:
    """Read a checkpoint without letting it run code; return what it holds (on the CPU).

    ``torch.load(path, map_location="cpu", weights_only=True)`` with only these globals allowed
    besides PyTorch's tensor rebuilders: numpy's ``_reconstruct``, ``ndarray``, ``dtype`` and
    ``scalar`` (cirtorch's ``meta['Lw']`` holds numpy arrays) and inert records for the
    classes dirtorch's files name (``_PCARecord`` for scikit-learn's ``PCA``).

    Raises:
        MissingDataError: no such file.
        UnsafeCheckpointError: the file names any other global (e.g. ``os.system``) or is not a
            PyTorch checkpoint at all; nothing in it was executed.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"no checkpoint at {path}; pass a released network's name "
                               f"(one of {sorted(_REGISTRY)}) or the path of a file")
    try:
        with torch.serialization.safe_globals(_numpy_globals() + _record_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        glob = re.search(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)", str(err))
        what = f"it names {glob.group(1)}, which is not allowed" if glob else first
        raise UnsafeCheckpointError(
            f"refusing to load {path}: {what}. Checkpoints are read with torch.load(weights_only=True) and "
            "may hold only tensors, numbers, strings, containers and numpy arrays; nothing in the file was "
            "run. Get the file again from its authors (retrieval_lib.released_networks() lists the URLs)") from None


# --------------------------------------------------------------------------- the network
def _l2(x: torch.Tensor, style: str) -> torch.Tensor:
    """L2 normalisation of ``(B, D)`` rows as each code base writes it: cirtorch's ``l2n``
    divides by ``||x|| + 1e-6``; dirtorch's ``F.normalize`` by ``max(||x||, 1e-12)``."""
    if style == "cirtorch":
        return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-6)
    return F.normalize(x, p=2, dim=-1)


class ReleasedNet(RetrievalNet):
    """A released network as the library's own :class:`~retrieval_lib.models.retrieval_net.RetrievalNet`.

    ``backbone.features`` -> ``pooling`` -> head, with ``backbone``, ``pooling`` and ``whiten`` the
    library's modules; ``forward`` takes a batch or a list of images of any sizes as
    ``RetrievalNet`` does. Only the head differs, to follow each code base exactly:

    * cirtorch (``ImageRetrievalNet.forward``): ``l2n(pool(f))``, then with the FC whitening
      ``l2n(whiten(.))``; ``l2n`` divides by ``||x|| + 1e-6``.
    * dirtorch (``ResNet_RMAC.forward``): ``pool(f)``, L2 only if ``norm_features``, ``fc``,
      then ``F.normalize``.

    ``forward``: ``(B, 3, H, W)`` images normalised with ``backbone.mean``/``std`` -> ``(B, D)``.
    :meth:`multiscale` combines several input scales as cirtorch's ``extract_ms`` does;
    :meth:`post_whiten` applies the post-processing whitening stored with the network
    (cirtorch's ``Lw``, dirtorch's PCA). ``info`` records the format, the checkpoint's
    settings and the registry entry (when loaded by name).
    """

    def __init__(self, backbone: nn.Module, pooling: nn.Module, whiten: Optional[nn.Module] = None,
                 norm_style: str = "cirtorch", norm_before_whiten: bool = True, lw: Optional[dict] = None,
                 pca: Optional[dict] = None, info: Optional[dict] = None):
        super().__init__(pooling, backbone=backbone, whiten=whiten)
        self.norm_style = norm_style
        self.norm_before_whiten = bool(norm_before_whiten)
        self.lw = lw or {}  # {"retrieval-SfM-120k": {"ss": (m (D,), P (D', D)), "ms": ...}} float64 tensors
        self.pca = pca      # {"mean", "components", "explained_variance", "whiten"} float64 tensors
        self.info = info or {}

    @property
    def mean(self):
        return self.backbone.mean

    @property
    def std(self):
        return self.backbone.std

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The authors' head on one batch (``RetrievalNet.forward`` groups a list of images by size)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        d = self.pooling(self.backbone.features(x))  # (B, 3, H, W) -> (B, C, h, w) -> (B, C)
        if self.whiten is None:
            return _l2(d, self.norm_style)
        if self.norm_before_whiten:
            d = _l2(d, self.norm_style)
        return _l2(self.whiten(d), self.norm_style)  # (B, C) -> (B, D)

    def multiscale(self, x: torch.Tensor, scales=(1.0,), msp: float = 1.0) -> torch.Tensor:
        """cirtorch's ``extract_ms``: ``v = (mean_s forward(x_s)^msp)^(1/msp)``, then ``v / ||v||``.

        ``x_s`` is ``x`` for ``s == 1``, else ``F.interpolate(x, scale_factor=s, mode="bilinear",
        align_corners=False)`` of the normalised image, with ``recompute_scale_factor=True``: the
        output size is ``floor(H s)`` and the sampling grid follows that size, as PyTorch <= 1.5 did
        (cirtorch's README: tested with PyTorch 1.0.0). One scale returns ``forward(x)``.
        ``(B, 3, H, W) -> (B, D)``.
        """
        scales = [float(s) for s in scales]
        if len(scales) == 1 and scales[0] == 1.0:
            return self.forward(x)
        v = 0
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                  recompute_scale_factor=True)
            v = v + self.forward(xs).pow(msp)
        v = (v / len(scales)).pow(1.0 / msp)
        return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)

    def post_whiten(self, X: torch.Tensor, multiscale: bool = False, dataset: Optional[str] = None,
                    power: float = 0.25) -> torch.Tensor:
        """The post-processing whitening stored with the network, on descriptors ``(N, D)``.

        cirtorch: ``Lw`` learned on ``dataset`` (default: the only/first one stored), the
        ``'ms'`` matrices when ``multiscale`` else ``'ss'`` (test.py), via :func:`whiten_lw`.
        dirtorch: the checkpoint's PCA with ``power`` (test_dir's ``--whitenp``, 0.25), via
        :func:`whiten_pca`. Raises ``UsageError`` when the network carries none.
        """
        if self.lw:
            name = dataset or next(iter(self.lw))
            if name not in self.lw:
                raise UsageError(f"no Lw learned on {name!r} in this network; it has {sorted(self.lw)}")
            m, P = self.lw[name]["ms" if multiscale else "ss"]
            return whiten_lw(X, m, P)
        if self.pca is not None:
            return whiten_pca(X, self.pca, power)
        raise UsageError("this network carries no post-processing whitening (no meta['Lw'], no 'pca')")


def whiten_lw(X: torch.Tensor, m: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """cirtorch's ``whitenapply`` in the library's layout: ``(N, D) -> (N, D')``.

    ``y = P (x - m)``, then ``y / (||y|| + 1e-6)``; cirtorch writes it for ``D x N`` columns
    (``np.dot(P, X - m)``, ``cirtorch/utils/whiten.py``). Computed in float64 (the stored
    ``m``, ``P`` are float64 numpy arrays), returned in ``X``'s dtype.
    """
    Y = (X.to(torch.float64) - m.reshape(1, -1).to(X.device)) @ P.to(X.device).T
    Y = Y / (torch.linalg.vector_norm(Y, dim=1, keepdim=True) + 1e-6)
    return Y.to(X.dtype)


def whiten_pca(X: torch.Tensor, pca: dict, power: float = 0.25, dims: Optional[int] = None) -> torch.Tensor:
    """dirtorch's ``whiten_features`` (``dirtorch/utils/common.py``, ``transform`` with scikit-learn):
    ``y = (x - mean) C[:dims]^T``, divided by ``explained_variance[:dims] ** power`` when the PCA
    whitens, then ``y / ||y||``. ``(N, D) -> (N, dims or D)``; computed in float64.
    """
    Y = (X.to(torch.float64) - pca["mean"].to(X.device)) @ pca["components"][:dims].to(X.device).T
    if pca["whiten"]:
        Y = Y / pca["explained_variance"][:dims].to(X.device).pow(power)
    return (Y / torch.linalg.vector_norm(Y, dim=1, keepdim=True)).to(X.dtype)


def cirtorch_msp(info: dict, scales, script: str = "test.py") -> float:
    """The exponent cirtorch combines scales with.

    ``test.py`` (``main``): GeM's ``p`` when there are several scales, the pooling is GeM, not
    regional, and the network has no whitening layer; else 1. ``test_e2e.py`` always uses 1
    (``extract_vectors``' default ``msp=1``).
    """
    if script.endswith("test_e2e.py"):
        return 1.0
    if len(list(scales)) > 1 and info.get("pooling") == "gem" and not info.get("regional") \
            and not info.get("whitening"):
        return float(info["p"])
    return 1.0


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
        wpath = fetch_network(whitening, root, progress) if whitening in _REGISTRY else Path(whitening)
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
        if not isinstance(rec, _PCARecord):
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
    entry = _REGISTRY.get(str(name_or_path))
    if entry is None and not Path(name_or_path).expanduser().exists() and os.sep not in str(name_or_path) \
            and not str(name_or_path).endswith((".pth", ".pt")):
        _lookup(str(name_or_path))  # raises the UsageError naming the choices
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
