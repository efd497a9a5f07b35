"""rSfM-120k, the training set of GeM (Radenović, Tolias & Chum, TPAMI 2018): download and read.

cirtorch's layout, kept so its files can be shared::

    <root>/train/retrieval-SfM-120k/retrieval-SfM-120k.pkl      query/positive pairs, clusters
    <root>/train/retrieval-SfM-120k/ims/<c[-2:]>/<c[-4:-2]>/<c[-6:-4]>/<c>   images by id c

The database file holds, for ``"train"`` and ``"val"``: ``cids`` (image ids), ``cluster``
(the 3D model each image belongs to: images of one cluster may show the same place, so
negatives come from other clusters), ``qidxs`` and ``pidxs`` (query/positive pairs
verified by structure from motion). No checksums are published for these files; the
download trusts the server's ``Content-Length`` and checks afterwards that every listed
image is there. Used by :func:`retrieval_lib.engine.trainer.paper_trainer` (full mode).
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from retrieval_lib.data.download import download, extract_archive
from retrieval_lib.data.images import ImageList
from retrieval_lib.data.roots import DATA_HINT, data_root

__all__ = ["SfM120k", "download_sfm120k", "load_sfm120k", "cid2filename", "SFM_BASE_URL", "SFM_NAME"]

SFM_NAME = "retrieval-SfM-120k"
SFM_BASE_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data"
_DB_FILES = (f"train/dbs/{SFM_NAME}.pkl", f"train/dbs/{SFM_NAME}-whiten.pkl")
_IMS_FILE = "train/ims/ims.tar.gz"


def cid2filename(cid: str, prefix) -> str:
    """Path of image ``cid`` under ``prefix``: ``prefix/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid`` (cirtorch)."""
    return os.path.join(os.fspath(prefix), cid[-2:], cid[-4:-2], cid[-6:-4], cid)


class _DataUnpickler(pickle.Unpickler):
    """Plain containers, numbers, strings and NumPy arrays of numbers only: no code runs."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the rSfM-120k database holds "
                                     "only lists, dicts, strings and numbers")


def _base(root) -> Path:
    r = Path(root).expanduser() if root is not None else data_root()
    if r is None:
        raise FileNotFoundError(f"no data root for rSfM-120k; {DATA_HINT}")
    return r / "train" / SFM_NAME


def _read_db(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            db = _DataUnpickler(f).load()
    except FileNotFoundError:
        raise
    except Exception as err:  # an untrusted file that does not decode is one error
        raise ValueError(f"'{path}' is not a plain rSfM-120k database ({err}); delete it and download "
                         "again with download_sfm120k") from err
    keys = {"cids", "cluster", "qidxs", "pidxs"}
    if not (isinstance(db, dict) and all(isinstance(db.get(m), dict) and keys <= set(db[m])
                                         for m in ("train", "val"))):
        raise ValueError(f"'{path}' lacks db['train'|'val'] with keys {sorted(keys)}; is it "
                         f"{SFM_NAME}.pkl?")
    return db


def _find_images_root(unpacked: Path, cid: str) -> Optional[Path]:
    """The folder under which ``cid2filename(cid)`` exists: ``unpacked`` or one level down."""
    for cand in [unpacked] + sorted(p for p in unpacked.iterdir() if p.is_dir()):
        if os.path.isfile(cid2filename(cid, cand)):
            return cand
    return None


def _missing(db: dict, ims: Path) -> list:
    return [c for m in ("train", "val") for c in db[m]["cids"] if not os.path.isfile(cid2filename(c, ims))]


def download_sfm120k(root=None, base_url: str = SFM_BASE_URL, progress: bool = True,
                     keep_archive: bool = False) -> Path:
    """Download rSfM-120k into ``<root>/train/retrieval-SfM-120k/`` (cirtorch's layout); return it.

    Fetches ``retrieval-SfM-120k.pkl`` (pairs and clusters), ``retrieval-SfM-120k-whiten.pkl``
    and ``ims.tar.gz`` (the images, about 117k JPEGs) from ``base_url`` (cirtorch's server by
    default) with :func:`~retrieval_lib.data.download.download` (resumable, atomic), extracts
    the archive safely and checks that every image the database lists is present. Files
    already in place are not fetched again. ``root`` defaults to ``RETRIEVAL_DATA``.

    Raises:
        DownloadError: a transfer failed (run again to resume).
        FileNotFoundError: images listed in the database are missing after extraction.
    """
    base = _base(root)
    base.mkdir(parents=True, exist_ok=True)
    url = base_url.rstrip("/")
    for rel in _DB_FILES:
        download(f"{url}/{rel}", base / rel.rsplit("/", 1)[-1], progress=progress)
    db = _read_db(base / f"{SFM_NAME}.pkl")
    ims = base / "ims"
    if ims.is_dir() and not _missing(db, ims):
        return base
    archive = download(f"{url}/{_IMS_FILE}", base / "ims.tar.gz", progress=progress)
    unpacked = extract_archive(archive, base / "ims.unpacked", overwrite=True)
    first = db["train"]["cids"][0] if db["train"]["cids"] else db["val"]["cids"][0]
    found = _find_images_root(unpacked, first)
    if found is None:
        raise FileNotFoundError(f"{archive} does not hold image {first} at cid2filename(cid) (e.g. "
                                f"{cid2filename(first, '')}); the archive may be incomplete -- delete it and "
                                "download again")
    if ims.exists():
        shutil.rmtree(ims)
    os.replace(found, ims)
    shutil.rmtree(unpacked, ignore_errors=True)
    if not keep_archive:
        archive.unlink()
    missing = _missing(db, ims)
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {SFM_NAME}.pkl are missing under {ims} "
                                f"(e.g. {missing[0]}); delete {ims} and the archive and download again")
    return base


