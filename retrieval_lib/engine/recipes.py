"""Ready-made training setups: the reduced (CPU) inputs and the papers' recipes, in one registry.

* :func:`reduced_source` -- reduced mode: augmented views and composites of the training
  images (:func:`retrieval_lib.data.views.make_views`), their feature maps extracted once by
  the frozen backbone through the extraction cache, as a
  :class:`~retrieval_lib.engine.sources.MapSource`;
* :data:`RECIPES` -- the papers' fine-tuning settings by name: ``"gem"`` and ``"wgem"``
  (cirtorch's, for :func:`paper_trainer` on rSfM-120k) and ``"cgd"`` (CGD's, for
  :func:`cgd_trainer` on a labelled image set such as CUB-200-2011);
* :func:`describe_images` -- CGD's test-time descriptors (square 224 px inputs).

Taught in ``notebooks/05_wgem.ipynb`` (GeM/wGeM) and ``notebooks/07_cgd.ipynb`` (CGD).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from retrieval_lib.data.datasets import cache_root
from retrieval_lib.data.views import make_views
from retrieval_lib.engine.extract import extract_fmaps
from retrieval_lib.engine.mining import PKMiner, TupleMiner
from retrieval_lib.engine.objectives import TupleLoss, cgd_objective
from retrieval_lib.engine.optim import StepSchedule
from retrieval_lib.engine.sources import CropSource, ImageSource, MapSource, square_tensor
from retrieval_lib.engine.trainer import Trainer
from retrieval_lib.models.backbones import resnet50_cgd
from retrieval_lib.models.cgd_net import CGDNet, build_head
from retrieval_lib.models.retrieval_net import RetrievalNet

__all__ = ["reduced_source", "RECIPES", "CGD_RECIPE", "paper_trainer", "cgd_trainer", "describe_images",
           "remap_labels"]


def reduced_source(backbone, dataset, n_views: int = 4, n_composites: int = 1, image_size: int = 512,
                   seed: int = 0, cache_dir=None, device=None, batch_size: int = 8, progress: bool = True):
    """Reduced-mode inputs: the feature maps of ``dataset``'s images, their augmented views
    and composites (:func:`~retrieval_lib.data.views.make_views`), extracted once with the
    frozen ``backbone`` through the extraction cache (``<cache_dir>/features``;
    ``cache_dir`` defaults to :func:`~retrieval_lib.data.datasets.cache_root`).

    Returns ``(source, views)``: a :class:`MapSource` whose ``labels`` are the groups, and
    the :class:`~retrieval_lib.data.views.ViewSet`. Pass training images only
    (``honest_split(...).train``).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    views = make_views(dataset, n_views=n_views, n_composites=n_composites, seed=seed,
                       max_side=max(64, image_size), cache_dir=root, progress=progress)
    fmaps = extract_fmaps(backbone, views.images(), image_size=image_size, device=device,
                          batch_size=batch_size, cache_dir=root / "features", progress=progress)
    return MapSource(fmaps, labels=views.labels), views


# The papers' fine-tuning settings.
# GeM: cirtorch's README command for ResNet-101 GeM (Radenović et al., TPAMI 2018):
# contrastive loss, margin 0.85, Adam at 5e-7, 5 negatives, 2000 queries and a pool of 22000
# per epoch, batches of 5 tuples, 362 px images, the learning rate times exp(-0.01) per epoch;
# weight decay 1e-6 and 100 epochs are cirtorch's train.py defaults. wGeM: the same recipe
# (our choice; the wGeM paper's optimiser settings are not restated here).
# CGD (as the project's issue 10 records it): ResNet-50 without the stage-4 downsampling,
# 1536-D, P x K = 32 x 4 = 128 images per batch, Adam 1e-4, 20 epochs, the rate x0.1 at
# epochs 12 and 16, batch-hard triplet (margin 0.1) + smoothed cross-entropy (smoothing 0.1,
# temperature 0.5), BatchNorm statistics frozen, training images 252 x 252 -> random 224
# crop + flip, test images 224 x 224.
RECIPES = {
    "gem": dict(loss="contrastive", margin=0.85, optimizer="adam", lr=5e-7, weight_decay=1e-6, p_lr_mult=10.0,
                n_neg=5, n_queries=2000, pool_size=22000, batch_size=5, image_size=362,
                schedule="exponential", epochs=100),
    "cgd": dict(config="SG", dim=1536, P=32, K=4, lr=1e-4, epochs=20, milestones=(12, 16), gamma=0.1,
                margin=0.1, smoothing=0.1, temperature=0.5, train_size=252, crop=224, test_size=224),
}
RECIPES["wgem"] = dict(RECIPES["gem"])
#: CGD's entry of :data:`RECIPES` (for :func:`cgd_trainer`)
CGD_RECIPE = RECIPES["cgd"]
_TUPLE_RECIPES = ("gem", "wgem")


