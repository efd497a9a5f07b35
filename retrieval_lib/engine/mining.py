"""What a training run learns from: honest splits by group, pairs, tuples and class-balanced batches.

* :func:`mine_pairs` -- mined hard negatives (taught in ``notebooks/03_gem.ipynb``, with
  :func:`~retrieval_lib.data.splits.split_groups`, a split by group, importable from here too).
* :func:`honest_split` -- real171's training groups (UKBench56, landmarks23, plus the
  offline default photos) and its evaluated groups (WxBS, EVD), disjoint by construction.
* :func:`positive_pairs`, :func:`hardest_negatives`, :class:`TupleMiner` -- cirtorch's
  tuples ``(query, positive, n_1 .. n_k)`` with negatives re-mined every epoch by the
  current descriptors (Radenović, Tolias & Chum, TPAMI 2018).
* :class:`PKMiner` -- P classes x K images per batch, for batch-hard triplets and CGD.

A *miner* gives the trainer (:mod:`retrieval_lib.engine.trainer`) one epoch's batches at
a time: ``miner.plan(describe, generator)`` returns a list of dicts of int64 tensors
whose first dimension is the batch's rows, with the global image indices under
``"images"`` (``(T, 2 + k)`` tuples or ``(P K,)`` images). Taught in ``notebooks/05_wgem.ipynb``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from retrieval_lib.data.datasets import GroupDataset, data_root, offline_default, real171
from retrieval_lib.data.splits import split_groups, take

__all__ = ["split_groups", "mine_pairs", "honest_split", "Split", "positive_pairs", "hardest_negatives",
           "TupleMiner", "PKMiner", "TRAIN_SUBSETS", "EVAL_SUBSETS", "OFFLINE_TRAIN_PHOTOS"]


def mine_pairs(X: torch.Tensor, labels, n_neg: int = 5, mask=None):
    """Training pairs from group labels: every matching pair, plus hard non-matching ones.

    * Positives: every pair ``(i, j)``, ``i < j``, of images with the same label.
    * Negatives: for each image that has a positive, its ``n_neg`` most similar images
      (largest ``X @ X.T``) with another label -- the hard negatives of Radenović et al.,
      mined here once from the descriptors ``X`` you pass.

    Only images with ``mask`` True (``(N,)`` bool, default all) take part. Shapes ``X (N, D)``,
    ``labels (N,)``; returns int64 tensors ``(i, j, y)`` on ``X``'s device, positives first
    (``y = 1``), then negatives (``y = 0``). Raises ``ValueError`` when there is no positive pair.
    """
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError("mine_pairs: X must be a (N, D) tensor of descriptors")
    n = X.shape[0]
    lab = torch.as_tensor(np.asarray(labels), device=X.device)
    if lab.shape != (n,):
        raise ValueError(f"mine_pairs: labels must have shape ({n},), one per row of X, got {tuple(lab.shape)}")
    if isinstance(n_neg, bool) or not isinstance(n_neg, int) or n_neg < 0:
        raise ValueError(f"mine_pairs: n_neg must be an integer >= 0, got {n_neg!r}")
    keep = torch.ones(n, dtype=torch.bool, device=X.device) if mask is None else \
        torch.as_tensor(np.asarray(mask), dtype=torch.bool, device=X.device)
    if keep.shape != (n,):
        raise ValueError(f"mine_pairs: mask must have shape ({n},), got {tuple(keep.shape)}")
    both = keep[:, None] & keep[None, :]
    same = (lab[:, None] == lab[None, :]) & both
    pos = torch.triu(same, diagonal=1).nonzero()  # (P, 2), i < j
    if pos.shape[0] == 0:
        raise ValueError("mine_pairs: no two kept images share a label, so there is no matching pair "
                         "to learn from; keep more images per group")
    i_pos, j_pos = pos[:, 0], pos[:, 1]
    anchors = (same.sum(dim=1) > 1).nonzero().flatten()  # images with a positive (besides themselves)
    parts_i, parts_j = [i_pos], [j_pos]
    k = min(n_neg, n)
    if k > 0 and anchors.numel():
        S = X[anchors] @ X.T  # (A, N)
        valid = both[anchors] & (lab[anchors][:, None] != lab[None, :])
        S = S.masked_fill(~valid, float("-inf"))
        top = S.topk(k, dim=1)
        real = torch.isfinite(top.values)  # fewer than k valid negatives: drop the -inf fill
        parts_i.append(anchors[:, None].expand(-1, k)[real])
        parts_j.append(top.indices[real])
    i = torch.cat(parts_i)
    j = torch.cat(parts_j)
    y = torch.zeros(i.shape[0], dtype=torch.int64, device=X.device)
    y[: i_pos.shape[0]] = 1
    return i, j, y


# --------------------------------------------------------------------------- the honest split
TRAIN_SUBSETS = ("ukbench56", "landmarks23")
EVAL_SUBSETS = ("wxbs", "evd")
# offline default (no real171): the photos whose two halves train; the other photos and the
# distractors are evaluated. Both halves of a photo stay on one side (they share its style).
OFFLINE_TRAIN_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@dataclasses.dataclass
class Split:
    """A training set and an evaluation set that share no group (nor any image file)."""

    train: "object"  # GroupDataset
    test: "object"  # GroupDataset
    source: str  # "real171" or "offline_default"

    def summary(self) -> str:
        return f"{self.source} split -- train: {self.train.summary()} | evaluate: {self.test.summary()}"


def _group_of(ds) -> list:
    return [ds.group_names[k] for k in ds.labels.tolist()]


def _concat(parts, name: str):
    paths, groups, subsets = [], [], []
    for ds in parts:
        paths += list(ds.database.paths)
        groups += _group_of(ds)
        subsets += ds.subsets.tolist() if ds.subsets is not None else [ds.name] * len(ds.labels)
    return GroupDataset(paths, groups, subsets=subsets, name=name, **parts[0]._opts)


def _offline_photo(group: str) -> str:
    """``"skimage_views/chelsea_a"`` -> ``"chelsea"``; distractors keep their own name."""
    name = group.split("/", 1)[-1]
    return name[:-2] if name[-2:] in ("_a", "_b") else name


def _offline_split(offline):
    photos = np.array([_offline_photo(g) for g in _group_of(offline)])
    known = {_offline_photo(g) for g in offline.group_names}
    missing = [p for p in OFFLINE_TRAIN_PHOTOS if p not in known]
    if missing:
        raise ValueError(f"honest_split: the offline default has no photo {missing}; it has "
                         f"{sorted(known)} -- rebuild it with offline_default()")
    return np.isin(photos, OFFLINE_TRAIN_PHOTOS)


def honest_split(root=None, with_offline: bool = True, offline_cache=None) -> Split:
    """Training and evaluation images that share no group: no evaluated object is ever trained on.

    With real171 under the data root (``root``, else ``RETRIEVAL_DATA``):

    * train: the ``ukbench56`` and ``landmarks23`` subsets (:data:`TRAIN_SUBSETS`), plus,
      with ``with_offline``, every group of :func:`~retrieval_lib.data.datasets.offline_default`;
    * evaluate: the ``wxbs`` and ``evd`` subsets (:data:`EVAL_SUBSETS`) only.

    Without real171 the offline default is split by source photo: both halves of the photos
    in :data:`OFFLINE_TRAIN_PHOTOS` train, the other photos and the single-image distractors
    are evaluated (the two halves of a photo share its colours and style, so they never
    straddle the split). Returns a :class:`Split` (``train``, ``test``: GroupDatasets;
    ``source``). Augmented views and composites are made from ``split.train`` only
    (:func:`retrieval_lib.data.views.make_views`). Raises ``RuntimeError`` if the two
    sides ever shared a group name or an image file (a broken manifest).
    """
    r = Path(root).expanduser() if root is not None else data_root()
    if r is not None and (r / "real171" / "manifest.json").is_file():
        test = real171(r, subsets=list(EVAL_SUBSETS))
        train = real171(r, subsets=list(TRAIN_SUBSETS))
        if with_offline:
            train = _concat([train, offline_default(offline_cache)], "real171-train+offline")
        else:
            train.name = "real171-train"
        test.name = "real171-eval"
        source = "real171"
    else:
        offline = offline_default(offline_cache)
        is_train = _offline_split(offline)
        train = take(offline, is_train, "offline_default-train")
        test = take(offline, ~is_train, "offline_default-eval")
        source = "offline_default"
    shared = set(train.group_names) & set(test.group_names)
    files = {str(Path(p).resolve()) for p in train.database.paths} & \
        {str(Path(p).resolve()) for p in test.database.paths}
    if shared or files:
        raise RuntimeError(f"honest_split: training and evaluation share groups {sorted(shared)[:5]} "
                           f"or files {sorted(files)[:5]}; fix the manifest so each group is in one subset")
    return Split(train, test, source)


# --------------------------------------------------------------------------- tuples (cirtorch)
def _as_labels(labels, who: str) -> torch.Tensor:
    lab = torch.as_tensor(np.asarray(labels))
    if lab.dim() != 1 or lab.numel() == 0 or lab.dtype.is_floating_point or lab.dtype == torch.bool:
        raise ValueError(f"{who}: labels must be a non-empty 1-D array of integer group ids, got "
                         f"shape {tuple(lab.shape)} and dtype {lab.dtype}")
    return lab.long()


def positive_pairs(labels):
    """Every ordered pair ``(q, p)``, ``q != p``, of images with the same label.

    The query/positive pool of :class:`TupleMiner` for a set of groups (rSfM-120k ships its
    own pool instead). Returns two int64 tensors ``(qidxs, pidxs)``, sorted by ``q`` then ``p``.
    """
    lab = _as_labels(labels, "positive_pairs")
    same = (lab[:, None] == lab[None, :]) & ~torch.eye(len(lab), dtype=torch.bool)
    q, p = same.nonzero(as_tuple=True)
    return q, p


def hardest_negatives(Q: torch.Tensor, q_labels, P: torch.Tensor, p_labels, n_neg: int,
                      chunk: int = 256) -> torch.Tensor:
    """cirtorch's negatives: per query the most similar pool images of other groups, at most one per group.

    For query ``q`` the pool images are ranked by similarity ``Q[q] @ P.T`` (highest first);
    walking down the ranking, an image is taken when its label differs from the query's
    and from the labels of the negatives taken so far, until ``n_neg`` are taken
    (``TuplesDataset.create_epoch_tuples`` in cirtorch, vectorised over queries in chunks
    of ``chunk``). Shapes ``Q (n_q, D)``, ``q_labels (n_q,)``, ``P (n_pool, D)``,
    ``p_labels (n_pool,)``; returns ``(n_q, n_neg)`` int64 positions into the pool, in
    ranking order, on ``Q``'s device.

    Raises ``ValueError`` when a query has fewer than ``n_neg`` other groups in the pool
    (enlarge the pool or lower ``n_neg``).
    """
    if Q.dim() != 2 or P.dim() != 2 or Q.shape[1] != P.shape[1]:
        raise ValueError(f"hardest_negatives: Q and P must be (n, D) with the same D, got "
                         f"{tuple(Q.shape)} and {tuple(P.shape)}")
    ql = torch.as_tensor(np.asarray(q_labels), device=Q.device).long()
    pl = torch.as_tensor(np.asarray(p_labels), device=Q.device).long()
    if ql.shape != (Q.shape[0],) or pl.shape != (P.shape[0],):
        raise ValueError("hardest_negatives: one label per row of Q and of P")
    if isinstance(n_neg, bool) or not isinstance(n_neg, int) or n_neg < 1:
        raise ValueError(f"hardest_negatives: n_neg must be an integer >= 1, got {n_neg!r}")
    out = []
    for s in range(0, Q.shape[0], chunk):
        S = Q[s:s + chunk] @ P.T  # (c, n_pool)
        order = S.argsort(dim=1, descending=True, stable=True)  # (c, n_pool) pool positions, best first
        lab = pl[order]  # (c, n_pool) labels in ranking order
        # first occurrence of every label along a row: sort labels stably, mark where they change
        lab_sorted, perm = lab.sort(dim=1, stable=True)
        starts = torch.ones_like(lab_sorted, dtype=torch.bool)
        starts[:, 1:] = lab_sorted[:, 1:] != lab_sorted[:, :-1]
        first = torch.zeros_like(starts).scatter_(1, perm, starts)
        ok = first & (lab != ql[s:s + chunk, None])
        count = ok.cumsum(dim=1)
        short = (count[:, -1] < n_neg).nonzero().flatten()
        if short.numel():
            q = s + int(short[0])
            raise ValueError(f"hardest_negatives: query {q} finds only {int(count[short[0], -1])} pool images "
                             f"of other groups (one per group), fewer than n_neg={n_neg}; enlarge the "
                             "pool (more groups) or lower n_neg")
        take = ok & (count <= n_neg)
        out.append(order[take].view(-1, n_neg))  # row-major: ranking order kept
    return torch.cat(out)


Describe = Callable[[torch.Tensor], torch.Tensor]


def _check_int(value, name: str, who: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class TupleMiner:
    """cirtorch's training tuples ``(q, p, n_1 .. n_k)``, re-mined every epoch.

    Each epoch (:meth:`plan`) draws ``n_queries`` query/positive pairs at random from the
    pair pool (``queries``/``positives``, default every ordered pair of a group:
    :func:`positive_pairs`), draws ``pool_size`` random images as the negative pool,
    describes queries and pool with the *current* model (``describe``), and picks each
    query's ``n_neg`` hardest negatives (:func:`hardest_negatives`: other groups, at most
    one image per group). Tuples are cut into batches of ``batch_size`` (an incomplete last
    batch is dropped, as cirtorch's loader does). cirtorch's defaults for rSfM-120k are
    ``n_neg=5, n_queries=2000, pool_size=20000 (22000 in its README), batch_size=5``.

    Batches: ``{"images": (batch_size, 2 + n_neg) int64}`` global image indices, column 0
    the query, column 1 its positive, then the negatives.
    """

    needs_descriptors = True

    def __init__(self, labels, n_neg: int = 5, n_queries: int = 2000, pool_size: int = 20000,
                 batch_size: int = 5, queries=None, positives=None):
        self.labels = _as_labels(labels, "TupleMiner")
        self.n_neg = _check_int(n_neg, "n_neg", "TupleMiner", minimum=0)
        self.batch_size = _check_int(batch_size, "batch_size", "TupleMiner")
        n = len(self.labels)
        if (queries is None) != (positives is None):
            raise ValueError("TupleMiner: give both queries and positives (one positive per query) or neither")
        if queries is None:
            self.queries, self.positives = positive_pairs(self.labels)
        else:
            self.queries = torch.as_tensor(np.asarray(queries)).long().reshape(-1)
            self.positives = torch.as_tensor(np.asarray(positives)).long().reshape(-1)
            if self.queries.shape != self.positives.shape:
                raise ValueError("TupleMiner: queries and positives must have the same length")
            both = torch.cat([self.queries, self.positives])
            if both.numel() and (int(both.min()) < 0 or int(both.max()) >= n):
                raise ValueError(f"TupleMiner: query/positive indices must be in 0..{n - 1}")
        if self.queries.numel() == 0:
            raise ValueError("TupleMiner: no query/positive pair: no two images share a label; "
                             "every group needs at least two images")
        self.n_queries = min(_check_int(n_queries, "n_queries", "TupleMiner"), len(self.queries))
        self.pool_size = min(_check_int(pool_size, "pool_size", "TupleMiner"), n)
        if self.n_queries < self.batch_size:
            raise ValueError(f"TupleMiner: {self.n_queries} queries per epoch make no batch of "
                             f"batch_size={self.batch_size}; lower batch_size or add pairs")

    def batches_per_epoch(self) -> int:
        return self.n_queries // self.batch_size

    def config(self) -> dict:
        return {"kind": "tuples", "n_neg": self.n_neg, "n_queries": self.n_queries,
                "pool_size": self.pool_size, "batch_size": self.batch_size, "n_images": len(self.labels),
                "n_pairs": len(self.queries)}

    def plan(self, describe: Optional[Describe], generator: torch.Generator) -> list:
        """One epoch of batches; ``describe(indices) -> (len, D)`` runs the current model."""
        pick = torch.randperm(len(self.queries), generator=generator)[: self.n_queries]
        q, p = self.queries[pick], self.positives[pick]
        cols = [q[:, None], p[:, None]]
        if self.n_neg > 0:
            if describe is None:
                raise ValueError("TupleMiner.plan: mining negatives needs describe (the current model)")
            pool = torch.randperm(len(self.labels), generator=generator)[: self.pool_size]
            uniq, inv = torch.unique(torch.cat([q, pool]), return_inverse=True)
            X = describe(uniq)  # (len(uniq), D) current descriptors
            Qd, Pd = X[inv[: len(q)]], X[inv[len(q):]]
            neg = hardest_negatives(Qd, self.labels[q], Pd, self.labels[pool], self.n_neg)
            cols.append(pool[neg.cpu()])
        tuples = torch.cat(cols, dim=1)  # (n_queries, 2 + n_neg)
        nb = self.batches_per_epoch()
        return [{"images": tuples[b * self.batch_size:(b + 1) * self.batch_size]} for b in range(nb)]

    def __repr__(self) -> str:
        c = self.config()
        return (f"TupleMiner({c['n_images']} images, {c['n_pairs']} pairs; per epoch {c['n_queries']} "
                f"queries, pool {c['pool_size']}, {c['n_neg']} negatives, batches of {c['batch_size']})")


class PKMiner:
    """Class-balanced batches: ``P`` classes x ``K`` images (Hermans et al. 2017; CGD).

    Each epoch the classes with at least two images are shuffled and cut into groups of
    ``P`` (a remainder smaller than ``P`` is dropped); each class contributes ``K`` of its
    images, drawn without replacement, or with replacement when it has fewer than ``K``.
    Batches: ``{"images": (P K,) int64, "labels": (P K,) int64}``, class-major (the ``K``
    images of a class are adjacent). No descriptors are needed.

    Under DistributedDataParallel each process takes a contiguous share of the rows, so
    ``P`` must be a multiple of the number of processes for every share to hold whole classes.
    """

    needs_descriptors = False

    def __init__(self, labels, P: int = 8, K: int = 4):
        self.labels = _as_labels(labels, "PKMiner")
        self.P = _check_int(P, "P", "PKMiner", minimum=2)
        self.K = _check_int(K, "K", "PKMiner", minimum=2)
        classes, counts = torch.unique(self.labels, return_counts=True)
        self.classes = classes[counts >= 2]
        if len(self.classes) < self.P:
            raise ValueError(f"PKMiner: only {len(self.classes)} classes have two or more images, fewer "
                             f"than P={self.P}; lower P or add images")
        order = torch.argsort(self.labels, stable=True)
        self._members = {int(c): order[self.labels[order] == c] for c in self.classes}

    def batches_per_epoch(self) -> int:
        return len(self.classes) // self.P

    def config(self) -> dict:
        return {"kind": "pk", "P": self.P, "K": self.K, "n_images": len(self.labels),
                "n_classes": len(self.classes)}

    def plan(self, describe: Optional[Describe], generator: torch.Generator) -> list:
        perm = self.classes[torch.randperm(len(self.classes), generator=generator)]
        out = []
        for b in range(self.batches_per_epoch()):
            idx, lab = [], []
            for c in perm[b * self.P:(b + 1) * self.P].tolist():
                m = self._members[c]
                if len(m) >= self.K:
                    pick = m[torch.randperm(len(m), generator=generator)[: self.K]]
                else:
                    pick = m[torch.randint(len(m), (self.K,), generator=generator)]
                idx.append(pick)
                lab.append(torch.full((self.K,), c, dtype=torch.int64))
            out.append({"images": torch.cat(idx), "labels": torch.cat(lab)})
        return out

    def __repr__(self) -> str:
        return f"PKMiner(P={self.P}, K={self.K}, {len(self.classes)} classes, {len(self.labels)} images)"
