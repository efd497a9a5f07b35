"""Fit pooling parameters (e.g. GeM's ``p``) on cached feature maps with a frozen backbone.

The backbone stays frozen: only the pooling layer learns, on feature maps computed once.
That is enough to watch GeM's exponent move away from its initial value on a laptop; the
papers fine-tune the whole network (Radenović et al. learn ``p`` jointly with ResNet-101
on SfM-120k, TPAMI 2018). The loss lives in :mod:`retrieval_lib.layers.losses`, the
pairs come from :mod:`retrieval_lib.engine.mining`. Taught in ``notebooks/03_gem.ipynb``.

* :func:`pool_fmaps_with_grad`, :func:`fit_pooling` -- pool maps of any sizes *with
  gradients*, and the optimisation loop. To pool maps without training (no gradients,
  every map) use :func:`retrieval_lib.engine.extract.pool_fmaps`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from retrieval_lib.layers.losses import contrastive_loss
from retrieval_lib.models.retrieval_net import RetrievalNet

__all__ = ["pool_fmaps_with_grad", "fit_pooling"]


def pool_fmaps_with_grad(fmaps: Sequence[torch.Tensor], pooling, indices) -> torch.Tensor:
    """L2-normalised descriptors ``(len(indices), D)`` of some maps, keeping gradients.

    The training variant of :func:`retrieval_lib.engine.extract.pool_fmaps` (which pools
    every map under ``torch.no_grad``): ``fmaps`` is a list of ``(C, h, w)`` maps of any
    sizes, of which the ``indices`` are pooled, in that order; maps of equal size are pooled
    in one batch (no Python loop over images), and gradients flow into ``pooling``'s
    parameters (e.g. GeM's ``p``). Maps move to the device of ``pooling``'s parameters.
    This is :class:`~retrieval_lib.models.retrieval_net.RetrievalNet` ``(pooling)`` on those maps.
    """
    idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    if not idx:
        raise ValueError("pool_fmaps_with_grad: no indices given")
    params = list(pooling.parameters()) if isinstance(pooling, nn.Module) else []
    device = params[0].device if params else fmaps[idx[0]].device
    return RetrievalNet(pooling)([fmaps[i].to(device) for i in idx])


def fit_pooling(fmaps: Sequence[torch.Tensor], pooling: nn.Module, i, j, y, steps: int = 20,
                lr: float = 0.1, margin: float = 0.7, progress: bool = True) -> dict:
    """Fit a pooling layer's parameters with Adam on the contrastive loss of given pairs.

    Every step pools the maps of all images in the pairs (:func:`pool_fmaps_with_grad`), computes
    :func:`contrastive_loss` (mean) of the pairs ``(i[n], j[n])`` with labels ``y[n]`` and
    takes one Adam step of size ``lr``. The backbone is not involved: ``fmaps`` are fixed.

    Returns ``{"loss": [...], "params": [...]}`` with ``steps + 1`` entries each: the loss and
    a copy of the parameters (a dict name -> tensor) before every step and after the last.
    Raises ``ValueError`` when the layer has no trainable parameter.
    """
    params = [q for q in pooling.parameters() if q.requires_grad]
    if not params:
        raise ValueError("fit_pooling: the pooling layer has no trainable parameter (e.g. build "
                         "GeM(learn_p=True))")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fit_pooling: steps must be an integer >= 0, got {steps!r}")
    i = torch.as_tensor(i).reshape(-1)
    j = torch.as_tensor(j).reshape(-1)
    y = torch.as_tensor(y).reshape(-1)
    if not (i.shape == j.shape == y.shape) or i.numel() == 0:
        raise ValueError("fit_pooling: i, j and y must be non-empty and of equal length (one per pair)")
    uniq, inv = torch.unique(torch.cat([i, j]), return_inverse=True)
    pi, pj = inv[: i.numel()], inv[i.numel():]
    opt = torch.optim.Adam(params, lr=lr)
    history = {"loss": [], "params": []}

    def snapshot():
        return {name: q.detach().clone() for name, q in pooling.named_parameters()}

    def loss_now():
        D = pool_fmaps_with_grad(fmaps, pooling, uniq)
        return contrastive_loss(D[pi.to(D.device)], D[pj.to(D.device)], y.to(D.device), margin)

    for _ in tqdm(range(steps), desc="fit pooling", unit="step", disable=not progress):
        opt.zero_grad()
        loss = loss_now()
        history["loss"].append(float(loss.detach()))
        history["params"].append(snapshot())
        loss.backward()
        opt.step()
    with torch.no_grad():
        history["loss"].append(float(loss_now()))
    history["params"].append(snapshot())
    return history
