"""CGD: several global descriptors of one feature map, each projected and normalised, then combined.

Jun, Ko, Kim, Kim & Kim, "Combination of Multiple Global Descriptors for Image Retrieval",
arXiv 1903.10663, 2019. Taught in ``notebooks/07_cgd.ipynb``.

On the last feature map ``(B, C, H, W)`` of a backbone, CGD computes up to three global
descriptors, the *branches*, named by one letter each:

* ``S``: SPoC, the mean over the map (GeM with ``p = 1``);
* ``M``: MAC, the maximum over the map (GeM with ``p -> inf``);
* ``G``: GeM with a fixed ``p = 3``.

A *configuration* is a string of distinct letters in order, e.g. ``"SMG"``, ``"MG"``
or ``"G"`` (:data:`CGD_CONFIGS` lists the 15 the paper can name). With ``n`` branches and
an output of ``dim`` dimensions, branch ``i`` gives (bias-free FC ``W_i``: ``C -> k``,
``k = dim / n``)::

    f_i = pool_i(x)                      (B, C)
    phi_i = W_i f_i / ||W_i f_i||        (B, k)      each block has norm 1
    psi = [phi_1, ..., phi_n] / sqrt(n)  (B, dim)    = the concatenation, L2-normalised

(the concatenation of ``n`` unit vectors has norm ``sqrt(n)``, so the final L2
normalisation divides by exactly that: every block of the output has norm ``1/sqrt(n)``).
The first branch's pooled vector ``f_1`` also feeds an auxiliary classifier,
``BatchNorm1d(C) -> Linear(C, n_classes)``, trained with a smoothed, temperature-scaled
cross-entropy (:func:`~retrieval_lib.layers.losses.smoothed_cross_entropy`) next to the
ranking loss on ``psi`` (:func:`~retrieval_lib.layers.losses.batch_hard_triplet_loss`).

The paper's ablations are variants of the same module:

* ``combine="sum"``: every branch projects to ``dim`` and the unit vectors are summed,
  then L2-normalised, instead of concatenated;
* ``arch="A"``: the branches are trained apart, each with its own ranking loss on its
  ``phi_i`` (no combined descriptor in training); at test time the blocks are
  concatenated as in CGD. In training the module also returns the ``(B, n, k)`` blocks;
* ``arch="B"``: the raw pooled vectors are concatenated ``[f_1, ..., f_n]`` (no per-branch
  FC or L2), then one bias-free FC ``n C -> dim`` and L2.

``channel_scale=True`` adds one learned positive scale per channel, ``exp(a_c)``, applied to
the pooled vectors before everything else. Every power mean is positively homogeneous per
channel (``f^(p)(s x) = s f^(p)(x)`` for ``s > 0``), so this equals scaling the feature map
itself before pooling (up to GeM's clamp at ``eps``): a minimal trainable layer *under* the
three branches, shared by them and by the classifier. With a frozen backbone and without it,
the auxiliary loss cannot change the descriptor at all (its gradient stops at the fixed
``f_1``); with it, the classifier's gradient reaches the descriptor through the shared scales,
as it reaches the backbone in the paper. It starts at ``a = 0`` (scale 1): an untrained head is
unchanged.

Output convention (what :mod:`retrieval_lib.engine.objectives` expects): in eval mode the
descriptor ``(B, dim)``; in train mode ``(descriptor, logits)`` when the module has a
classifier (``n_classes`` given), else the descriptor; ``arch="A"`` appends the blocks
``(B, n, k)`` to the training output. :meth:`CGD.pool` and :meth:`CGD.embed` split the
forward pass in two, so that the pooled vectors of a frozen backbone can be computed once.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from retrieval_lib.layers import checks
from retrieval_lib.layers.pooling import MAC, GeM, SPoC

__all__ = ["CGD", "CGD_CONFIGS", "BRANCH_NAMES", "parse_config", "unit"]

#: the letters of the branches and what they pool
BRANCH_NAMES = {"S": "SPoC (p = 1)", "M": "MAC (p = inf)", "G": "GeM (p = 3, fixed)"}

#: every configuration the paper's naming allows: non-empty ordered strings of distinct letters
CGD_CONFIGS = tuple("".join(c) for n in (1, 2, 3) for c in itertools.permutations("SMG", n))

_ARCHS = ("cgd", "A", "B")
_COMBINES = ("concat", "sum")


def unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` along the last dimension, ``(..., D) -> (..., D)``.

    Unlike :func:`~retrieval_lib.layers.functional.l2n` (which adds ``eps`` to the norm),
    a non-zero row comes out with norm 1 up to rounding, so CGD's blocks have norm exactly
    ``1/sqrt(n)``; an all-zero row stays zero.
    """
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def parse_config(config) -> str:
    """Check a CGD configuration and return it in upper case: ``"smg"`` -> ``"SMG"``.

    A configuration names 1 to 3 distinct branches among ``S`` (SPoC), ``M`` (MAC) and ``G``
    (GeM), in order; the first feeds the auxiliary classifier. Raises ``ValueError``
    naming the problem (not a string, empty, unknown letter, repeated letter).
    """
    if not isinstance(config, str):
        raise ValueError(f"CGD: the configuration must be a string of branch letters such as 'SMG' or 'MG', "
                         f"got {config!r}")
    c = config.strip().upper()
    if not c:
        raise ValueError("CGD: the configuration is empty; name 1 to 3 branches among S (SPoC), M (MAC) and "
                         "G (GeM), e.g. 'SMG'")
    bad = sorted({ch for ch in c if ch not in BRANCH_NAMES})
    if bad:
        raise ValueError(f"CGD: unknown branch letter(s) {bad} in {config!r}; the branches are S (SPoC), "
                         "M (MAC) and G (GeM), e.g. 'SMG'")
    if len(set(c)) != len(c):
        raise ValueError(f"CGD: {config!r} names a branch twice; each of S, M, G may appear once (e.g. 'SG')")
    return c


