"""CUB-200-2011 class-level retrieval (Wah et al., 2011), Recall@K: :class:`CUB200` and
:func:`download_cub`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval_lib.data.benchmark import Benchmark, check_ranks
from retrieval_lib.data.download import download, extract_archive
from retrieval_lib.data.images import MAX_ASPECT, MIN_SIZE, ImageList
from retrieval_lib.data.roots import require_root
from retrieval_lib.metrics import gnd_from_labels, recall_from_ranks

__all__ = ["CUB200", "download_cub", "CUB_URL", "CUB_MD5"]

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
_CUB_SPLITS = ("train", "test", "all")


def _read_table(path: Path, n_fields: int) -> list:
    rows = []
    for k, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            parts = line.split()
            if len(parts) != n_fields:
                raise ValueError(f"line {k + 1} of '{path}' has {len(parts)} fields, expected {n_fields}")
            rows.append(parts)
    return rows


class CUB200(Benchmark):
    """CUB-200-2011 class-level retrieval (Wah, Branson, Welinder, Perona, Belongie, 2011).

    The metric-learning split (Oh Song et al., CVPR 2016): classes 1–100 for ``"train"``,
    101–200 for ``"test"`` (``"all"``: every image). Every image of the split queries all
    the others; ``evaluate`` gives Recall@1, 2, 4, 8 with the query itself left out.
    Reads ``<root>/CUB_200_2011/{images.txt, image_class_labels.txt}``; with
    ``use_boxes=True`` also ``bounding_boxes.txt`` and crops each bird to its box.

    Attributes:
        labels: (N,) int64 class ids (1..200). class_names: ``{id: name}`` if classes.txt exists.
    """

    headline_key = "R@1"

    def __init__(self, root=None, split: str = "test", use_boxes: bool = False,
                 min_size: int = MIN_SIZE, max_aspect: float = MAX_ASPECT, on_error: str = "raise"):
        if split not in _CUB_SPLITS:
            raise ValueError(f"split must be one of {_CUB_SPLITS}, got {split!r}")
        base = require_root(root) / "CUB_200_2011"
        need = [base / "images.txt", base / "image_class_labels.txt"]
        if use_boxes:
            need.append(base / "bounding_boxes.txt")
        absent = [str(p) for p in need if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"CUB-200-2011 files missing: {absent}; run download_cub(root) "
                                    "or point root at the folder that holds CUB_200_2011/")
        files = dict(_read_table(base / "images.txt", 2))
        classes = {i: int(c) for i, c in _read_table(base / "image_class_labels.txt", 2)}
        boxes = ({i: (float(x), float(y), float(x) + float(w), float(y) + float(h))
                  for i, x, y, w, h in _read_table(base / "bounding_boxes.txt", 5)} if use_boxes else None)
        ids = [i for i in files if split == "all" or (classes[i] <= 100) == (split == "train")]
        if not ids:
            raise ValueError(f"no images of split {split!r} in '{base}'")
        self.name = f"cub200-{split}"
        self.split = split
        self.labels = np.array([classes[i] for i in ids], dtype=np.int64)
        names = base / "classes.txt"
        self.class_names = ({int(i): n for i, n in _read_table(names, 2)} if names.is_file() else {})
        self.database = ImageList([files[i] for i in ids], root=base / "images", name=self.name,
                                  boxes=None if boxes is None else [boxes[i] for i in ids],
                                  min_size=min_size, max_aspect=max_aspect, on_error=on_error)
        self.queries = None

    def evaluate(self, ranks) -> dict:
        """``{"R@1", "R@2", "R@4", "R@8"}``: fraction of images whose K nearest others hold
        one of their class (:func:`~retrieval_lib.metrics.recall_from_ranks`)."""
        n = len(self.database)
        R = check_ranks(ranks, n, n)
        return {f"R@{k}": v for k, v in recall_from_ranks(R, self.labels, ks=(1, 2, 4, 8)).items()}

    def _build_ground_truth(self) -> list:
        return gnd_from_labels(self.labels)

    def summary(self) -> str:
        return (f"{self.name}: {len(self.database)} images of {len(np.unique(self.labels))} bird "
                "classes; each image queries all the others (Recall@K)")

    def subset(self, max_images: int) -> "CUB200":
        """Whole classes in order, at most ``max_images`` images."""
        max_images = int(max_images)
        if max_images >= len(self.database):
            return self
        keep, used = [], 0
        for c, size in zip(*np.unique(self.labels, return_counts=True)):
            if used + size <= max_images:
                keep.append(c)
                used += size
        idx = np.flatnonzero(np.isin(self.labels, keep))
        out = CUB200.__new__(CUB200)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_ground_truth"})
        db = self.database
        out.name = f"{self.name}-sub{len(idx)}"
        out.labels = self.labels[idx]
        out.database = ImageList([db.paths[i] for i in idx], name=out.name,
                                 boxes=None if db.boxes is None else [db.boxes[i] for i in idx],
                                 min_size=db.min_size, max_aspect=db.max_aspect, on_error=db.on_error)
        return out


def download_cub(root=None, progress: bool = True, keep_archive: bool = False) -> Path:
    """Download and extract CUB-200-2011 (1.1 GB, md5-checked) into ``<root>/CUB_200_2011``.

    Does nothing if ``images.txt`` is already there. Returns the ``CUB_200_2011`` folder.
    """
    root = require_root(root)
    base = root / "CUB_200_2011"
    if (base / "images.txt").is_file():
        return base
    arc = download(CUB_URL, root / "CUB_200_2011.tgz", md5=CUB_MD5, progress=progress)
    extract_archive(arc, root, overwrite=True)
    if not keep_archive:
        arc.unlink()
    return base
