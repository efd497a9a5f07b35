"""Training objectives: the losses of :mod:`retrieval_lib.layers.losses` applied to a miner's batch.

The trainer (:mod:`retrieval_lib.engine.trainer`) describes the images of a batch once and
hands an objective the descriptors laid out like the batch's ``"images"``: ``(T, 2 + k, D)``
for cirtorch tuples (:class:`~retrieval_lib.engine.mining.TupleMiner`), ``(P K, D)`` for
class-balanced batches (:class:`~retrieval_lib.engine.mining.PKMiner`). A model with a
classifier gives ``(descriptors, logits)`` laid out the same way. An objective is any
callable ``objective(outputs, batch) -> scalar``; the ones here also have ``config()`` so a
checkpoint records which loss it was trained with. Taught in ``notebooks/05_wgem.ipynb``.
"""
from __future__ import annotations

import torch

from retrieval_lib.layers.losses import (batch_hard_triplet_loss, contrastive_loss, smoothed_cross_entropy,
                                         triplet_loss)

__all__ = ["TupleLoss", "BatchHardLoss", "ClassificationLoss", "CombinedLoss"]


def _descriptors(outputs) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


class TupleLoss:
    """Contrastive or triplet loss of cirtorch tuples ``(q, p, n_1 .. n_k)``.

    * ``"contrastive"``: the pairs ``(q, p)`` (matching) and ``(q, n_i)`` (non-matching),
      :func:`~retrieval_lib.layers.losses.contrastive_loss`, mean over the ``T (1 + k)`` pairs
      (cirtorch sums them; the mean only rescales the learning rate).
    * ``"triplet"``: the triplets ``(q, p, n_i)``, :func:`~retrieval_lib.layers.losses.triplet_loss`,
      mean over the ``T k`` triplets.

    Every process of a distributed run holds the same number of tuples, so the mean of the
    per-process means is the mean over the whole batch.
    """

    def __init__(self, loss: str = "contrastive", margin: float = 0.7, squared: bool = False):
        if loss not in ("contrastive", "triplet"):
            raise ValueError(f"TupleLoss: loss must be 'contrastive' or 'triplet', got {loss!r}")
        self.loss, self.margin, self.squared = loss, float(margin), bool(squared)

    def __call__(self, outputs, batch) -> torch.Tensor:
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

    def config(self) -> dict:
        return {"objective": "tuple", "loss": self.loss, "margin": self.margin, "squared": self.squared}

    def __repr__(self) -> str:
        return f"TupleLoss({self.loss!r}, margin={self.margin})"


class BatchHardLoss:
    """Batch-hard triplet loss over a P x K batch (``batch["labels"]``), Hermans et al. 2017.

    The hardest pairs are looked for inside each process's share of the batch.
    """

    def __init__(self, margin: float = 0.1):
        self.margin = float(margin)

    def __call__(self, outputs, batch) -> torch.Tensor:
        D = _descriptors(outputs)  # (P K, D)
        return batch_hard_triplet_loss(D, batch["labels"].to(D.device), self.margin)

    def config(self) -> dict:
        return {"objective": "batch_hard", "margin": self.margin}

    def __repr__(self) -> str:
        return f"BatchHardLoss(margin={self.margin})"


class ClassificationLoss:
    """Smoothed, temperature-scaled cross-entropy of a classifier's logits (CGD's auxiliary loss).

    Needs a model with a classifier (outputs ``(descriptors, logits)``) and batches with
    ``"labels"`` in ``0 .. n_classes - 1``.
    """

    def __init__(self, smoothing: float = 0.1, temperature: float = 0.5):
        self.smoothing, self.temperature = float(smoothing), float(temperature)

    def __call__(self, outputs, batch) -> torch.Tensor:
        if not isinstance(outputs, (tuple, list)) or len(outputs) < 2:
            raise ValueError("ClassificationLoss needs logits: build the model with a classifier "
                             "(RetrievalNet(..., classifier=nn.Linear(D, n_classes)))")
        logits = outputs[1]
        return smoothed_cross_entropy(logits, batch["labels"].to(logits.device), self.smoothing,
                                      self.temperature)

    def config(self) -> dict:
        return {"objective": "classification", "smoothing": self.smoothing, "temperature": self.temperature}

    def __repr__(self) -> str:
        return f"ClassificationLoss(smoothing={self.smoothing}, temperature={self.temperature})"


class CombinedLoss:
    """A weighted sum of objectives, e.g. CGD's ranking + classification loss:
    ``CombinedLoss([(BatchHardLoss(0.1), 1.0), (ClassificationLoss(), 1.0)])``."""

    def __init__(self, terms):
        self.terms = [(obj, float(w)) for obj, w in terms]
        if not self.terms:
            raise ValueError("CombinedLoss: give at least one (objective, weight) pair")

    def __call__(self, outputs, batch) -> torch.Tensor:
        return sum(w * obj(outputs, batch) for obj, w in self.terms)

    def config(self) -> dict:
        return {"objective": "combined",
                "terms": [[getattr(obj, "config", lambda o=obj: repr(o))(), w] for obj, w in self.terms]}

    def __repr__(self) -> str:
        return "CombinedLoss(" + ", ".join(f"{w} * {obj!r}" for obj, w in self.terms) + ")"
