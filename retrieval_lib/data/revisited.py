"""Revisited Oxford5k / Paris6k (Radenović et al., CVPR 2018): the ground truth read without
running code (:func:`load_gnd`, :func:`find_gnd`), the benchmark (:class:`RevisitedDataset`,
Easy/Medium/Hard) and its download (:func:`download_revisited`)."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

from retrieval_lib.data.benchmark import Benchmark, check_ranks
from retrieval_lib.data.download import download, extract_archive
from retrieval_lib.data.images import MAX_ASPECT, MIN_SIZE, ImageList
from retrieval_lib.data.roots import require_root
from retrieval_lib.errors import MissingDataError
from retrieval_lib.metrics import evaluate_revisited, revisited_protocol

__all__ = ["RevisitedDataset", "load_gnd", "find_gnd", "download_revisited", "REVISITED", "GND_SHA256",
           "GND_URL", "IMAGE_URLS"]

REVISITED = ("roxford5k", "rparis6k")
# sha256 of the official ground-truth files (checked before a downloaded file is kept)
GND_SHA256 = {
    "roxford5k": "ba7967754bd2d7d2210a5799f9c45ad5835e269a80ef9d3eba44caa35816c471",
    "rparis6k": "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499",
}
GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
IMAGE_URLS = {
    "roxford5k": ["https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"],
    "rparis6k": ["https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
                 "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz"],
}


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers and numbers: any class or function is refused,
    so a pickle cannot run code while it is read."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: ground-truth files hold only "
                                     "dicts, lists, strings and numbers")


def load_gnd(path) -> dict:
    """Read a revisited ground-truth pickle (``gnd_roxford5k.pkl``) without running code.

    Returns ``{"imlist": [str], "qimlist": [str], "gnd": [{"bbx", "easy", "hard", "junk"}]}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds anything but plain data, or lacks the expected keys.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            doc = _PlainUnpickler(f).load()
        except Exception as err:  # any failure to decode an untrusted file is the same error
            raise ValueError(f"'{path}' is not a plain revisited ground-truth pickle ({err}); "
                             "download it again with download_revisited") from err
    if not (isinstance(doc, dict) and {"imlist", "qimlist", "gnd"} <= set(doc)
            and len(doc["gnd"]) == len(doc["qimlist"])
            and all(isinstance(g, dict) and {"bbx", "easy", "hard", "junk"} <= set(g) for g in doc["gnd"])):
        raise ValueError(f"'{path}' lacks the revisited keys imlist, qimlist and gnd[q] with "
                         "bbx/easy/hard/junk; is it a gnd_<name>.pkl file?")
    return doc


def find_gnd(name: str, root=None) -> Path:
    """The one place the library looks for a revisited ground truth ``gnd_<name>.pkl``.

    Under the data root (``root``, else ``RETRIEVAL_DATA``): ``<root>/<name>/`` first, where
    :func:`download_revisited` puts it, then ``<root>/revisited_gnd/`` (the ground truth alone,
    without the images). Raises :class:`~retrieval_lib.errors.MissingDataError` (a
    ``FileNotFoundError``) naming both places and the command that fetches it.
    """
    if name not in REVISITED:
        raise ValueError(f"unknown revisited dataset {name!r}; choose one of {REVISITED}")
    root = require_root(root)
    places = [root / name / f"gnd_{name}.pkl", root / "revisited_gnd" / f"gnd_{name}.pkl"]
    for p in places:
        if p.is_file():
            return p
    raise MissingDataError(f"no ground truth for {name}: looked at {[str(p) for p in places]}; fetch it with "
                           f"`python -m retrieval_lib download {name} --data {root}` "
                           f"(download_revisited({name!r}, root)) or pass gnd_path=")


