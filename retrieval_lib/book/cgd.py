"""Plumbing of ``notebooks/07_cgd.ipynb``: CGD heads trained with the book's engine, and scored.

The head itself is :class:`retrieval_lib.layers.cgd.CGD` (Jun et al., arXiv 1903.10663, 2019).
This module puts it to work:

* :class:`CGDNet` -- a :class:`~retrieval_lib.engine.trainer.RetrievalNet` whose head is a
  CGD (which normalises its own output and gives the auxiliary logits), on images through a
  backbone whose BatchNorm statistics stay frozen in training, on feature maps, or on the
  pooled vectors of a frozen backbone (``pooled_inputs=True``);
* :func:`pool_branches` / :func:`take_branches` -- SPoC, MAC and GeM (p = 3) of cached
  feature maps, computed once: with a frozen backbone and fixed exponents the branches'
  pooled vectors never change, so the heads of every configuration train on them
  (the same numbers as training on the maps, at a fraction of the cost);
* :func:`cgd_objective`, :class:`BranchBatchHardLoss` (architecture A), :class:`StepSchedule`
  (the paper's learning rate x0.1 at epochs 12 and 16), :func:`build_head`, :func:`train_head`;
* :func:`heldout_scores` -- class-level Recall@K and mAP of held-out groups, per query too,
  for the paired bootstrap of :mod:`retrieval_lib.search.compare`;
* the full path: :data:`CGD_RECIPE`, :class:`CropSource` (252 px square -> random 224 crop +
  flip), :func:`describe_images` (224 px square) and :func:`cgd_trainer` (ResNet-50 without the
  stage-4 downsampling, fine-tuned end to end, e.g. on the first 100 classes of CUB-200-2011).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from retrieval_lib.engine.objectives import BatchHardLoss, ClassificationLoss, CombinedLoss
from retrieval_lib.engine.trainer import MapSource, RetrievalNet, Trainer
from retrieval_lib.layers.cgd import CGD, parse_config
from retrieval_lib.layers.losses import batch_hard_triplet_loss

__all__ = ["CGDNet", "pool_branches", "take_branches", "remap_labels", "build_head", "BranchBatchHardLoss",
           "cgd_objective", "StepSchedule", "train_head", "describe", "heldout_scores", "summarize",
           "train_and_score", "compare", "comparison_table", "CGD_RECIPE",
           "CropSource", "describe_images", "cgd_trainer"]

_ALL = "SMG"  # the order of the branches in the output of pool_branches


# --------------------------------------------------------------------------- the network
class CGDNet(RetrievalNet):
    """``backbone.features`` (optional) -> :class:`~retrieval_lib.layers.cgd.CGD`.

    * ``backbone=None``: the inputs are feature maps ``(C, h, w)``; with
      ``pooled_inputs=True`` they are the branches' pooled vectors ``(n, C)``
      (:func:`pool_branches`), and only :meth:`CGD.embed` runs.
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
        if self.backbone is not None:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.backbone.features(x)  # (b, 3, h, w) -> (b, C, h', w')
        return self.pooling(x)


# --------------------------------------------------------------------------- pooled vectors
def pool_branches(fmaps: Sequence[torch.Tensor], gem_p: float = 3.0, device=None) -> torch.Tensor:
    """SPoC, MAC and GeM (fixed ``gem_p``) of every map: ``N x (C, h, w) -> (N, 3, C)``, in that order.

    Not normalised; exactly what :meth:`CGD.pool` computes for configuration ``"SMG"``.
    """
    from retrieval_lib.engine.extract import pool_fmaps

    if len(fmaps) == 0:
        raise ValueError("pool_branches: no feature maps; pass the maps of at least one image")
    C = int(fmaps[0].shape[0])
    pools = CGD(_ALL, in_channels=C, dim=3, gem_p=gem_p).eval()
    flat = pool_fmaps(fmaps, lambda x: pools.pool(x).flatten(1), normalize=False, device=device)  # (N, 3 C)
    return flat.view(len(fmaps), 3, C).cpu()


