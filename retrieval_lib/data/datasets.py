"""Benchmarks: one small interface for every image set the book uses.

A :class:`Benchmark` has a ``name``, a ``database`` (:class:`~retrieval_lib.data.images.ImageList`),
``queries`` (an ``ImageList``, or ``None`` when every database image queries all the
others), ``evaluate(ranks) -> {metric: float}`` (fractions, except the N-S score in
0..4), ``headline_key`` (the metric a plot or table leads with), ``relevance(q, i)``
(is database image ``i`` right for query ``q``: ``True``, ``False`` or ``None`` for junk),
``summary()`` (one line of text) and ``subset(max_images)`` (a smaller benchmark of the
same kind, for the ``smoke`` scale). ``ranks`` is ``(n_queries, n_db)``, database
indices best first.

- :class:`GroupDataset` — photos in groups of the same object or place: your own photos
  (one sub-folder per group, or a ``manifest.json``), :func:`real171` and
  :func:`offline_default`.
- :class:`RevisitedDataset` — Revisited Oxford5k / Paris6k (Radenović et al., CVPR 2018).
- :class:`CUB200` — CUB-200-2011 class-level retrieval (Wah et al., 2011), Recall@K.

Where data lives: the data root is the ``root`` argument, else the environment variable
``RETRIEVAL_DATA`` (:func:`data_root`); generated data goes to ``RETRIEVAL_CACHE``
(default ``~/.cache/retrieval_lib``, :func:`cache_root`). See ``data/README.md``.
Taught in ``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

import json
import operator
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from retrieval_lib.data.download import download, extract_archive
from retrieval_lib.data.images import MAX_ASPECT, MIN_SIZE, ImageList
from retrieval_lib.errors import MissingDataError

__all__ = [
    "Benchmark", "GroupDataset", "RevisitedDataset", "CUB200",
    "real171", "offline_default", "default_benchmark", "data_root", "cache_root",
    "download_revisited", "download_cub", "load_gnd", "find_gnd",
    "IMAGE_EXTENSIONS", "REVISITED", "GND_SHA256",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
UKBENCH_SUBSET = "ukbench56"
DATA_HINT = ("set the environment variable RETRIEVAL_DATA to the data root (the folder that "
             "holds real171/, roxford5k/, ...; e.g. export RETRIEVAL_DATA=../shared/data) "
             "or pass root=")


def data_root() -> Optional[Path]:
    """The data root from ``RETRIEVAL_DATA`` (``~`` expanded), or ``None`` when it is unset."""
    value = os.environ.get("RETRIEVAL_DATA", "").strip()
    return Path(value).expanduser() if value else None


def cache_root() -> Path:
    """Where generated data goes: ``RETRIEVAL_CACHE``, else ``~/.cache/retrieval_lib``."""
    value = os.environ.get("RETRIEVAL_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "retrieval_lib"


def _root(root) -> Path:
    r = Path(root).expanduser() if root is not None else data_root()
    if r is None:
        raise MissingDataError(f"no data root given; {DATA_HINT}")
    return r


def _ranks(ranks, n_queries: int, n_db: int) -> np.ndarray:
    """``ranks`` as an int array of shape (n_queries, <= n_db), with a clear error otherwise."""
    if hasattr(ranks, "detach"):
        ranks = ranks.detach().cpu().numpy()
    R = np.asarray(ranks)
    if R.ndim != 2 or R.shape[0] != n_queries or not 0 < R.shape[1] <= n_db:
        raise ValueError(f"ranks has shape {R.shape}; this benchmark needs (n_queries, n_ranked) = "
                         f"({n_queries}, up to {n_db}): one row per query, database indices best "
                         "first (e.g. search.rank_database(Q, X))")
    return R


def _index(v) -> Optional[int]:
    """``v`` as a Python int when it is one integer (int, numpy or 0-d tensor), else None."""
    if isinstance(v, (bool, np.bool_)):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _nanmean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


class Benchmark:
    """Base of every benchmark: ``name``, ``database``, ``queries`` and ``evaluate(ranks)``.

    ``queries is None`` means every database image is a query against all the others
    (its own index is then junk: ignored by ``evaluate``); ``ranks`` has one row per query.

    What is right for a query is answered in one place, :meth:`ground_truth` (built
    once per benchmark): :meth:`relevance` for one image, :meth:`relevance_row` for a
    whole ranked row, :meth:`top_results` for the first results of a ranking, and
    :func:`retrieval_lib.search.evaluate.query_aps` for per-query AP all read it.

    Attributes every benchmark has (``None`` where it does not apply):
        labels: (N,) int64 group or class of each database image (group sets, CUB).
        subsets: (N,) subset name of each database image (manifests with subsets).
        headline_key: the metric of :meth:`evaluate` that a plot or table leads with:
            ``"mAP"`` (group sets), ``"mAP/medium"`` (revisited Oxford/Paris), ``"R@1"`` (CUB).
    """

    name: str
    database: ImageList
    queries: Optional[ImageList] = None
    labels: Optional[np.ndarray] = None
    subsets: Optional[np.ndarray] = None
    headline_key: str = "mAP"

    @property
    def n_queries(self) -> int:
        return len(self.database) if self.queries is None else len(self.queries)

    def evaluate(self, ranks) -> dict:
        """``{metric name: float}`` for ``ranks`` (n_queries, n_db), database indices best first."""
        raise NotImplementedError

    def subset(self, max_images: int) -> "Benchmark":
        """A smaller benchmark of the same kind with at most ``max_images`` database images."""
        raise NotImplementedError

    def summary(self) -> str:
        """One line: what the benchmark holds."""
        q = "each image queries all the others" if self.queries is None else f"{len(self.queries)} queries"
        return f"{self.name}: {len(self.database)} database images; {q}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.summary()}>"

    # -- what is right for a query
    def _build_ground_truth(self) -> list:
        raise NotImplementedError

    def ground_truth(self) -> list:
        """Per query ``{"ok": int64 array, "junk": int64 array}`` of database indices.

        The format of :func:`~retrieval_lib.search.evaluate.compute_map`, for the protocol of
        :attr:`headline_key`: group sets and CUB -- ``ok`` the other images of the query's
        group, ``junk`` the query itself; revisited Oxford/Paris -- the Medium protocol
        (``ok`` easy + hard, ``junk`` junk). Built on first use and kept.
        """
        gt = self.__dict__.get("_ground_truth")
        if gt is None:
            gt = self._build_ground_truth()
            self._ground_truth = gt
        return gt

    def _query(self, q) -> int:
        n = self.n_queries
        k = _index(q)
        if k is None or not 0 <= k < n:
            raise IndexError(f"query {q!r} is not one of this benchmark's {n} queries (0..{n - 1})")
        return k

    def relevance_row(self, q: int, indices) -> np.ndarray:
        """Relevance of database images ``indices`` to query ``q``, vectorised: int8 ``(len(indices),)``.

        ``1`` relevant, ``0`` not relevant, ``-1`` junk (neither: ignored by the metrics).
        ``indices`` is any 1-D integer sequence, e.g. a row of ``ranks``.
        """
        q = self._query(q)
        idx = np.asarray(indices.detach().cpu() if hasattr(indices, "detach") else indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D sequence of database indices, got shape {idx.shape} "
                             f"and dtype {idx.dtype}")
        n = len(self.database)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise IndexError(f"indices must be database indices in 0..{n - 1}; got {bad[:5].tolist()}"
                             f"{' ...' if bad.size > 5 else ''}")
        g = self.ground_truth()[q]
        out = np.zeros(idx.shape, dtype=np.int8)
        out[np.isin(idx, g["ok"])] = 1
        out[np.isin(idx, g["junk"])] = -1
        return out

    def relevance(self, q: int, i: int) -> Optional[bool]:
        """Is database image ``i`` right for query ``q``? ``True``, ``False``, or ``None`` for junk.

        Junk is what the protocol ignores: the query itself when every database image is a
        query, the ``junk`` list of revisited Oxford/Paris. Raises ``IndexError`` for a
        query or image outside the benchmark.
        """
        k = _index(i)
        if k is None:
            raise IndexError(f"i must be one database index, got {i!r}; for many use relevance_row")
        code = int(self.relevance_row(q, [k])[0])
        return None if code < 0 else bool(code)

    def top_results(self, ranks, q: int, k: int = 5) -> tuple:
        """Query ``q``'s first ``k`` results and whether each is right: ``(indices, relevance)``.

        ``ranks`` is ``(n_queries, n_db)``; ``relevance`` holds ``True``/``False``/``None``
        (junk) as in :meth:`relevance`. When every database image is a query, the query
        itself (junk, normally ranked first) is skipped, so the ``k`` results are others.
        """
        q = self._query(q)
        R = _ranks(ranks, self.n_queries, len(self.database))
        row = R[q]
        if self.queries is None:
            row = row[row != q]
        row = row[: max(0, int(k))]
        return row.tolist(), [None if c < 0 else bool(c) for c in self.relevance_row(q, row).tolist()]


# ------------------------------------------------------------------------ group datasets
class GroupDataset(Benchmark):
    """Images in groups that show the same object or place; every image queries the rest.

    Build it with :meth:`from_folder` (one sub-folder per group) or :meth:`from_manifest`
    (``manifest.json`` with ``{"subsets": {name: {"items": [[file, group], ...], ...}}}``,
    the format of ``real171``). Images of one group are each other's positives; the query
    itself is junk (ignored). A group with a single image has no positives: it is a
    distractor for the other queries and its own AP is NaN, left out of every mean.

    Attributes:
        labels: (N,) int64, group index per image (groups are unique across subsets).
        group_names: list of str, ``group_names[label]`` (``"subset/group"`` from a manifest).
        subsets: (N,) array of subset names, or ``None``.
        subset_names: subset names in manifest order (empty without subsets).
    """

    headline_key = "mAP"

    def __init__(self, paths: Sequence, groups: Sequence, subsets: Optional[Sequence[str]] = None,
                 name: str = "groups", min_size: int = MIN_SIZE, max_aspect: float = MAX_ASPECT,
                 on_error: str = "raise"):
        if len(paths) != len(groups):
            raise ValueError(f"{len(paths)} paths but {len(groups)} group labels; give one group per image")
        if len(paths) == 0:
            raise ValueError(f"{name}: no images")
        if subsets is not None and len(subsets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(subsets)} subset names")
        keys = [str(g) for g in groups]
        first = {}
        for k in keys:
            first.setdefault(k, len(first))
        self.name = name
        self.labels = np.array([first[k] for k in keys], dtype=np.int64)
        self.group_names = list(first)
        self.subsets = None if subsets is None else np.array([str(s) for s in subsets])
        self.subset_names = [] if subsets is None else list(dict.fromkeys(self.subsets.tolist()))
        self.database = ImageList(paths, min_size=min_size, max_aspect=max_aspect,
                                  on_error=on_error, name=name)
        self.queries = None
        self._opts = dict(min_size=min_size, max_aspect=max_aspect, on_error=on_error)

    # -- builders
    @classmethod
    def from_folder(cls, root, name: Optional[str] = None, **kw) -> "GroupDataset":
        """``root/<group>/<image>``: every sub-folder is a group, its image files the members.

        Image files are those ending in :data:`IMAGE_EXTENSIONS` (any case), sorted by name;
        hidden files and other files are ignored. Images lying directly in ``root`` are an
        error (they belong to no group). Keyword arguments go to :class:`GroupDataset`.
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"no folder '{root}'; expected root/<group>/<image files>")

        def images(folder):
            return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                          and p.suffix.lower() in IMAGE_EXTENSIONS)

        loose = images(root)
        if loose:
            raise ValueError(f"'{root}' has images outside any group folder ({loose[0].name}, ...); "
                             "put each image in a sub-folder named after its group")
        paths, groups = [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for p in images(folder):
                paths.append(str(p))
                groups.append(folder.name)
        if not paths:
            raise ValueError(f"no images found in the sub-folders of '{root}'; expected "
                             f"root/<group>/<image> with extensions {IMAGE_EXTENSIONS}")
        return cls(paths, groups, name=name or root.name, **kw)

    @classmethod
    def from_manifest(cls, path, subsets: Optional[Sequence[str]] = None, name: Optional[str] = None,
                      **kw) -> "GroupDataset":
        """Read a ``manifest.json`` (the format of ``real171``).

        ``{"subsets": {subset: {"items": [[file, group], ...], "source": ..., "license": ...}}}``.
        ``file`` is relative to ``<manifest folder>/<subset>/`` or, if not there, to the
        manifest's folder. Groups are made unique across subsets (``"subset/group"``).
        ``subsets`` keeps only the listed subsets (in the given order).

        Raises:
            FileNotFoundError: the manifest or a listed image is missing (names them).
            ValueError: malformed manifest, or an unknown subset name.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no manifest at '{path}'")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"manifest '{path}' is not valid JSON ({err})") from err
        fmt = 'expected {"subsets": {"<name>": {"items": [["file.jpg", "group"], ...]}}}'
        table = doc.get("subsets") if isinstance(doc, dict) else None
        if not isinstance(table, dict) or not table:
            raise ValueError(f"manifest '{path}' has no 'subsets'; {fmt}")
        chosen = list(table) if subsets is None else [str(s) for s in subsets]
        unknown = [s for s in chosen if s not in table]
        if unknown:
            raise ValueError(f"unknown subset(s) {unknown} in '{path}'; it has {list(table)}")
        base = path.parent
        paths, groups, subset_of, missing = [], [], [], []
        for s in chosen:
            items = table[s].get("items") if isinstance(table[s], dict) else None
            if not isinstance(items, list):
                raise ValueError(f"subset {s!r} of '{path}' has no 'items' list; {fmt}")
            for k, item in enumerate(items):
                if not (isinstance(item, (list, tuple)) and len(item) == 2
                        and all(isinstance(v, str) and v for v in item)):
                    raise ValueError(f"item {k} of subset {s!r} in '{path}' is {item!r}; "
                                     "each item must be [file, group] (two strings)")
                file, group = item
                p = base / s / file
                if not p.is_file():
                    p = base / file
                if not p.is_file():
                    missing.append(f"{s}/{file}")
                paths.append(str(p))
                groups.append(f"{s}/{group}")
                subset_of.append(s)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in '{path}' are missing: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; looked in <manifest folder>/<subset>/ and "
                "<manifest folder>/. Restore them or remove them from the manifest")
        if not paths:
            raise ValueError(f"manifest '{path}' lists no images in subsets {chosen}")
        return cls(paths, groups, subsets=subset_of, name=name or path.parent.name, **kw)

    # -- the Benchmark interface
    def evaluate(self, ranks) -> dict:
        """Scores of ``ranks`` (N, n_ranked): image ``q`` queries all images, itself as junk.

        Returns (fractions unless said):
            ``"mAP"``, ``"mP@1"``, ``"mP@5"``: over the queries with at least one positive
            (:func:`~retrieval_lib.search.evaluate.compute_map` on :meth:`ground_truth`; P@k
            as in the revisited protocol).
            ``"R@1"``: fraction of those queries whose first result other than itself is
            of its group (:func:`~retrieval_lib.search.evaluate.recall_from_ranks`); with full
            rankings it equals mP@1, under the name class-level papers use.
            ``"mAP/<subset>"``: mean AP of that subset's queries, ranked against *all*
            images (the other subsets act as distractors).
            ``"N-S/ukbench56"`` (when that subset exists): the UKBench N-S score (0..4) of the
            ukbench56 queries ranked against all images: the mean number of images of the
            query's group (the query itself included) among its top 4
            (:func:`~retrieval_lib.search.evaluate.ns_score`).
        """
        from retrieval_lib.search.evaluate import compute_map, ns_score, recall_from_ranks

        n = len(self.database)
        R = _ranks(ranks, n, n)
        m, aps, mpk, _ = compute_map(R, self.ground_truth(), kappas=(1, 5))
        out = {"mAP": float(m), "mP@1": float(mpk[0]), "mP@5": float(mpk[1])}
        has_pos = np.bincount(self.labels)[self.labels] > 1
        # singletons never have a hit, so the recall over all queries rescales exactly
        r1 = recall_from_ranks(R, self.labels, ks=(1,))[1]
        out["R@1"] = float(r1 * n / has_pos.sum()) if has_pos.any() else float("nan")
        for s in self.subset_names:
            out[f"mAP/{s}"] = _nanmean(aps[self.subsets == s])
        if UKBENCH_SUBSET in self.subset_names:
            rows = np.flatnonzero(self.subsets == UKBENCH_SUBSET)
            # ns_score takes query q = image q: put the ukbench queries' labels first and
            # shift the database indices past them
            out[f"N-S/{UKBENCH_SUBSET}"] = ns_score(R[rows] + len(rows),
                                                    np.concatenate([self.labels[rows], self.labels]))
        return out

    def _build_ground_truth(self) -> list:
        from retrieval_lib.search.evaluate import gnd_from_labels

        return gnd_from_labels(self.labels)

    def summary(self) -> str:
        n_single = int((np.bincount(self.labels) == 1).sum())
        parts = f"{len(self.database)} images in {len(self.group_names)} groups"
        if n_single:
            parts += f" ({n_single} single-image distractor groups)"
        if self.subset_names:
            counts = ", ".join(f"{s} {int((self.subsets == s).sum())}" for s in self.subset_names)
            parts += f"; subsets: {counts}"
        return f"{self.name}: {parts}; each image queries all the others"

    def subset(self, max_images: int) -> "GroupDataset":
        """At most ``max_images`` images, whole groups only, taken round-robin over subsets.

        Groups are visited in order, alternating between subsets so each stays represented;
        a group that does not fit is skipped. The result keeps labels' group names.
        """
        max_images = int(max_images)
        if max_images >= len(self.database):
            return self
        order = {}  # subset -> its groups in order of appearance
        subs = self.subsets if self.subsets is not None else np.full(len(self.labels), "")
        for lab, s in zip(self.labels.tolist(), subs.tolist()):
            order.setdefault(s, [])
            if lab not in order[s]:
                order[s].append(lab)
        sizes = np.bincount(self.labels)
        keep, used = [], 0
        queues = [list(g) for g in order.values()]
        while any(queues):
            for q in queues:
                if q:
                    lab = q.pop(0)
                    if used + sizes[lab] <= max_images:
                        keep.append(lab)
                        used += sizes[lab]
        if not keep:
            raise ValueError(f"no whole group of {self.name} fits in {max_images} images")
        idx = np.flatnonzero(np.isin(self.labels, keep))
        return GroupDataset([self.database.paths[i] for i in idx],
                            [self.group_names[self.labels[i]] for i in idx],
                            subsets=None if self.subsets is None else self.subsets[idx].tolist(),
                            name=f"{self.name}-sub{len(idx)}", **self._opts)


def real171(root=None, **kw) -> GroupDataset:
    """The 171 real photos: ``<root>/real171/manifest.json`` (root: argument, else ``RETRIEVAL_DATA``).

    65 groups in four subsets: wxbs (62 images), evd (30), landmarks23 (23) and
    ukbench56 (56); see ``data/README.md`` for sources and licenses.

    Raises:
        FileNotFoundError: no data root, or no ``real171/manifest.json`` under it.
    """
    r = _root(root)
    manifest = r / "real171" / "manifest.json"
    if not manifest.is_file():
        raise MissingDataError(f"real171 not found: no '{manifest}'; fetch it with `python -m retrieval_lib "
                               f"download real171 --data {r}`, or {DATA_HINT}")
    return GroupDataset.from_manifest(manifest, name="real171", **kw)


def default_benchmark(root=None) -> GroupDataset:
    """:func:`real171` when the data root (``root``, else ``RETRIEVAL_DATA``) holds it, else
    :func:`offline_default`. A data root given but without real171 falls back with a warning."""
    r = Path(root).expanduser() if root is not None else data_root()
    if r is not None:
        if (r / "real171" / "manifest.json").is_file():
            return real171(r)
        warnings.warn(f"no real171/manifest.json under the data root '{r}'; using the offline "
                      "default benchmark (synthetic views of scikit-image photos)", stacklevel=2)
    return offline_default()


# ------------------------------------------------------------------------ offline default
OFFLINE_VERSION = 2  # 2: images resized with engine.extract.resize_longer_side (bicubic)
# colour photos that ship inside scikit-image (no download needed)
_OFFLINE_SOURCES = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle",
                    "hubble_deep_field", "retina")
# greyscale photos and textures, tinted, as single-image distractor groups
_OFFLINE_DISTRACTORS = ("camera", "coins", "moon", "clock", "brick", "grass", "gravel", "text")


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    return img


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3×3 matrix mapping the 4 points ``src`` (4, 2) onto ``dst`` (skimage ProjectiveTransform)."""
    from skimage.transform import ProjectiveTransform

    if hasattr(ProjectiveTransform, "from_estimate"):
        return ProjectiveTransform.from_estimate(src, dst).params
    t = ProjectiveTransform()
    t.estimate(src, dst)
    return t.params


def _view(base, rng: np.random.Generator):
    """One query view of PIL image ``base``: perspective crop, scale, colour change, occlusion."""
    from PIL import Image, ImageDraw

    W, H = base.size
    sx, sy = rng.uniform(0.55, 0.9, size=2)
    cw, ch = sx * W, sy * H
    x0, y0 = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
    quad = np.array([[x0, y0], [x0 + cw, y0], [x0 + cw, y0 + ch], [x0, y0 + ch]])
    quad += rng.uniform(-0.12, 0.12, size=(4, 2)) * [cw, ch]       # perspective
    angle = np.deg2rad(rng.uniform(-12, 12))                         # in-plane rotation
    c = quad.mean(0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    quad = (quad - c) @ rot.T + c
    long = int(rng.integers(320, 481))                               # scale
    size = (long, max(32, round(long * ch / cw))) if cw >= ch else (max(32, round(long * cw / ch)), long)
    out = np.array([[0, 0], [size[0], 0], [size[0], size[1]], [0, size[1]]], dtype=float)
    M = _homography(out, quad)  # output pixel -> base pixel, what PIL's PERSPECTIVE wants
    coeffs = tuple((M / M[2, 2]).ravel()[:8])
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = base.transform(size, Image.PERSPECTIVE, coeffs, resample=Image.BICUBIC, fillcolor=fill)
    gains, gamma = rng.uniform(0.75, 1.25, 3), rng.uniform(0.7, 1.4)  # colour and exposure
    ramp = (np.arange(256) / 255.0) ** gamma
    lut = np.concatenate([np.clip(np.rint(255 * ramp * g), 0, 255) for g in gains]).astype(int)
    img = img.point(lut.tolist())
    if rng.random() < 0.5:                                           # partial occlusion
        area = rng.uniform(0.08, 0.2) * size[0] * size[1]
        aspect = rng.uniform(0.5, 2.0)
        w = int(min(size[0] - 1, np.sqrt(area * aspect)))
        h = int(min(size[1] - 1, area / max(w, 1)))
        ox, oy = int(rng.integers(0, size[0] - w)), int(rng.integers(0, size[1] - h))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        ImageDraw.Draw(img).rectangle([ox, oy, ox + w, oy + h], fill=colour)
    return img


def _build_offline(folder: Path, n_views: int, n_distractors: int, seed: int) -> None:
    """Write the images and manifest.json of the offline default into ``folder``."""
    from PIL import Image

    # the library's one resize (bicubic, longer side); imported here so that reading a
    # data set never loads torch
    from retrieval_lib.engine.extract import resize_longer_side

    subset = "skimage_views"
    (folder / subset).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    items = []
    for name in _OFFLINE_SOURCES:
        photo = resize_longer_side(Image.fromarray(_skimage_photo(name)).convert("RGB"), 720)
        W, H = photo.size
        # two instances per photo: its two halves across the long side (same style, other content)
        halves = ((0, 0, W // 2, H), (W // 2, 0, W, H)) if W >= H else ((0, 0, W, H // 2), (0, H // 2, W, H))
        for part, box in zip("ab", halves):
            base = photo.crop(box)
            group = f"{name}_{part}"
            views = [resize_longer_side(base, 448)] + [_view(base, rng) for _ in range(n_views)]
            for k, img in enumerate(views):
                file = f"{group}_{k}.jpg"
                img.save(folder / subset / file, quality=90)
                items.append([file, group])
    for name in _OFFLINE_DISTRACTORS[:n_distractors]:
        grey = _skimage_photo(name).astype(np.float64)
        h, w = grey.shape
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        tint = rng.uniform(0.5, 1.0, 3)
        rgb = np.clip(grey[y:y + ch, x:x + cw, None] * tint, 0, 255).astype(np.uint8)
        file = f"distractor_{name}.jpg"
        resize_longer_side(Image.fromarray(rgb), int(rng.integers(320, 481))).save(folder / subset / file, quality=90)
        items.append([file, f"distractor_{name}"])
    manifest = {
        "format": "one folder per subset; items list [file, group]; images of one group show "
                  "the same object or place",
        "generator": {"function": "retrieval_lib.data.datasets.offline_default", "version": OFFLINE_VERSION,
                      "seed": seed, "n_views": n_views, "n_distractors": n_distractors},
        "subsets": {subset: {
            "items": items,
            "source": "photos bundled with scikit-image (skimage.data: " + ", ".join(_OFFLINE_SOURCES)
                      + "); each photo is split into two halves, each half a group of the half "
                      "itself and synthetic views (perspective crop, scale, colour, occlusion); "
                      "distractors are tinted crops of "
                      + ", ".join(_OFFLINE_DISTRACTORS[:n_distractors]),
            "license": "see the skimage.data documentation of each image (public domain, CC0 "
                       "or CC-BY)",
        }},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def offline_default(cache_dir=None, n_views: int = 3, n_distractors: int = 4, seed: int = 0,
                    **kw) -> GroupDataset:
    """A small instance-retrieval benchmark generated from scikit-image's bundled photos.

    Works on any machine without downloads. Each of 7 colour photos (chelsea, coffee,
    astronaut, rocket, stereo_motorcycle, hubble_deep_field, retina), resized to 720 px,
    is split at the middle of its long side; each half is an instance (group), so
    every group has a look-alike with other content (the hard negatives). A group holds
    the half itself (448 px long side) and ``n_views`` synthetic query views: a random
    perspective crop (55–90 % of each side, corners moved up to 12 %, rotated up to 12°),
    scaled to 320–480 px, with per-channel gain and gamma changes and, half of the time,
    a solid rectangle hiding 8–20 % of it. ``n_distractors`` (≤ 8) tinted crops of
    scikit-image's greyscale photos are single-image distractor groups. With the defaults:
    14 × 4 + 4 = 60 images, labels known by construction. Off-the-shelf EfficientNet-Lite0
    descriptors score an mAP of about 0.7–0.8 on it, so poolings can still be told apart.

    The JPEGs and a ``manifest.json`` (the format of real171) are written to
    ``<cache_dir>/offline_default_v2/seed<seed>-views<n_views>-distractors<n>/``
    (``cache_dir`` defaults to :func:`cache_root`) by building a temporary folder and
    renaming it, and reused when present. The same seed gives the same pixels.
    It is a teaching and smoke-test default: its numbers are not comparable to any paper.
    """
    if not 0 <= n_distractors <= len(_OFFLINE_DISTRACTORS):
        raise ValueError(f"n_distractors must be in 0..{len(_OFFLINE_DISTRACTORS)}, got {n_distractors}")
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    parent = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    parent = parent / f"offline_default_v{OFFLINE_VERSION}"
    final = parent / f"seed{seed}-views{n_views}-distractors{n_distractors}"
    name = "offline_default"
    if (final / "manifest.json").is_file():
        try:
            return GroupDataset.from_manifest(final / "manifest.json", name=name, **kw)
        except (FileNotFoundError, ValueError):  # damaged by hand: build it again
            shutil.rmtree(final)
    elif final.exists():
        shutil.rmtree(final)  # no manifest: an incomplete folder (the rename never happened)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".offline_default-", dir=parent))
    try:
        _build_offline(tmp / "data", n_views, n_distractors, seed)
        try:
            os.rename(tmp / "data", final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GroupDataset.from_manifest(final / "manifest.json", name=name, **kw)


# ------------------------------------------------------------------ revisited Oxford/Paris
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
    root = _root(root)
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
        root = _root(root)
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
        from :func:`~retrieval_lib.search.evaluate.evaluate_revisited`."""
        from retrieval_lib.search.evaluate import evaluate_revisited

        R = _ranks(ranks, len(self.queries), len(self.database))
        res = evaluate_revisited(R, self.gnd, kappas=(1, 5, 10))
        out = {f"mAP/{p}": float(res[p]["mAP"]) for p in ("easy", "medium", "hard")}
        for p in ("easy", "medium", "hard"):
            out.update({f"mP@{k}/{p}": float(v) for k, v in res[p]["mP@k"].items()})
        return out

    def _build_ground_truth(self) -> list:
        from retrieval_lib.search.evaluate import revisited_protocol

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
    base = _root(root) / name
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


# ------------------------------------------------------------------------------- CUB-200
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
        base = _root(root) / "CUB_200_2011"
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
        one of their class (:func:`~retrieval_lib.search.evaluate.recall_from_ranks`)."""
        from retrieval_lib.search.evaluate import recall_from_ranks

        n = len(self.database)
        R = _ranks(ranks, n, n)
        return {f"R@{k}": v for k, v in recall_from_ranks(R, self.labels, ks=(1, 2, 4, 8)).items()}

    def _build_ground_truth(self) -> list:
        from retrieval_lib.search.evaluate import gnd_from_labels

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
    root = _root(root)
    base = root / "CUB_200_2011"
    if (base / "images.txt").is_file():
        return base
    arc = download(CUB_URL, root / "CUB_200_2011.tgz", md5=CUB_MD5, progress=progress)
    extract_archive(arc, root, overwrite=True)
    if not keep_archive:
        arc.unlink()
    return base
