"""Optimisation settings of the trainer: parameter groups, optimizers by name, and the one schedule table.

* :func:`param_groups` -- GeM's and wGeM's ``p`` at 10x the base learning rate and no
  weight decay (as cirtorch trains ``p``), every other trainable parameter at the base rate;
* :data:`OPTIMIZERS` -- ``"adam"``, ``"adamw"``, ``"sgd"`` (cirtorch's momentum 0.9);
* :data:`SCHEDULES` -- ``f(step, epoch, total_steps) -> factor`` of the base rates:
  ``"constant"``, ``"exponential"`` (cirtorch: x ``exp(-0.01)`` per epoch), ``"cosine"``
  (half a cosine over the run, per step) and ``"step"`` (:class:`StepSchedule`, CGD's x0.1 at
  epochs 12 and 16). A :class:`StepSchedule` with other milestones is a schedule too.

Taught in ``notebooks/05_wgem.ipynb`` and ``notebooks/07_cgd.ipynb``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from retrieval_lib.layers.pooling import GeM, WGeM

__all__ = ["param_groups", "OPTIMIZERS", "SCHEDULES", "StepSchedule"]


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, p_lr_mult: float = 10.0) -> list:
    """Parameter groups as cirtorch trains them.

    * ``"p"``: the exponents ``p`` of every :class:`GeM` and :class:`WGeM` layer, at
      ``lr * p_lr_mult`` and no weight decay (cirtorch: ``lr * 10``, ``weight_decay=0``).
    * ``"weights"``: every other trainable parameter (backbone, wGeM's attention conv,
      whitening, classifier) at ``lr`` and ``weight_decay``.

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    Each group carries ``base_lr``, the rate the schedule scales.
    """
    p_ids = {id(m.p) for m in model.modules() if isinstance(m, (GeM, WGeM)) and isinstance(m.p, nn.Parameter)}
    ps = [q for q in model.parameters() if q.requires_grad and id(q) in p_ids]
    rest = [q for q in model.parameters() if q.requires_grad and id(q) not in p_ids]
    groups = [
        {"params": rest, "lr": lr, "base_lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": ps, "lr": lr * p_lr_mult, "base_lr": lr * p_lr_mult, "weight_decay": 0.0, "name": "p"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameter (a learnable GeM p, "
                         "wGeM's conv, a whitening layer or an unfrozen backbone)")
    return groups


OPTIMIZERS = {
    "adam": lambda groups: torch.optim.Adam(groups),
    "adamw": lambda groups: torch.optim.AdamW(groups),
    "sgd": lambda groups: torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9),  # cirtorch's momentum
}


class StepSchedule:
    """Learning-rate factor ``gamma ** (number of milestones <= epoch)`` (epochs counted from 0).

    ``StepSchedule((12, 16))``: x1 for epochs 0-11, x0.1 for 12-15, x0.01 from 16, the CGD
    paper's schedule over 20 epochs (``SCHEDULES["step"]``).
    """

    def __init__(self, milestones: Sequence[int] = (12, 16), gamma: float = 0.1):
        self.milestones = tuple(sorted(int(m) for m in milestones))
        if any(m < 1 for m in self.milestones):
            raise ValueError(f"StepSchedule: milestones must be epochs >= 1, got {milestones!r}")
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"StepSchedule: gamma must be in (0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        # the name a trainer's config() records for this schedule
        self.__qualname__ = f"StepSchedule(milestones={self.milestones}, gamma={self.gamma})"

    def __call__(self, step: int, epoch: int, total: int) -> float:
        return self.gamma ** sum(epoch >= m for m in self.milestones)

    def __repr__(self) -> str:
        return self.__qualname__


def _constant(step: int, epoch: int, total: int) -> float:
    return 1.0


def _exponential(step: int, epoch: int, total: int) -> float:
    return math.exp(-0.01 * epoch)


def _cosine(step: int, epoch: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


SCHEDULES = {
    "constant": _constant,
    # cirtorch: ExponentialLR(gamma=exp(-0.01)) stepped once per epoch
    "exponential": _exponential,
    # half a cosine over the whole run, per step
    "cosine": _cosine,
    # CGD (Jun et al. 2019): x0.1 at epochs 12 and 16
    "step": StepSchedule((12, 16), 0.1),
}
