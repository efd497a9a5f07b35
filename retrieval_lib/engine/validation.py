"""Early stopping on a validation mAP: train a head, measure it after every epoch, keep the best.

:func:`train_with_validation` runs the :class:`~retrieval_lib.engine.trainer.Trainer` on a head
over frozen feature maps and, through the trainer's ``on_step`` hook, measures the mAP of
held-out *training-side* groups before training and after every epoch (every image queries
the others), recording the head's state each time and keeping the best epoch's. A tie between
a trained epoch and the best so far goes to the trained (later) head: a tie means training did
not hurt on validation, and keeping epoch 0 on ties would throw every trained head away by
construction whenever validation cannot tell heads apart. The record says which epoch was kept
and why, and whether validation was saturated at epoch 0 (then it warns: nothing to select on).
The decision never looks at the evaluation set. Taught in ``notebooks/05_wgem.ipynb`` and used
by ``06_darac``.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import torch

from retrieval_lib.engine.extract import pool_fmaps
from retrieval_lib.engine.trainer import Trainer
from retrieval_lib.models.retrieval_net import RetrievalNet
from retrieval_lib.search.evaluate import map_by_labels
from retrieval_lib.search.nearest import rank_database

__all__ = ["train_with_validation", "SaturatedValidationWarning", "SATURATED_MAP"]

SATURATED_MAP = 1.0 - 1e-9  # a validation mAP at or above this before training leaves nothing to select on


class SaturatedValidationWarning(UserWarning):
    """The validation set is solved before training (mAP 1 at epoch 0), so it cannot choose an epoch."""


def _kept_why(val_maps: list, kept: int, keep: str) -> str:
    """One sentence saying why epoch ``kept`` was kept, from the validation mAP of every epoch."""
    v = val_maps[kept]
    if keep == "last":
        return f"keep='last': the last epoch ({kept}) is kept whatever its validation mAP ({v:.4f})"
    if kept == 0:
        return f"best validation mAP {v:.4f} at epoch 0 (the untrained head): no trained epoch reached it"
    tied = [j for j in range(kept) if val_maps[j] == v]
    if tied:
        return (f"tie with epoch{'s' if len(tied) > 1 else ''} {', '.join(map(str, tied))} at validation mAP "
                f"{v:.4f} resolved towards the trained head (epoch {kept})")
    return f"best validation mAP {v:.4f} at epoch {kept}"


def _p_value(pooling) -> float:
    """The exponent the layer pools with (``max(p, p_min)``), NaN for a layer without one."""
    p = getattr(pooling, "multiscale_p", None)
    return float("nan") if p is None else float(p.reshape(-1)[0]) if isinstance(p, torch.Tensor) else float(p)


def train_with_validation(pooling, source, miner, objective, val_fmaps, val_labels, epochs: int,
                          lr: float, p_lr_mult: float = 10.0, weight_decay: float = 0.0,
                          optimizer: str = "adam", seed: int = 0, device=None, keep: str = "best",
                          measure=None, progress: bool = False):
    """Train ``pooling`` (a head on frozen feature maps) and keep the epoch that validates best.

    The engine's :class:`~retrieval_lib.engine.trainer.Trainer` trains
    ``RetrievalNet(pooling)`` on ``source`` (a :class:`~retrieval_lib.engine.sources.MapSource`)
    with ``miner``'s batches and ``objective``. Before training and after every epoch the
    mAP of ``val_fmaps`` (maps of training-side groups left out of ``source``, ``val_labels``
    their groups; every image queries the others) is measured with the current head. With
    ``keep="best"`` the head of the best epoch is loaded back into ``pooling``; a trained
    epoch that *ties* the best so far replaces it (``>=``), so the untrained head, epoch 0,
    is kept only when every trained epoch validates strictly worse. (A tie means training
    did not hurt on validation; keeping the earlier head would discard the training by
    construction whenever validation cannot tell the heads apart, e.g. when it is saturated.)
    With ``keep="last"`` the head of the last epoch stays (a fixed number of epochs; the
    validation mAP is then only recorded). ``measure(pooling) -> {name: float}``, when given,
    is recorded at the same moments (e.g. where a mask looks).

    When the validation mAP before training is already ``>= 1 - 1e-9`` the validation set
    is *saturated*: nothing can beat the untrained head, so the choice says nothing. A
    :class:`SaturatedValidationWarning` then asks for more or harder validation groups.

    Returns ``(pooling, record)``: ``record`` holds per epoch (0 = before training)
    ``"epoch"``, ``"val_mAP"``, ``"p"`` (the exponent in use, ``max(p, p_min)``), ``"loss"``
    (mean training loss of the epoch; NaN at 0), ``"states"`` (the head's state dict on the CPU,
    so a figure can show the head of any epoch) and each name of ``measure``, plus
    ``"kept_epoch"``, ``"kept_why"`` (one sentence: why that epoch), ``"saturated"`` (bool),
    ``"steps_per_epoch"`` and ``"history"`` (the trainer's per-step loss and rate).
    """
    if keep not in ("best", "last"):
        raise ValueError(f"train_with_validation: keep must be 'best' or 'last', got {keep!r}")
    lab = np.asarray(val_labels)
    if len(val_fmaps) != len(lab) or len(lab) == 0:
        raise ValueError(f"train_with_validation: {len(val_fmaps)} validation maps for {len(lab)} labels; "
                         "give one group label per map (and at least one map)")
    if np.bincount(lab).max() < 2:
        raise ValueError("train_with_validation: no validation group has two images, so no validation query "
                         "has a match; hold out whole groups of at least two images")
    net = RetrievalNet(pooling)

    def validate() -> float:
        was = pooling.training
        pooling.eval()
        X = pool_fmaps(val_fmaps, pooling, device=next(pooling.parameters()).device)
        pooling.train(was)
        X = X.cpu()
        return float(map_by_labels(rank_database(X, X), lab, kappas=(1,))["mAP"])

    def note(epoch: int, loss: float) -> float:
        v = validate()
        record["epoch"].append(epoch)
        record["val_mAP"].append(v)
        record["p"].append(_p_value(pooling))
        record["loss"].append(loss)
        if measure is not None:
            with torch.no_grad():
                for name, value in measure(pooling).items():
                    record.setdefault(name, []).append(float(value))
        record["states"].append({k: t.detach().cpu().clone() for k, t in pooling.state_dict().items()})
        return v

    per_epoch = miner.batches_per_epoch()
    record = {"epoch": [], "val_mAP": [], "p": [], "loss": [], "states": [], "steps_per_epoch": per_epoch}
    best = {"mAP": note(0, float("nan")), "epoch": 0, "state": copy.deepcopy(pooling.state_dict())}
    record["saturated"] = bool(best["mAP"] >= SATURATED_MAP)
    if record["saturated"]:
        warnings.warn(f"train_with_validation: the validation mAP is {best['mAP']:.4f} before training, so the "
                      f"validation set ({len(lab)} images, {len(np.unique(lab))} groups) is saturated and cannot "
                      "choose an epoch; hold out more or harder groups for validation (never UKBench alone)",
                      SaturatedValidationWarning, stacklevel=2)

    def on_step(trainer, step, loss):
        if step % per_epoch:
            return
        epoch = step // per_epoch
        v = note(epoch, float(np.mean(trainer.history["loss"][-per_epoch:])))
        if v >= best["mAP"] or keep == "last":  # a tie goes to the trained (later) head
            best.update(mAP=v, epoch=epoch, state=copy.deepcopy(pooling.state_dict()))

    trainer = Trainer(net, objective, miner, source, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                      p_lr_mult=p_lr_mult, epochs=epochs, device=device, seed=seed, on_step=on_step,
                      progress=progress)
    record["history"] = trainer.fit(resume=False)
    pooling.load_state_dict(best["state"])
    pooling.to("cpu")
    record["kept_epoch"] = best["epoch"]
    record["kept_why"] = _kept_why(record["val_mAP"], best["epoch"], keep) + (
        "; validation was saturated before training, so this choice says nothing" if record["saturated"] else "")
    return pooling, record
