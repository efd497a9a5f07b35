"""Photos in groups of the same object or place (:class:`GroupDataset`): your own photos
(one sub-folder per group, or a ``manifest.json``) and :func:`real171`, the 171 real photos
every ``cpu``-scale number of the book is measured on. Taught in ``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from retrieval_lib.data.benchmark import Benchmark, check_ranks
from retrieval_lib.data.images import MAX_ASPECT, MIN_SIZE, ImageList
from retrieval_lib.data.roots import DATA_HINT, IMAGE_EXTENSIONS, require_root
from retrieval_lib.errors import MissingDataError
from retrieval_lib.metrics import compute_map, gnd_from_labels, ns_score, recall_from_ranks

__all__ = ["GroupDataset", "real171", "UKBENCH_SUBSET"]

UKBENCH_SUBSET = "ukbench56"


def _nanmean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


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
            (:func:`~retrieval_lib.metrics.compute_map` on :meth:`ground_truth`; P@k
            as in the revisited protocol).
            ``"R@1"``: fraction of those queries whose first result other than itself is
            of its group (:func:`~retrieval_lib.metrics.recall_from_ranks`); with full
            rankings it equals mP@1, under the name class-level papers use.
            ``"mAP/<subset>"``: mean AP of that subset's queries, ranked against *all*
            images (the other subsets act as distractors).
            ``"N-S/ukbench56"`` (when that subset exists): the UKBench N-S score (0..4) of the
            ukbench56 queries ranked against all images: the mean number of images of the
            query's group (the query itself included) among its top 4
            (:func:`~retrieval_lib.metrics.ns_score`).
        """
        n = len(self.database)
        R = check_ranks(ranks, n, n)
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
    r = require_root(root)
    manifest = r / "real171" / "manifest.json"
    if not manifest.is_file():
        raise MissingDataError(f"real171 not found: no '{manifest}'; fetch it with `python -m retrieval_lib "
                               f"download real171 --data {r}`, or {DATA_HINT}")
    return GroupDataset.from_manifest(manifest, name="real171", **kw)
