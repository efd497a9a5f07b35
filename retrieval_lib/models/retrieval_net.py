"""The retrieval network every trained or loaded model of the library is: backbone -> pooling -> L2 -> whitening.

:class:`RetrievalNet` is what :class:`~retrieval_lib.engine.trainer.Trainer` trains (reduced mode on
cached feature maps, or end to end), what 07's CGD model extends, and what
:func:`~retrieval_lib.models.released.load_network` returns for the papers' released networks.
Taught in ``notebooks/05_wgem.ipynb`` and ``notebooks/08_whitening.ipynb``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from retrieval_lib.layers.functional import l2n

__all__ = ["RetrievalNet"]


class RetrievalNet(nn.Module):
    """``backbone.features`` -> ``pooling`` -> L2 -> ``whiten`` -> L2 (-> ``classifier``).

    * ``backbone=None`` (reduced mode): the inputs are feature maps ``(B, C, H, W)``.
    * ``whiten``: a module ``(B, D) -> (B, D')``, e.g. ``nn.Linear(D, D)`` (cirtorch's
      whitening as an FC layer, learned end to end); ``None`` skips it.
    * ``classifier``: a module on the final descriptor, e.g. ``nn.Linear(D, n_classes)``;
      with it the model returns ``(descriptors, logits)``.

    ``forward`` takes a batch tensor or a list of ``(C, h, w)`` tensors of any sizes (images
    of equal size run together, so there is no padding); descriptors ``(B, D')`` come back
    L2-normalised, in the order given. ``channels_last=True`` runs the backbone in that
    memory format (set by :class:`Trainer` on CUDA).
    """

    def __init__(self, pooling: nn.Module, backbone: Optional[nn.Module] = None,
                 whiten: Optional[nn.Module] = None, classifier: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(pooling, nn.Module):
            raise TypeError("RetrievalNet: pooling must be an nn.Module (e.g. GeM() or WGeM(in_channels))")
        if backbone is not None and not hasattr(backbone, "features"):
            raise TypeError("RetrievalNet: backbone must have a .features(x) method (see "
                            "retrieval_lib.models.backbones), or be None for feature-map inputs")
        self.backbone = backbone
        self.pooling = pooling
        self.whiten = whiten
        self.classifier = classifier
        self.channels_last = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature maps ``(b, C, h', w')`` of images ``(b, 3, h, w)``; the inputs
        themselves when there is no backbone (reduced mode: they are feature maps)."""
        if self.backbone is None:
            return x
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.features(x)

    def _run(self, x: torch.Tensor):
        d = l2n(self.pooling(self.forward_features(x)))  # (b, C, h, w) -> (b, D)
        if self.whiten is not None:
            d = l2n(self.whiten(d))
        if self.classifier is not None:
            return d, self.classifier(d)
        return d

    def forward(self, inputs):
        if isinstance(inputs, torch.Tensor):
            return self._run(inputs)
        if len(inputs) == 0:
            raise ValueError(f"{type(self).__name__}: no inputs")
        groups: dict = {}
        for pos, x in enumerate(inputs):
            groups.setdefault(tuple(x.shape), []).append(pos)
        parts, order = [], []
        for positions in groups.values():
            parts.append(self._run(torch.stack([inputs[q] for q in positions])))
            order += positions
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        if isinstance(parts[0], tuple):
            return tuple(torch.cat([p[k] for p in parts])[inverse.to(parts[0][k].device)]
                         for k in range(len(parts[0])))
        out = torch.cat(parts)
        return out[inverse.to(out.device)]
