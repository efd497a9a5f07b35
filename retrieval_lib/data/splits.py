"""Splits of a data set by group, and a data set's images selected by a mask.

* :func:`split_groups` -- a split by group: every image of a group falls on one side, so no
  object is both trained on and evaluated (taught in ``notebooks/03_gem.ipynb``);
* :func:`take` -- the images of a :class:`~retrieval_lib.data.datasets.GroupDataset` where a
  mask is True, as a new GroupDataset (a validation split, one side of a split).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from retrieval_lib.data.datasets import GroupDataset

__all__ = ["split_groups", "take"]


def split_groups(labels, frac: float = 0.5, seed: int = 0) -> np.ndarray:
    """Split images by group: ``(N,)`` bool, True for images of the training groups.

    The groups (distinct labels) are shuffled with ``seed`` and the first
    ``round(frac * n_groups)`` become training groups; every image of a group falls on the
    same side, so no object is seen in training and testing. Raises ``ValueError`` unless
    both sides get at least one group.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise ValueError(f"split_groups: labels must be a non-empty 1-D array, got shape {lab.shape}")
    groups = np.unique(lab)
    n_train = int(round(frac * len(groups)))
    if not 0 < n_train < len(groups):
        raise ValueError(f"split_groups: frac={frac} puts {n_train} of {len(groups)} groups in training; "
                         "both sides need at least one group (use 0 < frac < 1 and more groups)")
    rng = np.random.default_rng(seed)
    train_groups = rng.permutation(groups)[:n_train]
    return np.isin(lab, train_groups)


def take(dataset, keep, name: Optional[str] = None) -> GroupDataset:
    """The images of a GroupDataset where ``keep`` ``(N,)`` is True, as a new GroupDataset
    (group names, subsets and image checks kept). Raises ``ValueError`` when ``keep`` is not
    one bool per image or selects nothing."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(dataset.labels),):
        raise ValueError(f"take: keep must be a ({len(dataset.labels)},) bool mask, one per image, "
                         f"got shape {keep.shape}")
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise ValueError("take: the mask selects no image")
    groups = [dataset.group_names[dataset.labels[i]] for i in idx]
    subsets = None if dataset.subsets is None else dataset.subsets[idx].tolist()
    return GroupDataset([dataset.database.paths[i] for i in idx], groups, subsets=subsets,
                        name=name or f"{dataset.name}-{idx.size}", **dataset._opts)