class RevisitedDataset(Benchmark):
    """Revisited Oxford5k / Paris6k (Radenović, Iscen, Tolias, Avrithis, Chum, CVPR 2018).

    Layout: ``<root>/<name>/jpg/<image>.jpg`` and the ground truth ``gnd_<name>.pkl``
    (``<root>/<name>/``, else ``<root>/revisited_gnd/``, or ``gnd_path``). ``database``
    lists ``imlist``; ``queries`` lists ``qimlist`` with each query's bounding box
    ``bbx``, so queries are cropped to it before extraction, as the protocol asks.
    ``name`` is ``"roxford5k"`` or ``"rparis6k"``; root defaults to ``RETRIEVAL_DATA``.
    ``evaluate`` reports Easy / Medium / Hard mAP and mP@1, 5, 10.

    Attributes:
        gnd: the per-query ground truth (``bbx``, ``easy``, ``hard``, ``junk``).
        imlist, qimlist: image names without ``.jpg``.
    """

    headline_key = "mAP/medium"

    def __init__(self, name: str, root=None, gnd_path=None, min_size: int = MIN_SIZE,
                 max_aspect: float = MAX_ASPECT, on_error: str = "raise"):
        if name not in REVISITED:
            raise ValueError(f"unknown revisited dataset {name!r}; choose one of {REVISITED}")
        root = require_root(root)
        doc = load_gnd(gnd_path if gnd_path is not None else find_gnd(name, root))
        self._init(name, root / name / "jpg", doc["imlist"], doc["qimlist"], doc["gnd"],
                   dict(min_size=min_size, max_aspect=max_aspect, on_error=on_error))

    def _init(self, name, jpg: Path, imlist, qimlist, gnd, opts):
        self.name, self.imlist, self.qimlist, self.gnd, self._opts = name, list(imlist), list(qimlist), gnd, opts
        self._jpg = jpg
        missing = [n for n in self.imlist + self.qimlist if not (jpg / f"{n}.jpg").is_file()]
        if missing:
            raise MissingDataError(
                f"{len(missing)} of {len(self.imlist) + len(self.qimlist)} images of {name} are "
                f"missing under '{jpg}' (e.g. {missing[0]}.jpg); fetch them with `python -m retrieval_lib "
                f"download {name} --data DIR` (download_revisited({name!r}, root)) or point root "
                f"(RETRIEVAL_DATA) at the folder that holds {name}/jpg/")
        self.database = ImageList([f"{n}.jpg" for n in self.imlist], root=jpg, name=name, **opts)
        self.queries = ImageList([f"{n}.jpg" for n in self.qimlist], root=jpg,
                                 boxes=[g["bbx"] for g in gnd], name=f"{name} queries", **opts)

    def evaluate(self, ranks) -> dict:
        """``{"mAP/easy", "mAP/medium", "mAP/hard", "mP@1/easy", ..., "mP@10/hard"}`` (fractions),
        from :func:`~retrieval_lib.metrics.evaluate_revisited`."""
        R = check_ranks(ranks, len(self.queries), len(self.database))
        res = evaluate_revisited(R, self.gnd, kappas=(1, 5, 10))
        out = {f"mAP/{p}": float(res[p]["mAP"]) for p in ("easy", "medium", "hard")}
        for p in ("easy", "medium", "hard"):
            out.update({f"mP@{k}/{p}": float(v) for k, v in res[p]["mP@k"].items()})
        return out

    def _build_ground_truth(self) -> list:
        return revisited_protocol(self.gnd, "medium")

    def summary(self) -> str:
        return (f"{self.name}: {len(self.database)} database images, {len(self.queries)} queries "
                "cropped to their boxes; Easy/Medium/Hard protocols")

    def subset(self, max_images: int) -> "RevisitedDataset":
        """All queries and at most ``max_images`` database images: the queries' easy and hard
        positives first (query by query), then the others in order; ``gnd`` is re-indexed."""
        max_images = int(max_images)
        n = len(self.imlist)
        if max_images >= n:
            return self
        first = [i for g in self.gnd for key in ("easy", "hard") for i in g[key]]
        order = list(dict.fromkeys(first + list(range(n))))
        keep = sorted(order[:max_images])
        new = {old: k for k, old in enumerate(keep)}
        gnd = [{"bbx": g["bbx"], **{key: [new[i] for i in g[key] if i in new]
                                     for key in ("easy", "hard", "junk")}} for g in self.gnd]
        out = RevisitedDataset.__new__(RevisitedDataset)
        out._init(self.name, self._jpg, [self.imlist[i] for i in keep], self.qimlist, gnd, self._opts)
        out.name = f"{self.name}-sub{len(keep)}"
        return out


def download_revisited(name: str, root=None, progress: bool = True, keep_archives: bool = False) -> Path:
    """Download Revisited Oxford5k or Paris6k into ``<root>/<name>/``; return that folder.

    The ground truth ``gnd_<name>.pkl`` comes from the authors' site
    (``cmp.felk.cvut.cz/revisitop``) and is kept only if its sha256 equals
    :data:`GND_SHA256` (then read with :func:`load_gnd`, which runs no code). The images
    come from the Oxford VGG site (Oxford: 1 archive, Paris: 2; several GB in all); no
    checksums are published for them, so they are checked by name against
    the ground truth after extraction. Images already in ``jpg/`` are not fetched again;
    archives are deleted afterwards unless ``keep_archives``.
    """
    if name not in REVISITED:
        raise ValueError(f"unknown revisited dataset {name!r}; choose one of {REVISITED}")
    base = require_root(root) / name
    gnd_file = download(GND_URL.format(name=name), base / f"gnd_{name}.pkl",
                        sha256=GND_SHA256[name], progress=progress)
    doc = load_gnd(gnd_file)
    jpg = base / "jpg"
    needed = doc["imlist"] + doc["qimlist"]

    def missing():
        return [n for n in needed if not (jpg / f"{n}.jpg").is_file()]

    if missing():
        jpg.mkdir(parents=True, exist_ok=True)
        archives = base / "archives"
        for url in IMAGE_URLS[name]:
            arc = download(url, archives / url.rsplit("/", 1)[-1], progress=progress)
            unpacked = extract_archive(arc, archives / (arc.name + ".d"), overwrite=True)
            for p in sorted(unpacked.rglob("*.jpg")):  # Paris nests images by landmark: flatten
                if p.is_file() and not p.is_symlink():
                    os.replace(p, jpg / p.name)
            shutil.rmtree(unpacked)
        still = missing()
        if still:
            raise FileNotFoundError(f"after extracting {IMAGE_URLS[name]}, {len(still)} images of "
                                    f"{name} are still missing (e.g. {still[0]}.jpg); the archives "
                                    f"kept in '{archives}' may be incomplete — delete them and run again")
        if not keep_archives:
            shutil.rmtree(archives, ignore_errors=True)
    return base