def take_branches(pooled: torch.Tensor, config: str) -> torch.Tensor:
    """The branches of ``config`` from :func:`pool_branches`'s output: ``(N, 3, C) -> (N, n, C)``, in
    the configuration's order (``"GS"`` gives GeM then SPoC)."""
    c = parse_config(config)
    if pooled.dim() != 3 or pooled.shape[1] != 3:
        raise ValueError(f"take_branches: expected (N, 3, C) from pool_branches, got {tuple(pooled.shape)}")
    return pooled[:, [_ALL.index(b) for b in c]]


def remap_labels(labels) -> np.ndarray:
    """Group labels as ``0 .. K-1`` (the classifier's class indices), in order of first value."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise ValueError(f"remap_labels: labels must be a non-empty 1-D array, got shape {lab.shape}")
    return np.unique(lab, return_inverse=True)[1].astype(np.int64)


def build_head(config: str, in_channels: int, dim: int, n_classes: Optional[int] = None, seed: int = 0,
               **kwargs) -> CGD:
    """A :class:`CGD` whose random initialisation is fixed by ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CGD(config, in_channels=in_channels, dim=dim, n_classes=n_classes, **kwargs)


# --------------------------------------------------------------------------- objectives, schedule
class BranchBatchHardLoss:
    """Architecture A's ranking loss: a batch-hard triplet loss on every branch's block, summed.

    Needs a ``CGD(..., arch="A")`` head, whose training output ends with the blocks ``(B, n, k)``.
    """

    def __init__(self, margin: float = 0.1):
        self.margin = float(margin)

    def __call__(self, outputs, batch) -> torch.Tensor:
        blocks = outputs[-1] if isinstance(outputs, (tuple, list)) else None
        if blocks is None or blocks.dim() != 3:
            raise ValueError("BranchBatchHardLoss needs the per-branch blocks (B, n, k): use it with "
                             "CGD(..., arch='A') in train mode")
        labels = batch["labels"].to(blocks.device)
        return sum(batch_hard_triplet_loss(blocks[:, i], labels, self.margin) for i in range(blocks.shape[1]))

    def config(self) -> dict:
        return {"objective": "branch_batch_hard", "margin": self.margin}

    def __repr__(self) -> str:
        return f"BranchBatchHardLoss(margin={self.margin})"


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


class StepSchedule:
    """Learning-rate factor ``gamma ** (number of milestones <= epoch)`` (epochs counted from 0).

    ``StepSchedule((12, 16))``: x1 for epochs 0-11, x0.1 for 12-15, x0.01 from 16, the paper's
    schedule over 20 epochs. A :class:`~retrieval_lib.engine.trainer.Trainer` schedule.
    """

    def __init__(self, milestones: Sequence[int] = (12, 16), gamma: float = 0.1):
        self.milestones = tuple(sorted(int(m) for m in milestones))
        if any(m < 1 for m in self.milestones):
            raise ValueError(f"StepSchedule: milestones must be epochs >= 1, got {milestones!r}")
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"StepSchedule: gamma must be in (0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        self.__qualname__ = f"StepSchedule(milestones={self.milestones}, gamma={self.gamma})"

    def __call__(self, step: int, epoch: int, total: int) -> float:
        return self.gamma ** sum(epoch >= m for m in self.milestones)

    def __repr__(self) -> str:
        return self.__qualname__


def train_head(head: CGD, source: MapSource, objective, epochs: int, lr: float, P: int, K: int,
               milestones: Sequence[int] = (), gamma: float = 0.1, seed: int = 0, device=None,
               pooled_inputs: bool = True, progress: bool = False, threads: Optional[int] = 1):
    """Train a CGD head (backbone frozen) on ``source`` with P x K batches; returns ``(head, history)``.

    ``source``: a :class:`MapSource` of pooled vectors ``(n, C)`` (``pooled_inputs=True``, from
    :func:`take_branches`) or of feature maps (``pooled_inputs=False``), its ``labels`` the
    classes ``0 .. n_classes - 1``. Adam at ``lr``, ``epochs`` epochs of
    :class:`~retrieval_lib.engine.mining.PKMiner` batches (``P`` classes x ``K`` images, seeded by
    ``seed``), the rate x``gamma`` at each of ``milestones``. The head comes back on the CPU in
    eval mode; ``history`` is the trainer's (per-step loss and rate). ``threads``: torch's CPU
    threads while training (restored after; ``None`` leaves them): a head's matrices are small,
    so a team of threads costs more than it saves, and stalls when other jobs share the cores.
    """
    from retrieval_lib.engine.mining import PKMiner

    if source.labels is None:
        raise ValueError("train_head: the source needs labels (the classes of its images)")
    miner = PKMiner(source.labels, P=P, K=K)
    net = CGDNet(head, pooled_inputs=pooled_inputs)
    trainer = Trainer(net, objective, miner, source, optimizer="adam", lr=lr, epochs=epochs,
                      schedule=StepSchedule(milestones, gamma) if milestones else "constant", device=device,
                      seed=seed, freeze_batchnorm=False, progress=progress)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        history = trainer.fit(resume=False)
    finally:
        torch.set_num_threads(before)
    return head.to("cpu").eval(), history


