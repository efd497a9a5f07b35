"""The network of CGD (Jun et al., arXiv 1903.10663, 2019): a backbone and a CGD head.

The head is :class:`retrieval_lib.layers.cgd.CGD` (several global descriptors, each projected
and normalised, concatenated, plus an auxiliary classifier). :class:`CGDNet` is the
:class:`~retrieval_lib.models.retrieval_net.RetrievalNet` that carries it; :func:`build_head`
draws a head's initialisation from a seed. Taught in ``notebooks/07_cgd.ipynb``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from retrieval_lib.layers.cgd import CGD
from retrieval_lib.models.retrieval_net import RetrievalNet

__all__ = ["CGDNet", "build_head"]


class CGDNet(RetrievalNet):
    """``backbone.features`` (optional) -> :class:`~retrieval_lib.layers.cgd.CGD`.

    * ``backbone=None``: the inputs are feature maps ``(C, h, w)``; with
      ``pooled_inputs=True`` they are the branches' pooled vectors ``(n, C)``
      (``retrieval_lib.book.cgd.pool_branches``), and only :meth:`CGD.embed` runs.
    * ``freeze_backbone_bn`` (default): in train mode the backbone's BatchNorm layers stay in
      eval mode (their running statistics are used and never updated, as CGD trains); the
      head's own BatchNorm (in front of the auxiliary classifier) learns its statistics.
      Use it with ``Trainer(..., freeze_batchnorm=False)``, which would freeze the head's too.

    ``forward`` takes a batch tensor or a list of tensors of any sizes (equal sizes run
    together) and returns the head's output in the order given: the descriptors in eval
    mode, ``(descriptors, logits[, blocks])`` in train mode (see :class:`CGD`).
    """

    def __init__(self, head: CGD, backbone: Optional[nn.Module] = None, pooled_inputs: bool = False,
                 freeze_backbone_bn: bool = True):
        if not isinstance(head, CGD):
            raise TypeError(f"CGDNet: head must be a retrieval_lib.layers.cgd.CGD, got {type(head).__name__}")
        if pooled_inputs and backbone is not None:
            raise ValueError("CGDNet: pooled_inputs=True means the inputs are pooled vectors of a frozen "
                             "backbone; give no backbone then (or pooled_inputs=False to train through it)")
        super().__init__(head, backbone=backbone)
        self.pooled_inputs = bool(pooled_inputs)
        self.freeze_backbone_bn = bool(freeze_backbone_bn)

    @property
    def head(self) -> CGD:
        return self.pooling

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_backbone_bn and self.backbone is not None:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _run(self, x: torch.Tensor):
        if self.pooled_inputs:
            return self.pooling.embed(x)  # (b, n, C) -> head output
        return self.pooling(self.forward_features(x))


def build_head(config: str, in_channels: int, dim: int, n_classes: Optional[int] = None, seed: int = 0,
               **kwargs) -> CGD:
    """A :class:`CGD` whose random initialisation is fixed by ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CGD(config, in_channels=in_channels, dim=dim, n_classes=n_classes, **kwargs)