class SfM120k:
    """One part (``"train"`` or ``"val"``) of rSfM-120k.

    Attributes:
        images: :class:`~retrieval_lib.data.images.ImageList` of the part's images.
        labels: (N,) int64 cluster of each image.
        queries, positives: (P,) int64 query/positive pairs (indices into ``images``).
        name: ``"retrieval-SfM-120k/<mode>"``.
    """

    def __init__(self, paths, clusters, qidxs, pidxs, name: str):
        self.images = ImageList(paths, name=name)
        self.labels = np.asarray(clusters, dtype=np.int64)
        self.queries = np.asarray(qidxs, dtype=np.int64)
        self.positives = np.asarray(pidxs, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def summary(self) -> str:
        return (f"{self.name}: {len(self)} images in {len(np.unique(self.labels))} clusters, "
                f"{len(self.queries)} query/positive pairs")

    def __repr__(self) -> str:
        return f"<SfM120k {self.summary()}>"


def load_sfm120k(root=None, mode: str = "train", check_files: bool = True) -> SfM120k:
    """Read one part of a downloaded rSfM-120k (see :func:`download_sfm120k`).

    Raises:
        ValueError: ``mode`` is not ``"train"``/``"val"``, or the database file is malformed.
        FileNotFoundError: no database, or (with ``check_files``) listed images are missing.
    """
    if mode not in ("train", "val"):
        raise ValueError(f"load_sfm120k: mode must be 'train' or 'val', got {mode!r}")
    base = _base(root)
    db_file = base / f"{SFM_NAME}.pkl"
    if not db_file.is_file():
        raise FileNotFoundError(f"no {db_file}; download rSfM-120k first with download_sfm120k(root)")
    part = _read_db(db_file)[mode]
    ims = base / "ims"
    paths = [cid2filename(c, ims) for c in part["cids"]]
    n = len(paths)
    if not (len(part["cluster"]) == n and len(part["qidxs"]) == len(part["pidxs"])):
        raise ValueError(f"{db_file}: {mode} has {n} cids but {len(part['cluster'])} clusters, or "
                         "unequal qidxs/pidxs")
    pairs = np.concatenate([np.asarray(part["qidxs"]), np.asarray(part["pidxs"])]).astype(np.int64)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= n):
        raise ValueError(f"{db_file}: {mode} pairs point outside 0..{n - 1}")
    if check_files:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} rSfM-120k images are missing (e.g. {missing[0]}); "
                                    "run download_sfm120k(root) to fetch them")
    return SfM120k(paths, part["cluster"], part["qidxs"], part["pidxs"], f"{SFM_NAME}/{mode}")