def describe(head: CGD, inputs, pooled_inputs: bool = True, batch: int = 256) -> torch.Tensor:
    """Descriptors ``(N, dim)`` of pooled vectors ``(N, n, C)`` (or a list of maps with
    ``pooled_inputs=False``) by the head in eval mode, without gradient."""
    was = head.training
    head.eval()
    try:
        with torch.no_grad():
            if pooled_inputs:
                return torch.cat([head.embed(inputs[a:a + batch]) for a in range(0, len(inputs), batch)])
            net = CGDNet(head)
            return torch.cat([net(list(inputs[a:a + batch])) for a in range(0, len(inputs), batch)])
    finally:
        head.train(was)


# --------------------------------------------------------------------------- scores
def heldout_scores(X: torch.Tensor, labels, ks: Sequence[int] = (1, 2, 4, 8)) -> dict:
    """Class-level retrieval scores of descriptors ``X`` ``(N, D)`` whose rows are labelled ``labels``.

    Every image queries all the others (itself left out); only queries whose label has another
    image count (a single-image group is a distractor). Returns ``{"R@K": fraction}`` for every
    ``K`` in ``ks`` (at least one image of the query's label among its K nearest others: the
    CUB/Cars/SOP protocol), ``"mAP"``, and per counted query ``"hits"`` ``{K: (n,) 0/1 array}``,
    ``"aps"`` ``(n,)`` and ``"queries"`` (their indices), for
    :func:`~retrieval_lib.search.compare.paired_comparison`.
    """
    from retrieval_lib.search.evaluate import map_by_labels
    from retrieval_lib.search.nearest import rank_database

    lab = np.asarray(labels)
    n = len(lab)
    if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[0] != n:
        raise ValueError(f"heldout_scores: X must be (N, D) with one row per label ({n}), got "
                         f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
    counts = np.unique(lab, return_inverse=True, return_counts=True)
    has_pos = counts[2][counts[1]] > 1
    ks = sorted(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"heldout_scores: ks must be positive integers such as (1, 2, 4, 8), got {ks!r}")
    if not has_pos.any():
        raise ValueError("heldout_scores: no label has two images, so no query has a match")
    R = rank_database(X, X)  # (N, N) best first
    others = R[R != np.arange(n)[:, None]].reshape(n, n - 1)  # each row without the query itself
    q = np.flatnonzero(has_pos)
    hit_rank = np.argmax(lab[others[q]] == lab[q][:, None], axis=1)  # (n_q,) position of the first match
    hits = {k: (hit_rank < k).astype(np.float64) for k in ks}  # K >= N - 1: every counted query hits
    aps = map_by_labels(R, lab)["aps"][q]
    out = {f"R@{k}": float(hits[k].mean()) for k in ks}
    out.update({"mAP": float(np.mean(aps)), "aps": aps, "queries": q,
                "hits": hits})
    return out


def summarize(runs: Sequence[dict], ks: Sequence[int] = (1, 2, 4, 8)) -> dict:
    """Seeds of one setting, each :func:`heldout_scores` of the same queries, in one dict.

    ``"R@K"``, ``"mAP"``: means over the runs, with ``"R@K/min"``, ``"R@K/max"``, ``"mAP/min"``,
    ``"mAP/max"`` (the spread over seeds); ``"hits"`` ``{K: (n,)}`` and ``"aps"`` ``(n,)``: the
    per-query values averaged over the runs (what a paired bootstrap over queries resamples);
    ``"n_runs"``.
    """
    if not runs:
        raise ValueError("summarize: no runs")
    q = runs[0]["queries"]
    if any(not np.array_equal(r["queries"], q) for r in runs):
        raise ValueError("summarize: the runs were scored on different queries")
    out = {"n_runs": len(runs), "queries": q,
           "hits": {k: np.mean([r["hits"][k] for r in runs], axis=0) for k in ks},
           "aps": np.mean([r["aps"] for r in runs], axis=0)}
    for key in [f"R@{k}" for k in ks] + ["mAP"]:
        vals = [r[key] for r in runs]
        out[key], out[f"{key}/min"], out[f"{key}/max"] = float(np.mean(vals)), float(min(vals)), float(max(vals))
    return out


def train_and_score(config: str, train_pooled: torch.Tensor, labels, test_pooled: torch.Tensor, test_labels, *,
                    dim: int, epochs: int, lr: float, P: int, K: int, seeds: Sequence[int] = (0,),
                    milestones: Sequence[int] = (), arch: str = "cgd", combine: str = "concat", aux: bool = True,
                    margin: float = 0.1, smoothing: float = 0.1, temperature: float = 0.5,
                    channel_scale: bool = False, device=None) -> dict:
    """Train one CGD setting once per seed on pooled vectors and score it on held-out ones.

    ``train_pooled`` / ``test_pooled``: :func:`pool_branches` of the training and held-out maps;
    ``labels``: the training classes ``0 .. n_classes - 1`` (the classifier has one output per
    class); ``test_labels``: the held-out groups. Each seed draws the head's initialisation and
    the P x K batches; ``channel_scale``: see :class:`CGD`. Returns :func:`summarize` of the seeds
    plus ``"history"`` and ``"head"`` of the first seed, ``"seconds"`` (training time, all seeds) and
    ``"X"``, the first seed's held-out descriptors.
    """
    import time

    lab = np.asarray(labels)
    n_classes = int(lab.max()) + 1
    source = MapSource(list(take_branches(train_pooled, config)), lab)
    test = take_branches(test_pooled, config)
    objective = cgd_objective(arch, aux, margin, smoothing, temperature)
    runs, first, t0 = [], None, time.perf_counter()
    for s in seeds:
        head = build_head(config, int(train_pooled.shape[-1]), dim, n_classes if aux else None, seed=s,
                          arch=arch, combine=combine, channel_scale=channel_scale)
        head, history = train_head(head, source, objective, epochs, lr, P, K, milestones, seed=s, device=device)
        X = describe(head, test)
        runs.append(heldout_scores(X, test_labels))
        first = first or (history, head, X)
    out = summarize(runs)
    out.update(history=first[0], head=first[1], X=first[2], seconds=time.perf_counter() - t0)
    return out


def compare(results: dict, a: str, b: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired bootstraps over the held-out queries of setting ``a`` minus setting ``b``
    (:func:`summarize` dicts in ``results``): ``{"R@1": ..., "mAP": ...}``, each a
    :func:`~retrieval_lib.search.compare.paired_comparison` of the per-query R@1 hits and APs."""
    from retrieval_lib.search.compare import paired_comparison

    ra, rb = results[a], results[b]
    return {"R@1": paired_comparison(ra["hits"][1], rb["hits"][1], n_boot=n_boot, seed=seed),
            "mAP": paired_comparison(ra["aps"], rb["aps"], n_boot=n_boot, seed=seed)}


def comparison_table(results: dict, pairs: Sequence[tuple], names: Optional[dict] = None, n_boot: int = 2000,
                     seed: int = 0) -> tuple:
    """Markdown table of :func:`compare` for every ``(a, b)`` in ``pairs``; returns ``(markdown, cmps)``
    with ``cmps[(a, b)]`` the comparisons. ``names`` maps setting keys to what the table shows."""
    from retrieval_lib.book.report import markdown_table
    from retrieval_lib.book.verdict import signed

    names = names or {}
    rows, cmps = [], {}
    for a, b in pairs:
        c = cmps[(a, b)] = compare(results, a, b, n_boot, seed)
        row = [f"{names.get(a, a)} − {names.get(b, b)}"]
        for key in ("R@1", "mAP"):
            lo, hi = c[key]["ci"]
            row += [signed(c[key]["delta"]), f"{signed(lo)} … {signed(hi)}",
                    "yes" if c[key]["significant"] else "no"]
        rows.append(row)
    header = ["difference", "Δ R@1", "95 % interval", "beyond noise?", "Δ mAP", "95 % interval", "beyond noise?"]
    return markdown_table(header, rows, fmt=str), cmps


# --------------------------------------------------------------------------- the full path
#: The paper's training setting (as the project's issue 10 records it): ResNet-50 without the
#: stage-4 downsampling, 1536-D, P x K = 32 x 4 = 128 images per batch, Adam 1e-4, 20 epochs,
#: the rate x0.1 at epochs 12 and 16, batch-hard triplet (margin 0.1) + smoothed cross-entropy
#: (smoothing 0.1, temperature 0.5), BatchNorm statistics frozen, training images 252 x 252 ->
#: random 224 crop + flip, test images 224 x 224.
CGD_RECIPE = dict(config="SG", dim=1536, P=32, K=4, lr=1e-4, epochs=20, milestones=(12, 16), gamma=0.1,
                  margin=0.1, smoothing=0.1, temperature=0.5, train_size=252, crop=224, test_size=224)


def _to_tensor(img, size: int, mean, std) -> torch.Tensor:
    from PIL import Image

    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class CropSource:
    """Full-path training inputs: each image resized to ``train_size`` x ``train_size``, then a random
    ``crop`` x ``crop`` window, flipped left-right half of the time, normalised with ``mean``/``std``.

    The crops come from a generator seeded with ``seed``; a resumed run draws new ones.
    ``load(indices)`` returns ``(3, crop, crop)`` tensors. ``labels``: the classes.
    """

    kind = "crops"

    def __init__(self, images, labels, mean, std, train_size: int = 252, crop: int = 224, seed: int = 0):
        if crop > train_size:
            raise ValueError(f"CropSource: crop={crop} is larger than train_size={train_size}")
        self.images, self.labels = images, np.asarray(labels)
        if len(self.labels) != len(images):
            raise ValueError(f"CropSource: {len(self.labels)} labels for {len(images)} images")
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_size, self.crop = int(train_size), int(crop)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, indices) -> list:
        out = []
        for i in torch.as_tensor(indices).tolist():
            img = self.images[i]
            if img is None:
                raise ValueError(f"CropSource: image {i} could not be read; drop it from the training set")
            x = _to_tensor(img, self.train_size, self.mean, self.std)
            top, left = (int(v) for v in self.rng.integers(0, self.train_size - self.crop + 1, size=2))
            x = x[:, top:top + self.crop, left:left + self.crop]
            out.append(x.flip(-1) if self.rng.random() < 0.5 else x)
        return out

    def config(self) -> dict:
        return {"kind": self.kind, "n": len(self), "train_size": self.train_size, "crop": self.crop}


def describe_images(net: CGDNet, images, size: int = 224, batch: int = 32, device=None) -> torch.Tensor:
    """Descriptors ``(N, dim)`` of ``images`` resized to ``size`` x ``size`` (the paper's test input)."""
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net.eval()
    bb = net.backbone
    out = []
    with torch.no_grad():
        for a in range(0, len(images), batch):
            x = torch.stack([_to_tensor(images[i], size, bb.mean, bb.std) for i in range(a, min(a + batch, len(images)))])
            out.append(net(x.to(dev)).cpu())
    return torch.cat(out)


def cgd_trainer(data, backbone=None, checkpoint_dir=None, **overrides) -> Trainer:
    """The paper's end-to-end training (:data:`CGD_RECIPE`; keywords override any of it or pass
    :class:`Trainer` arguments such as ``device=``): ``data`` is a labelled image set (e.g.
    :class:`~retrieval_lib.data.datasets.CUB200` with ``split="train"``, the first 100 classes),
    ``backbone`` defaults to :func:`~retrieval_lib.models.backbones.resnet50_cgd` (ImageNet
    weights, downloaded once). Call ``.fit()``; then :func:`describe_images` on the test split.
    """
    from retrieval_lib.engine.mining import PKMiner
    from retrieval_lib.models.backbones import resnet50_cgd

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
