"""Training objectives: the losses of :mod:`retrieval_lib.layers.losses` applied to a miner's batch.

The trainer (:mod:`retrieval_lib.engine.trainer`) describes the images of a batch once and
hands an objective the descriptors laid out like the batch's ``"images"``: ``(T, 2 + k, D)``
for cirtorch tuples (:class:`~retrieval_lib.engine.mining.TupleMiner`), ``(P K, D)`` for
class-balanced batches (:class:`~retrieval_lib.engine.mining.PKMiner`). A model with a
classifier gives ``(descriptors, logits)`` laid out the same way.

An objective is any callable ``objective(outputs, batch) -> scalar``. The ones here share one
small base, :class:`Objective` (as pytorch-metric-learning's ``BaseMetricLossFunction``):
``objective(outputs, batch)`` calls ``forward(outputs, labels)`` with the batch's labels
(``None`` for tuple batches, whose layout says which pairs match), and ``config()`` -- what a
checkpoint records about the loss -- comes from the dataclass fields. :class:`CombinedLoss`
sums several (pytorch-metric-learning's ``MultipleLosses``). Taught in
``notebooks/05_wgem.ipynb`` (tuples), ``06_darac`` (rank losses) and ``07_cgd`` (CGD's losses).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch

from retrieval_lib.layers.losses import (batch_hard_triplet_loss, contrastive_loss, nra_like_loss, smooth_ap_loss,
                                         smoothed_cross_entropy, triplet_loss)

__all__ = ["Objective", "TupleLoss", "BatchHardLoss", "BranchBatchHardLoss", "ClassificationLoss", "RankLoss",
           "CombinedLoss", "cgd_objective"]


def _descriptors(outputs) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


class Objective:
    """Base of the objectives: ``self(outputs, batch)`` is ``self.forward(outputs, batch["labels"])``.

    A subclass is a dataclass with a ``tag`` (the ``"objective"`` name its :meth:`config`
    records) and ``forward(outputs, labels) -> scalar``; ``outputs`` is the model's output for
    the batch (descriptors, or a tuple starting with them), ``labels`` a ``(B,)`` tensor or None.
    """

    tag: ClassVar[str] = "objective"

    def __call__(self, outputs, batch) -> torch.Tensor:
        return self.forward(outputs, batch.get("labels"))

    def forward(self, outputs, labels: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        return {"objective": self.tag, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@dataclasses.dataclass
class TupleLoss(Objective):
    """Contrastive or triplet loss of cirtorch tuples ``(q, p, n_1 .. n_k)``.

    * ``"contrastive"``: the pairs ``(q, p)`` (matching) and ``(q, n_i)`` (non-matching),
      :func:`~retrieval_lib.layers.losses.contrastive_loss`, mean over the ``T (1 + k)`` pairs
      (cirtorch sums them; the mean only rescales the learning rate).
    * ``"triplet"``: the triplets ``(q, p, n_i)``, :func:`~retrieval_lib.layers.losses.triplet_loss`,
      mean over the ``T k`` triplets.

    Every process of a distributed run holds the same number of tuples, so the mean of the
    per-process means is the mean over the whole batch.
    """

    tag: ClassVar[str] = "tuple"
    loss: str = "contrastive"
    margin: float = 0.7
    squared: bool = False

    def __post_init__(self):
        if self.loss not in ("contrastive", "triplet"):
            raise ValueError(f"TupleLoss: loss must be 'contrastive' or 'triplet', got {self.loss!r}")
        self.margin, self.squared = float(self.margin), bool(self.squared)

    def forward(self, outputs, labels=None) -> torch.Tensor:
        D = _descriptors(outputs)  # (T, 2 + k, D)
        if D.dim() != 3 or D.shape[1] < 2:
            raise ValueError(f"TupleLoss needs tuple batches (T, 2 + k, D), got descriptors of shape "
                             f"{tuple(D.shape)}; use it with TupleMiner")
        T, m, d = D.shape
        q = D[:, :1]  # (T, 1, D)
        if self.loss == "contrastive":
            x1 = q.expand(-1, m - 1, -1).reshape(-1, d)  # (T (1 + k), D)
            x2 = D[:, 1:].reshape(-1, d)
            y = torch.zeros(T, m - 1, dtype=torch.int64, device=D.device)
            y[:, 0] = 1
            return contrastive_loss(x1, x2, y.reshape(-1), self.margin)
        if m < 3:
            raise ValueError("TupleLoss('triplet') needs negatives in the tuples; build the miner with n_neg >= 1")
        k = m - 2
        anchor = q.expand(-1, k, -1).reshape(-1, d)  # (T k, D)
        positive = D[:, 1:2].expand(-1, k, -1).reshape(-1, d)
        return triplet_loss(anchor, positive, D[:, 2:].reshape(-1, d), self.margin, squared=self.squared)


@dataclasses.dataclass
class BatchHardLoss(Objective):
    """Batch-hard triplet loss over a P x K batch (``batch["labels"]``), Hermans et al. 2017.

    The hardest pairs are looked for inside each process's share of the batch.
    """

    tag: ClassVar[str] = "batch_hard"
    margin: float = 0.1

    def __post_init__(self):
        self.margin = float(self.margin)

    def forward(self, outputs, labels) -> torch.Tensor:
        D = _descriptors(outputs)  # (P K, D)
        return batch_hard_triplet_loss(D, labels.to(D.device), self.margin)


@dataclasses.dataclass
class BranchBatchHardLoss(Objective):
    """CGD's architecture A ranking loss: a batch-hard triplet loss on every branch's block, summed.

    Needs a ``CGD(..., arch="A")`` head, whose training output ends with the blocks ``(B, n, k)``.
    """

    tag: ClassVar[str] = "branch_batch_hard"
    margin: float = 0.1

    def __post_init__(self):
        self.margin = float(self.margin)

    def forward(self, outputs, labels) -> torch.Tensor:
        blocks = outputs[-1] if isinstance(outputs, (tuple, list)) else None
        if blocks is None or blocks.dim() != 3:
            raise ValueError("BranchBatchHardLoss needs the per-branch blocks (B, n, k): use it with "
                             "CGD(..., arch='A') in train mode")
        labels = labels.to(blocks.device)
        return sum(batch_hard_triplet_loss(blocks[:, i], labels, self.margin) for i in range(blocks.shape[1]))


@dataclasses.dataclass
class ClassificationLoss(Objective):
    """Smoothed, temperature-scaled cross-entropy of a classifier's logits (CGD's auxiliary loss).

    Needs a model with a classifier (outputs ``(descriptors, logits)``) and batches with
    ``"labels"`` in ``0 .. n_classes - 1``.
    """

    tag: ClassVar[str] = "classification"
    smoothing: float = 0.1
    temperature: float = 0.5

    def __post_init__(self):
        self.smoothing, self.temperature = float(self.smoothing), float(self.temperature)

    def forward(self, outputs, labels) -> torch.Tensor:
        if not isinstance(outputs, (tuple, list)) or len(outputs) < 2:
            raise ValueError("ClassificationLoss needs logits: build the model with a classifier "
                             "(RetrievalNet(..., classifier=nn.Linear(D, n_classes)))")
        logits = outputs[1]
        return smoothed_cross_entropy(logits, labels.to(logits.device), self.smoothing, self.temperature)


_RANK_LOSSES = {"smoothap": smooth_ap_loss, "nra": nra_like_loss}


class RankLoss(Objective):
    """A rank loss of a P x K batch (``batch["labels"]``) as a training objective.

    ``"smoothap"``: :func:`~retrieval_lib.layers.losses.smooth_ap_loss`; ``"nra"``:
    :func:`~retrieval_lib.layers.losses.nra_like_loss` (our loss after NRA's description).
    Keyword arguments go to the loss (``tau``, ``gamma``). Batches come from
    :class:`~retrieval_lib.engine.mining.PKMiner`.
    """

    tag: ClassVar[str] = "rank"

    def __init__(self, name: str, **kwargs):
        if name not in _RANK_LOSSES:
            raise ValueError(f"RankLoss: unknown loss {name!r}; choose one of {sorted(_RANK_LOSSES)}")
        self.name, self.kwargs = name, dict(kwargs)

    def forward(self, outputs, labels) -> torch.Tensor:
        D = _descriptors(outputs)  # (P K, D)
        return _RANK_LOSSES[self.name](D, labels.to(D.device), **self.kwargs)

    def config(self) -> dict:
        return {"objective": self.tag, "loss": self.name, **self.kwargs}

    def __repr__(self) -> str:
        return f"RankLoss({self.name!r}, " + ", ".join(f"{k}={v}" for k, v in self.kwargs.items()) + ")"


class CombinedLoss(Objective):
    """A weighted sum of objectives, e.g. CGD's ranking + classification loss:
    ``CombinedLoss([(BatchHardLoss(0.1), 1.0), (ClassificationLoss(), 1.0)])``.

    Each term is called with the whole batch, so it may be any ``objective(outputs, batch)``."""

    tag: ClassVar[str] = "combined"

    def __init__(self, terms):
        self.terms = [(obj, float(w)) for obj, w in terms]
        if not self.terms:
            raise ValueError("CombinedLoss: give at least one (objective, weight) pair")

    def __call__(self, outputs, batch) -> torch.Tensor:
        return sum(w * obj(outputs, batch) for obj, w in self.terms)

    def forward(self, outputs, labels) -> torch.Tensor:
        return self(outputs, {"labels": labels})

    def config(self) -> dict:
        return {"objective": self.tag,
                "terms": [[getattr(obj, "config", lambda o=obj: repr(o))(), w] for obj, w in self.terms]}

    def __repr__(self) -> str:
        return "CombinedLoss(" + ", ".join(f"{w} * {obj!r}" for obj, w in self.terms) + ")"


def cgd_objective(arch: str = "cgd", aux: bool = True, margin: float = 0.1, smoothing: float = 0.1,
                  temperature: float = 0.5) -> CombinedLoss:
    """CGD's loss: batch-hard triplet (``margin``) + smoothed cross-entropy (``smoothing``,
    ``temperature``), equal weights; ``aux=False`` keeps the ranking loss alone; ``arch="A"``
    ranks every branch apart (:class:`BranchBatchHardLoss`)."""
    rank = BranchBatchHardLoss(margin) if arch == "A" else BatchHardLoss(margin)
    terms = [(rank, 1.0)]
    if aux:
        terms.append((ClassificationLoss(smoothing, temperature), 1.0))
    return CombinedLoss(terms)
