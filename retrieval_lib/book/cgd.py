"""Plumbing of ``notebooks/07_cgd.ipynb``: CGD heads on frozen pooled branches, trained and scored.

The head is :class:`retrieval_lib.layers.cgd.CGD` (Jun et al., arXiv 1903.10663, 2019), its
network :class:`~retrieval_lib.models.cgd_net.CGDNet`, its losses in
:mod:`retrieval_lib.engine.objectives` (:func:`~retrieval_lib.engine.objectives.cgd_objective`)
and the paper's end-to-end recipe in :mod:`retrieval_lib.engine.recipes` (``RECIPES["cgd"]``,
``cgd_trainer``, ``describe_images``). This module runs the notebook's CPU experiments:

* :func:`pool_branches` / :func:`take_branches` -- SPoC, MAC and GeM (p = 3) of cached
  feature maps, computed once: with a frozen backbone and fixed exponents the branches'
  pooled vectors never change, so the heads of every configuration train on them
  (the same numbers as training on the maps, at a fraction of the cost);
* :func:`train_head`, :func:`describe`, :func:`train_and_score` -- one head per seed;
  :func:`loss_change` -- whether its loss still fell at the end;
* :func:`heldout_scores` -- class-level Recall@K and mAP of held-out groups, per query too,
  for the paired bootstrap of :mod:`retrieval_lib.search.compare`; :func:`summarize`,
  :func:`compare`, :func:`comparison_table`.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from retrieval_lib.book.report import markdown_table
from retrieval_lib.engine.extract import pool_fmaps
from retrieval_lib.engine.mining import PKMiner
from retrieval_lib.engine.objectives import cgd_objective
from retrieval_lib.engine.optim import StepSchedule
from retrieval_lib.engine.sources import MapSource
from retrieval_lib.engine.trainer import Trainer
from retrieval_lib.layers.cgd import CGD, parse_config
from retrieval_lib.models.cgd_net import CGDNet, build_head
from retrieval_lib.search.compare import paired_comparison
from retrieval_lib.search.evaluate import map_by_labels
from retrieval_lib.search.nearest import rank_database
from retrieval_lib.search.verdict import signed

__all__ = ["pool_branches", "take_branches", "train_head", "describe", "heldout_scores", "summarize",
           "train_and_score", "loss_change", "compare", "comparison_table"]

_ALL = "SMG"  # the order of the branches in the output of pool_branches


# --------------------------------------------------------------------------- pooled vectors
def pool_branches(fmaps: Sequence[torch.Tensor], gem_p: float = 3.0, device=None) -> torch.Tensor:
    """SPoC, MAC and GeM (fixed ``gem_p``) of every map: ``N x (C, h, w) -> (N, 3, C)``, in that order.

    Not normalised; exactly what :meth:`CGD.pool` computes for configuration ``"SMG"``.
    """
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
    ``"aps"`` ``(n,)``, ``"queries"`` (their indices) and ``"groups"`` (their labels: queries of
    one label are not independent, so :func:`compare` resamples labels), for
    :func:`~retrieval_lib.search.compare.paired_comparison`.
    """
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
    out.update({"mAP": float(np.mean(aps)), "aps": aps, "queries": q, "groups": lab[q],
                "hits": hits})
    return out


def summarize(runs: Sequence[dict], ks: Sequence[int] = (1, 2, 4, 8)) -> dict:
    """Seeds of one setting, each :func:`heldout_scores` of the same queries, in one dict.

    ``"R@K"``, ``"mAP"``: means over the runs, with ``"R@K/min"``, ``"R@K/max"``, ``"mAP/min"``,
    ``"mAP/max"`` (the spread over seeds); ``"hits"`` ``{K: (n,)}`` and ``"aps"`` ``(n,)``: the
    per-query values averaged over the runs (what a paired bootstrap resamples, by ``"groups"``,
    the queries' labels); ``"n_runs"``.
    """
    if not runs:
        raise ValueError("summarize: no runs")
    q = runs[0]["queries"]
    if any(not np.array_equal(r["queries"], q) for r in runs):
        raise ValueError("summarize: the runs were scored on different queries")
    out = {"n_runs": len(runs), "queries": q, "groups": runs[0].get("groups"),
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
    plus ``"history"`` and ``"head"`` of the first seed, ``"steps"`` (its optimiser steps),
    ``"seconds"`` (training time, all seeds), ``"X"``, the first seed's held-out descriptors, and
    ``"runs"``, the :func:`heldout_scores` of each seed in ``seeds``' order (``summarize(runs[:1])``
    is the first seed alone, to pair with a setting trained on fewer seeds).
    """
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
    out.update(history=first[0], head=first[1], X=first[2], runs=runs, steps=len(first[0]["loss"]),
               seconds=time.perf_counter() - t0)
    return out


def loss_change(history: dict, share: float = 0.2) -> float:
    """How much the training loss still moved at the end: the mean loss of the last ``share`` of the
    steps relative to the mean of the ``share`` before it, ``(last - before) / before`` (negative: it
    still fell). ``history``: a :class:`~retrieval_lib.engine.trainer.Trainer` history (``"loss"``
    per step), e.g. :func:`train_and_score`'s ``"history"``."""
    loss = np.asarray(history["loss"], dtype=np.float64)
    n = int(round(share * len(loss)))
    if not 0 < share <= 0.5 or n < 1:
        raise ValueError(f"loss_change: need 0 < share <= 0.5 and at least 2 / share steps, got share={share!r} "
                         f"and {len(loss)} steps")
    before, last = loss[-2 * n:-n].mean(), loss[-n:].mean()
    return float((last - before) / before)


def compare(results: dict, a: str, b: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired bootstraps over the held-out queries of setting ``a`` minus setting ``b``
    (:func:`summarize` dicts in ``results``): ``{"R@1": ..., "mAP": ...}``, each a
    :func:`~retrieval_lib.search.compare.paired_comparison` of the per-query R@1 hits and APs.
    The queries' labels (``"groups"``, when the results carry them) are what is resampled: the
    queries of one class share their matches, so they are not independent draws."""
    ra, rb = results[a], results[b]
    groups = ra.get("groups")
    if groups is not None and (rb.get("groups") is None or not np.array_equal(groups, rb["groups"])):
        raise ValueError(f"compare: {a!r} and {b!r} were scored on different queries; score both on the same test set")
    return {"R@1": paired_comparison(ra["hits"][1], rb["hits"][1], n_boot=n_boot, seed=seed, groups=groups),
            "mAP": paired_comparison(ra["aps"], rb["aps"], n_boot=n_boot, seed=seed, groups=groups)}


def comparison_table(results: dict, pairs: Sequence[tuple], names: Optional[dict] = None, n_boot: int = 2000,
                     seed: int = 0) -> tuple:
    """Markdown table of :func:`compare` for every ``(a, b)`` in ``pairs``; returns ``(markdown, cmps)``
    with ``cmps[(a, b)]`` the comparisons. ``names`` maps setting keys to what the table shows."""
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