def _branch_pool(letter: str, gem_p: float, eps: float) -> nn.Module:
    if letter == "S":
        return SPoC()
    if letter == "M":
        return MAC()
    return GeM(p=gem_p, eps=eps, learn_p=False)


class CGD(nn.Module):
    """The CGD head: branches of a feature map, per-branch FC + L2, combined, L2 (see the module doc).

    Args:
        config: the branches in order, e.g. ``"SMG"``, ``"MG"``, ``"G"`` (:func:`parse_config`).
        in_channels: ``C``, the feature map's channels (2048 for ResNet-50, 1280 for
            EfficientNet-Lite0).
        dim: the output dimension (1536 in the paper). With ``combine="concat"`` (and
            ``arch="A"``) it must be divisible by the number of branches ``n``; each branch
            gets ``k = dim / n``.
        n_classes: classes of the auxiliary classifier on the first branch's pooled vector
            (``BatchNorm1d(C) -> Linear(C, n_classes)``); ``None``: no classifier.
        combine: ``"concat"`` (CGD) or ``"sum"`` (the paper's summation ablation).
        arch: ``"cgd"``, ``"A"`` (branches trained apart, concatenated at test time) or
            ``"B"`` (raw pooled vectors concatenated, then one FC and L2).
        gem_p: the fixed exponent of the ``G`` branch (3 in the paper).
        eps: GeM's clamp of the map (``max(x, eps)^p``).
        channel_scale: learn one positive scale per channel under the branches (see the module
            doc); ``False`` (the paper's head on a backbone it fine-tunes).

    ``forward(x)``: ``(B, C, H, W) -> (B, dim)`` in eval mode; in train mode see the module
    doc. ``pool(x) -> (B, n, C)`` and ``embed(pooled)`` are the two halves of ``forward``.
    ``config_name`` is the configuration as the paper writes it.
    """

    def __init__(self, config: str = "SG", in_channels: int = 2048, dim: int = 1536, n_classes: int | None = None,
                 combine: str = "concat", arch: str = "cgd", gem_p: float = 3.0, eps: float = 1e-6,
                 channel_scale: bool = False):
        super().__init__()
        self.config_name = parse_config(config)
        self.in_channels = checks.check_int(in_channels, "in_channels", "CGD")
        self.dim = checks.check_int(dim, "dim", "CGD")
        if arch not in _ARCHS:
            raise ValueError(f"CGD: arch must be one of {list(_ARCHS)} ('cgd'; 'A': branches trained apart; "
                             f"'B': raw pooled vectors concatenated, one FC), got {arch!r}")
        if combine not in _COMBINES:
            raise ValueError(f"CGD: combine must be 'concat' (CGD) or 'sum', got {combine!r}")
        if combine == "sum" and arch != "cgd":
            raise ValueError(f"CGD: combine='sum' is an ablation of arch='cgd'; arch={arch!r} has its own "
                             "combination (leave combine='concat')")
        if not (isinstance(gem_p, (int, float)) and not isinstance(gem_p, bool) and math.isfinite(gem_p)
                and gem_p >= 1):
            raise ValueError(f"CGD: gem_p must be a finite number >= 1 (3 in the paper), got {gem_p!r}")
        if n_classes is not None:
            n_classes = checks.check_int(n_classes, "n_classes", "CGD", minimum=2)
        n = len(self.config_name)
        self.n_branches, self.arch, self.combine, self.gem_p = n, arch, combine, float(gem_p)
        if arch == "B" or combine == "sum":
            k = dim
        else:
            if dim % n:
                lo, hi = dim - dim % n, dim - dim % n + n
                raise ValueError(f"CGD: dim={dim} is not divisible by the {n} branches of {self.config_name!r}; "
                                 f"each branch gets dim / n dimensions, so use e.g. dim={lo or hi} or {hi}")
            k = dim // n
        self.k = k
        self.pools = nn.ModuleList([_branch_pool(b, self.gem_p, eps) for b in self.config_name])
        if arch == "B":
            self.fc = nn.Linear(n * self.in_channels, dim, bias=False)
            self.fcs = None
        else:
            self.fc = None
            self.fcs = nn.ModuleList([nn.Linear(self.in_channels, k, bias=False) for _ in range(n)])
        self.log_scale = nn.Parameter(torch.zeros(self.in_channels)) if channel_scale else None
        self.n_classes = n_classes
        self.classifier = None if n_classes is None else nn.Sequential(
            nn.BatchNorm1d(self.in_channels), nn.Linear(self.in_channels, n_classes))

    # -- the two halves of forward
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The branches' pooled vectors: ``(B, C, H, W) -> (B, n, C)``, in configuration order."""
        checks.check_fmap(x, "CGD", self.in_channels)
        return torch.stack([p(x) for p in self.pools], dim=1)  # (B, n, C)

    def blocks(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-branch FC + L2: ``(B, n, C) -> (B, n, k)``, every row of unit norm (not for ``arch="B"``)."""
        if self.fcs is None:
            raise ValueError("CGD.blocks: arch='B' has no per-branch FC; its FC acts on the concatenation")
        return torch.stack([unit(fc(pooled[:, i])) for i, fc in enumerate(self.fcs)], dim=1)

    def embed(self, pooled: torch.Tensor):
        """From the pooled vectors ``(B, n, C)`` (:meth:`pool`) to the output of ``forward``."""
        if pooled.dim() != 3 or pooled.shape[1:] != (self.n_branches, self.in_channels):
            raise ValueError(f"CGD.embed: expected pooled vectors (B, {self.n_branches}, {self.in_channels}) "
                             f"from CGD.pool, got {tuple(pooled.shape)}")
        if self.log_scale is not None:
            pooled = pooled * self.log_scale.exp()  # (B, n, C): = pooling the map scaled per channel
        blocks = None
        if self.arch == "B":
            d = unit(self.fc(pooled.flatten(1)))  # (B, n C) -> (B, dim)
        else:
            blocks = self.blocks(pooled)  # (B, n, k)
            d = unit(blocks.sum(dim=1)) if self.combine == "sum" else unit(blocks.flatten(1))  # (B, dim)
        if not self.training:
            return d
        out = (d,) if self.classifier is None else (d, self.classifier(pooled[:, 0]))
        if self.arch == "A":
            out = out + (blocks,)
        return out if len(out) > 1 else d

    def forward(self, x: torch.Tensor):
        return self.embed(self.pool(x))

    def extra_repr(self) -> str:
        parts = [f"config={self.config_name!r}", f"in_channels={self.in_channels}", f"dim={self.dim}",
                 f"k={self.k}", f"arch={self.arch!r}", f"combine={self.combine!r}", f"gem_p={self.gem_p:g}"]
        if self.n_classes is not None:
            parts.append(f"n_classes={self.n_classes}")
        if self.log_scale is not None:
            parts.append("channel_scale=True")
        return ", ".join(parts)