def paper_trainer(recipe: str, backbone, pooling: nn.Module, data, whiten: Optional[nn.Module] = None,
                  checkpoint_dir=None, workers: int = 4, **overrides) -> Trainer:
    """Full-mode training as in the papers: ``backbone`` + ``pooling`` fine-tuned end to end
    on ``data`` (an :class:`~retrieval_lib.data.sfm120k.SfM120k`: rSfM-120k's query/positive
    pairs and clusters) with cirtorch's mining and the settings of :data:`RECIPES[recipe]`
    (``"gem"`` or ``"wgem"``); keyword arguments override any of them (``epochs=2``,
    ``image_size=128``, ``device=...``, or any :class:`~retrieval_lib.engine.trainer.TrainerConfig`
    field; ``config={...}``: your own settings, recorded in the checkpoints). Call ``.fit()``.
    """
    if recipe not in _TUPLE_RECIPES:
        hint = "; CGD's recipe trains with cgd_trainer" if recipe == "cgd" else ""
        raise ValueError(f"paper_trainer: unknown recipe {recipe!r}; choose one of {list(_TUPLE_RECIPES)}{hint}")
    s = {**RECIPES[recipe], **overrides}
    miner = TupleMiner(data.labels, n_neg=s.pop("n_neg"), n_queries=s.pop("n_queries"),
                       pool_size=s.pop("pool_size"), batch_size=s.pop("batch_size"),
                       queries=data.queries, positives=data.positives)
    objective = TupleLoss(s.pop("loss"), margin=s.pop("margin"))
    source = ImageSource(data.images, s.pop("image_size"), backbone.mean, backbone.std, labels=data.labels,
                         workers=workers)
    model = RetrievalNet(pooling, backbone=backbone, whiten=whiten)
    config = {"recipe": recipe, "data": getattr(data, "name", type(data).__name__)}
    return Trainer(model, objective, miner, source, checkpoint_dir=checkpoint_dir,
                   user_config={**config, **s.pop("config", {})}, **s)


def remap_labels(labels) -> np.ndarray:
    """Group labels as ``0 .. K-1`` (the classifier's class indices), in order of first value."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise ValueError(f"remap_labels: labels must be a non-empty 1-D array, got shape {lab.shape}")
    return np.unique(lab, return_inverse=True)[1].astype(np.int64)


def cgd_trainer(data, backbone=None, checkpoint_dir=None, **overrides) -> Trainer:
    """CGD's end-to-end training (:data:`RECIPES["cgd"]`; keywords override any of it or pass
    :class:`~retrieval_lib.engine.trainer.TrainerConfig` fields such as ``device=``): ``data`` is a
    labelled image set (e.g. :class:`~retrieval_lib.data.datasets.CUB200` with ``split="train"``, the
    first 100 classes), ``backbone`` defaults to :func:`~retrieval_lib.models.backbones.resnet50_cgd`
    (ImageNet weights, downloaded once). Call ``.fit()``; then :func:`describe_images` on the test split.
    """
    s = {**CGD_RECIPE, **overrides}
    bb = resnet50_cgd() if backbone is None else backbone
    labels = remap_labels(data.labels)
    n_classes = int(labels.max()) + 1
    head = build_head(s.pop("config"), bb.out_channels, s.pop("dim"), n_classes, seed=s.get("seed", 0))
    net = CGDNet(head, backbone=bb)
    source = CropSource(data.database if hasattr(data, "database") else data.images, labels, bb.mean, bb.std,
                        train_size=s.pop("train_size"), crop=s.pop("crop"), seed=s.get("seed", 0))
    s.pop("test_size")
    miner = PKMiner(labels, P=s.pop("P"), K=s.pop("K"))
    objective = cgd_objective(margin=s.pop("margin"), smoothing=s.pop("smoothing"),
                              temperature=s.pop("temperature"))
    schedule = StepSchedule(s.pop("milestones"), s.pop("gamma"))
    return Trainer(net, objective, miner, source, optimizer="adam", schedule=schedule, freeze_batchnorm=False,
                   checkpoint_dir=checkpoint_dir, **s)


def describe_images(net: CGDNet, images, size: int = 224, batch: int = 32, device=None) -> torch.Tensor:
    """Descriptors ``(N, dim)`` of ``images`` resized to ``size`` x ``size`` (CGD's test input)."""
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net.eval()
    bb = net.backbone
    out = []
    with torch.no_grad():
        for a in range(0, len(images), batch):
            x = torch.stack([square_tensor(images[i], size, bb.mean, bb.std)
                             for i in range(a, min(a + batch, len(images)))])
            out.append(net(x.to(dev)).cpu())
    return torch.cat(out)
