"""Learned regional aggregation: Gordo's trainable R-MAC and DARAC, as pooling heads.

Both map a feature map batch ``(B, C, H, W)`` to descriptors ``(B, D)``, L2-normalised, and
can stand wherever a pooling does (``RetrievalNet(pooling)``, ``pool_fmaps``,
``train_with_validation``). Both declare ``multiscale_p = 1`` (descriptors of several input
scales are averaged plainly, as R-MAC's are).

* :class:`TrainableRMAC` -- Gordo, Almazán, Revaud & Larlus, "End-to-end learning of deep
  visual representations for image retrieval", IJCV 2017: region MACs -> L2 -> shift + FC
  (started at the identity or at the PCA whitening of region vectors, :meth:`TrainableRMAC.fit_pca`,
  and learned as a relative change of that start, ``W = W0 (I + Delta)``) -> L2 -> sum over
  regions -> L2. Their region proposal network is out
  of scope: the regions are R-MAC's rigid grid (:func:`~retrieval_lib.layers.functional.rmac_regions`).
* :class:`DARAC` -- Schall, Barthel, Hezel & Jung, "Deep aggregation of regional
  convolutional activations for content based image retrieval", MMSP 2019: 21 regions,
  each pooled by average and by max, every pooled vector L2-normalised (42 vectors of
  ``C`` dimensions), aggregated by ``l`` learned kernels of size 42 x 1 shared across
  channels, a ReLU, a second learned step to ``C``, and L2. :func:`darac_regions` fixes the
  region layout; :func:`darac_vectors` computes the 42 vectors.

Taught in ``notebooks/06_darac.ipynb``.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from retrieval_lib.layers import checks
from retrieval_lib.layers.cells import cell_maxima, cell_plan, region_mac_from_cells
from retrieval_lib.layers.functional import l2n, rmac_regions_tuple

__all__ = ["darac_regions", "darac_slots", "darac_vectors", "TrainableRMAC", "DARAC", "N_DARAC_REGIONS"]

#: the number of DARAC regions: the whole map and the 2 + 6 + 12 squares of the landscape layout at L = 3
N_DARAC_REGIONS = 21
_DARAC_L = 3


# --------------------------------------------------------------------------- the layout
@functools.lru_cache(maxsize=1024)
def _landscape_regions(h: int, w: int, L: int) -> tuple:
    """Squares of the fixed landscape layout on an ``h x w`` map with ``h <= w``: ``(x, y, s, s)``.

    Level ``l``: ``l`` squares along the short side, ``l + 1`` along the long side, side
    ``s = max(1, floor(2 h / (l + 1)))``, start positions as in R-MAC (float32 arithmetic,
    exactly as :func:`~retrieval_lib.layers.functional.rmac_regions`).
    """
    f32 = torch.float32

    def starts(side: int, s: int, count: int, s2: int) -> list:
        step = 0.0 if count == 1 else (side - s) / (count - 1)
        pos = torch.floor(s2 + torch.arange(count, dtype=f32) * step) - s2
        return [min(max(int(v), 0), side - s) for v in pos.tolist()]

    regions = []
    for level in range(1, L + 1):
        s = max(1, (2 * h) // (level + 1))
        s2 = math.floor(s / 2 - 1)
        xs = starts(w, s, level + 1, s2)
        ys = starts(h, s, level, s2)
        regions.extend((x0, y0, s, s) for y0 in ys for x0 in xs)
    return tuple(regions)


def darac_regions(H: int, W: int) -> torch.Tensor:
    """DARAC's 21 regions of an ``H x W`` map: int64 ``(21, 4)`` of ``(x, y, w, h)``, in the map's own axes.

    **The layout rule** (ours; the paper states 21 regions for landscape maps of 4:3 to 16:9
    and nothing else). The kernels of :class:`DARAC` hold one weight per region *slot*, so
    every map must give the same slots:

    * slot 0 is the whole map;
    * slots 1-20 are R-MAC's squares at ``L = 3`` in the layout R-MAC chooses for a
      landscape map of 4:3 to 16:9: level ``l`` has ``l`` squares along the short side and
      ``l + 1`` along the long side (2 + 6 + 12), side ``floor(2 min(H, W) / (l + 1))`` (at
      least one cell), start positions by R-MAC's rule; listed level by level, row-major;
    * a portrait map (``H > W``) is read transposed: its long side plays the landscape
      width, so slot ``(level, i, j)`` lies at row ``j``, column ``i`` of the portrait map
      (R-MAC's own grid is symmetric under transposition, so this is R-MAC's grid too).

    Wherever R-MAC itself gives 20 regions at ``L = 3`` these are exactly R-MAC's regions
    (:func:`~retrieval_lib.layers.functional.rmac_regions` ``(H, W, 3)``, as a set) plus
    the whole map: on every map that is neither square nor longer than 1.8 : 1 (R-MAC's
    40 % overlap rule switches there), so on all maps of 4:3 to 16:9, landscape or
    portrait. On other shapes the slots keep this layout where R-MAC would change its
    count (14 regions on a square map, 26 on a 2:1 map): on a square map the two level-1
    squares coincide with the whole map, on a 2:1 map neighbouring squares overlap less
    than R-MAC's 40 %. Maps with a short side below 4 cells get squares of at least one
    cell (R-MAC drops such levels). Taught in ``notebooks/06_darac.ipynb``.
    """
    H = checks.check_int(H, "H", "darac_regions")
    W = checks.check_int(W, "W", "darac_regions")
    return torch.tensor(_darac_regions_tuple(H, W), dtype=torch.int64)


@functools.lru_cache(maxsize=1024)
def _darac_regions_tuple(H: int, W: int) -> tuple:
    if H <= W:
        squares = _landscape_regions(H, W, _DARAC_L)
    else:  # portrait: the landscape layout of the transposed map, transposed back
        squares = tuple((y, x, s, s) for x, y, s, _ in _landscape_regions(W, H, _DARAC_L))
    return ((0, 0, W, H),) + squares


def darac_slots() -> list:
    """Names of the 21 region slots: ``"global"``, then ``"L1 (0,0)"`` ... (level, row, column in the landscape layout)."""
    names = ["global"]
    for level in range(1, _DARAC_L + 1):
        names += [f"L{level} ({r},{c})" for r in range(level) for c in range(level + 1)]
    return names


def _region_means(x: torch.Tensor, regions: tuple) -> torch.Tensor:
    """Mean of every channel over every region, ``(B, C, H, W) -> (B, R, C)``, from an integral image."""
    B, C, H, W = x.shape
    S = torch.zeros(B, C, H + 1, W + 1, dtype=x.dtype, device=x.device)
    S[:, :, 1:, 1:] = x.cumsum(dim=-2).cumsum(dim=-1)  # S[y, x] = sum of x[:y, :x]
    r = torch.tensor(regions, dtype=torch.int64, device=x.device)  # (R, 4)
    x0, y0, x1, y1 = r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]
    flat = S.flatten(2)  # (B, C, (H + 1)(W + 1))

    def at(yy, xx):
        return flat.index_select(2, yy * (W + 1) + xx)  # (B, C, R)

    sums = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    area = (r[:, 2] * r[:, 3]).to(x.dtype)
    return (sums / area).transpose(1, 2)  # (B, R, C)


def darac_vectors(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DARAC's 42 pooled vectors, each L2-normalised: ``(B, C, H, W) -> (B, 42, C)``.

    Rows 0-20: the average of each region slot of :func:`darac_regions` (slot 0, the whole
    map, first); rows 21-41: the max (MAC) of the same slots, in the same order. Each row
    is divided by its L2 norm (plus ``eps``). Vectorised over images and regions (maxima as
    in :func:`~retrieval_lib.layers.functional.region_mac`, means from an integral image).
    Source: Schall et al., MMSP 2019. Taught in ``notebooks/06_darac.ipynb``.
    """
    checks.check_fmap(x, "darac_vectors")
    checks.check_eps(eps, "darac_vectors")
    H, W = x.shape[-2:]
    regions = _darac_regions_tuple(H, W)
    plan = cell_plan(H, W, regions, x.device)
    maxima = region_mac_from_cells(cell_maxima(x, plan), plan)  # (B, 21, C)
    means = _region_means(x, regions)  # (B, 21, C)
    return l2n(torch.cat([means, maxima], dim=1), eps)  # (B, 42, C)


def _is_vectors(x, fn: str, rows: int | None, channels: int) -> bool:
    """True when ``x`` is a batch of precomputed vectors ``(B, R, C)`` (a head's input once its
    frozen maps were pooled); ``False`` for a feature map batch; a clear error otherwise."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 3):
        return False
    if (rows is not None and x.shape[1] != rows) or x.shape[2] != channels or not x.is_floating_point():
        raise ValueError(f"{fn}: a 3-D input is read as precomputed vectors (B, {rows or 'R'}, {channels}) "
                         f"(floating point), got {tuple(x.shape)} {x.dtype}; give feature maps (B, C, H, W) "
                         "or the output of the layer's own vector method")
    return True


# --------------------------------------------------------------------------- Gordo et al.
class TrainableRMAC(nn.Module):
    """Gordo et al.'s trainable R-MAC: ``(B, C, H, W) -> (B, D)``, L2-normalised.

    For the regions ``r`` of R-MAC's rigid grid (``rmac_regions(H, W, L)``, plus the whole
    map when ``include_global``)::

        v_r = l2n(mac_r(x));   u_r = l2n(W (v_r + b));   f = l2n(sum_r u_r)

    with a learnable shift ``b`` (``shift``, ``(C,)``) and fully connected layer ``W`` (``D x C``).

    **Parametrisation.** ``W = W0 (I + Delta)``: ``W0`` (buffer ``w0``, ``D x C``) is the
    *start* and stays fixed, ``Delta`` (``delta``, ``C x C``, zero at the start) is what
    the optimiser moves. An optimiser step of size ``eta`` on ``Delta`` changes ``W`` by about
    ``eta`` *relative to the start*, whatever the scale of ``W0``; trained directly, the
    entries of a PCA-whitening start (they scale like ``lambda^-1/2``, tens to thousands)
    would move by ``eta`` in absolute terms, i.e. not at all at Adam's usual rates. With
    ``Delta = 0`` the layer is exactly the layer with ``W = W0`` (:attr:`weight` gives ``W``).

    Built as the identity (``b = 0``, ``W0 = I``, ``D = C``): then the layer *is* R-MAC
    (:func:`~retrieval_lib.layers.functional.rmac` with the same ``L`` and
    ``include_global``). Gordo et al. initialise the layer from the PCA whitening of region
    vectors, ``b = -mean``, ``W0 = diag(lambda^-1/2) E^T`` (:meth:`fit_pca` /
    :meth:`from_pca`), and train it with the triplet loss and hard negatives. Their region
    proposal network is not implemented: the grid is rigid. Source: Gordo, Almazán, Revaud
    & Larlus, IJCV 2017. Taught in ``notebooks/06_darac.ipynb``.
    """

    #: exponent of the mean over input scales (:func:`functional.multiscale_mean`)
    multiscale_p = 1.0

    def __init__(self, in_channels: int, L: int = 3, include_global: bool = True, dim: int | None = None,
                 eps: float = 1e-6):
        super().__init__()
        self.in_channels = checks.check_int(in_channels, "in_channels", "TrainableRMAC")
        dim = self.in_channels if dim is None else checks.check_int(dim, "dim", "TrainableRMAC")
        if dim > self.in_channels:
            raise ValueError(f"TrainableRMAC: dim={dim} exceeds the {self.in_channels} channels; the FC layer "
                             "projects onto at most as many dimensions as it gets")
        self.L = checks.check_int(L, "L", "TrainableRMAC")
        checks.check_eps(eps, "TrainableRMAC")
        self.include_global = bool(include_global)
        self.eps = eps
        self.dim = dim
        self.shift = nn.Parameter(torch.zeros(self.in_channels))  # b
        self.delta = nn.Parameter(torch.zeros(self.in_channels, self.in_channels))  # Delta: W = W0 (I + Delta)
        self.register_buffer("w0", torch.eye(dim, self.in_channels))  # W0, the start (fixed)

    @property
    def weight(self) -> torch.Tensor:
        """The fully connected layer's matrix ``W = W0 (I + Delta)``, ``(D, C)`` (detached)."""
        w0 = self.w0.detach()
        return w0 + w0 @ self.delta.detach()

    def relative_change(self) -> float:
        """``||W - W0||_F / ||W0||_F``: how far training moved the fully connected layer from its start."""
        w0 = self.w0.detach().double()
        return float((w0 @ self.delta.detach().double()).norm() / w0.norm().clamp(min=1e-300))

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``W (v + b)`` for vectors ``v`` ``(..., C) -> (..., D)``, computed as ``W0 (y + Delta y)``, ``y = v + b``."""
        y = v + self.shift
        return (y + y @ self.delta.T) @ self.w0.T

    def region_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised region MACs ``(B, R, C)`` (the whole map last when ``include_global``).

        They do not depend on the layer's parameters: with a frozen backbone they can be
        computed once per map and given to :meth:`forward` in place of the maps (a 3-D input
        is returned as it is)."""
        if _is_vectors(x, "TrainableRMAC", None, self.in_channels):
            return x
        checks.check_fmap(x, "TrainableRMAC", self.in_channels, "in_channels")
        H, W = x.shape[-2:]
        regions = rmac_regions_tuple(H, W, self.L)
        plan = cell_plan(H, W, regions, x.device)
        cells = cell_maxima(x, plan)  # (B, ny, nx, C)
        v = region_mac_from_cells(cells, plan)  # (B, R, C)
        if self.include_global:
            v = torch.cat([v, cells.amax(dim=(1, 2))[:, None]], dim=1)
        return l2n(v, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(B, C, H, W)``, or their :meth:`region_vectors` ``(B, R, C)``, -> ``(B, D)``."""
        v = self.region_vectors(x)  # (B, R, C)
        u = l2n(self.project(v), self.eps)  # (B, R, D)
        return l2n(u.sum(dim=1), self.eps)  # (B, D)

    @torch.no_grad()
    def fit_pca(self, fmaps, shrinkage: float = 0.0) -> "TrainableRMAC":
        """Start at the PCA whitening of the region vectors of ``fmaps``: set ``shift`` and ``W0``, zero ``Delta``; returns self.

        ``fmaps``: feature maps ``(C, h, w)`` (a list, any sizes) or a batch ``(B, C, h, w)``.
        With the region vectors ``v`` (as :meth:`region_vectors`), their mean ``m`` and the
        eigen-decomposition ``E diag(lambda) E^T`` of their covariance (eigenvalues
        descending), ``shift = -m`` and ``W0 = diag(lambda_D + shrinkage mean(lambda_D))^-1/2 E_D^T``
        on the ``D`` leading components. ``shrinkage > 0`` damps the directions of tiny
        variance (0: plain PCA whitening, as in the paper). Raises ``ValueError`` when
        fewer than ``D + 1`` region vectors are given (the covariance would have fewer than
        ``D`` non-zero eigenvalues): give more maps or a smaller ``dim``.
        """
        maps = [fmaps[i:i + 1] for i in range(fmaps.shape[0])] if isinstance(fmaps, torch.Tensor) \
            and fmaps.dim() == 4 else [f[None] for f in fmaps]
        if not maps:
            raise ValueError("TrainableRMAC.fit_pca: no feature maps given")
        if not (isinstance(shrinkage, (int, float)) and math.isfinite(shrinkage) and shrinkage >= 0):
            raise ValueError(f"TrainableRMAC.fit_pca: shrinkage must be a number >= 0, got {shrinkage!r}")
        V = torch.cat([self.region_vectors(m.to(self.shift.device, self.shift.dtype))[0] for m in maps]).double()
        D = self.dim
        if V.shape[0] < D + 1:
            raise ValueError(f"TrainableRMAC.fit_pca: {V.shape[0]} region vectors cannot whiten {D} dimensions "
                             f"(the covariance has at most {V.shape[0] - 1} non-zero eigenvalues); give more "
                             f"maps or build the layer with dim <= {max(1, V.shape[0] - 1)}")
        mean = V.mean(dim=0)
        Xc = V - mean
        n = V.shape[0]
        if n < V.shape[1]:  # fewer vectors than channels: the (n, n) Gram matrix has the same spectrum
            lam, U = torch.linalg.eigh(Xc @ Xc.T / (n - 1))  # ascending
            lam, U = lam.flip(0)[:D].clamp(min=0), U.flip(1)[:, :D]
            E = Xc.T @ U / (lam * (n - 1)).sqrt().clamp(min=1e-300)  # (C, D) unit eigenvectors of the covariance
        else:
            lam, E = torch.linalg.eigh(Xc.T @ Xc / (n - 1))  # ascending
            lam, E = lam.flip(0)[:D].clamp(min=0), E.flip(1)[:, :D]
        lam = (lam + shrinkage * lam.mean()).clamp(min=1e-12 * float(lam[0]) + 1e-300)  # no division by 0
        self.shift.copy_(-mean.to(self.shift.dtype))
        self.w0.copy_((E / lam.sqrt()).T.to(self.w0.dtype))
        self.delta.zero_()
        return self

    @classmethod
    def from_pca(cls, fmaps, in_channels: int | None = None, L: int = 3, include_global: bool = True,
                 dim: int | None = None, shrinkage: float = 0.0) -> "TrainableRMAC":
        """A layer built for the maps' channels and started by :meth:`fit_pca` on ``fmaps``."""
        if in_channels is None:
            in_channels = int(fmaps[0].shape[-3])
        return cls(in_channels, L=L, include_global=include_global, dim=dim).fit_pca(fmaps, shrinkage)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, dim={self.dim}, L={self.L}, "
                f"include_global={self.include_global}, W = W0 (I + Delta)")


# --------------------------------------------------------------------------- DARAC
class DARAC(nn.Module):
    """DARAC (Schall et al., MMSP 2019): ``(B, C, H, W) -> (B, C)``, L2-normalised.

    With the 42 vectors ``V = darac_vectors(x)`` ``(B, 42, C)`` (average, then max, of the
    21 region slots of :func:`darac_regions`, each L2-normalised)::

        Z_k = sum_j A_kj V_j + a_k        k = 1..l   (l kernels of size 42 x 1, shared across channels)
        f   = l2n( sum_k g_k relu(Z_k) )             (the second step, l -> 1 per channel)

    **Our reading** (the paper gives the first step; of the second only that it maps
    ``l x C`` to ``C``): the second step is a learned weighted sum ``g`` of the ``l`` maps,
    with a ReLU between the steps — without it the two linear steps collapse into one
    weighted sum of the 42 vectors and ``l`` kernels would add nothing. ``a`` (``bias``,
    ``(l,)``) lets the ReLU cut.

    **Initialisation.** ``A_kj = 1 + e_kj`` with ``e`` drawn from ``U(-1/2, 1/2)`` (seeded)
    and centred over the kernels (``sum_k e_kj = 0``), ``a = 0``, ``g_k = 1/l``. For a
    non-negative feature map (any ReLU or ReLU6 backbone) every ``Z_k`` is non-negative,
    the ReLU passes it, and ``sum_k g_k A_kj = 1``: the untrained layer is the
    L2-normalised plain sum of the 42 vectors, up to rounding. The kernels differ, so they
    do not stay identical once trained.

    :meth:`set_vector_weights` sets every kernel to given weights of the 42 vectors: weight 1
    on the max vectors and 0 on the average ones gives R-MAC with the whole-map region on
    every map where R-MAC's grid is the layout (all 4:3-16:9 maps; see :func:`darac_regions`).
    :meth:`vector_weights` reads the linear weights back, :meth:`contributions` what each
    vector adds to each image's descriptor. Taught in ``notebooks/06_darac.ipynb``.
    """

    #: exponent of the mean over input scales (:func:`functional.multiscale_mean`)
    multiscale_p = 1.0
    n_vectors = 2 * N_DARAC_REGIONS

    def __init__(self, kernels: int = 16, eps: float = 1e-6, seed: int = 0):
        super().__init__()
        self.kernels = checks.check_int(kernels, "kernels", "DARAC")
        checks.check_eps(eps, "DARAC")
        self.eps = eps
        gen = torch.Generator().manual_seed(int(seed))
        e = torch.rand(self.kernels, self.n_vectors, generator=gen, dtype=torch.float64) - 0.5
        e = e - e.mean(dim=0, keepdim=True)  # every column sums to 0 over the kernels
        self.weight = nn.Parameter((1.0 + e).float())  # (l, 42): A
        self.bias = nn.Parameter(torch.zeros(self.kernels))  # (l,): a
        self.combine = nn.Parameter(torch.full((self.kernels,), 1.0 / self.kernels))  # (l,): g

    def vectors(self, x: torch.Tensor) -> torch.Tensor:
        """The 42 L2-normalised vectors ``(B, 42, C)`` (:func:`darac_vectors`) of feature maps ``(B, C, H, W)``.

        They do not depend on the layer's parameters: with a frozen backbone they can be
        computed once per map and given to :meth:`forward` in place of the maps (a 3-D
        input ``(B, 42, C)`` is returned as it is)."""
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            _is_vectors(x, "DARAC", self.n_vectors, x.shape[2])
            return x
        return darac_vectors(x, self.eps)

    def _aggregate(self, V: torch.Tensor):
        Z = torch.einsum("kj,bjc->bkc", self.weight, V) + self.bias[None, :, None]  # (B, l, C)
        return Z, torch.einsum("k,bkc->bc", self.combine, torch.relu(Z))  # (B, l, C), (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(B, C, H, W)``, or their :meth:`vectors` ``(B, 42, C)``, -> ``(B, C)``."""
        _, u = self._aggregate(self.vectors(x))  # (B, C, H, W) -> (B, 42, C) -> (B, C)
        return l2n(u, self.eps)

    @torch.no_grad()
    def set_vector_weights(self, weights) -> "DARAC":
        """Make the layer ``l2n(sum_j w_j V_j)`` on non-negative maps: every kernel = ``weights``
        ``(42,)`` (non-negative), bias 0, ``g = 1/l``. Returns self."""
        w = torch.as_tensor(weights, dtype=self.weight.dtype).reshape(-1)
        if w.shape != (self.n_vectors,) or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"DARAC.set_vector_weights: give {self.n_vectors} finite non-negative weights (21 "
                             "average vectors, then 21 max vectors), got "
                             f"{tuple(w.shape)}" + ("" if w.shape != (self.n_vectors,) else " with negative/non-finite ones"))
        self.weight.copy_(w.expand(self.kernels, -1))
        self.bias.zero_()
        self.combine.fill_(1.0 / self.kernels)
        return self

    def vector_weights(self) -> torch.Tensor:
        """The weight of each of the 42 vectors where every ReLU passes: ``sum_k g_k A_kj``, ``(42,)``.

        Exact for the untrained layer on non-negative maps (all ones); after training, the
        weights of the linear part (the ReLU can switch kernels off per channel, which
        :meth:`contributions` accounts for)."""
        return (self.combine.detach()[:, None] * self.weight.detach()).sum(dim=0)

    @torch.no_grad()
    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """What each of the 42 vectors adds to each image's descriptor: ``(B, 43)``.

        With ``u = sum_k g_k relu(Z_k)`` the descriptor before its L2 normalisation, every
        channel ``c`` is exactly ``u_c = sum_j e_jc V_jc + t_c`` with ``e_jc = sum_k g_k
        [Z_kc > 0] A_kj`` and ``t_c = sum_k g_k [Z_kc > 0] a_k``. Column ``j < 42`` is
        ``<e_j * V_j, u> / ||u||^2`` (the share of vector ``j`` along the descriptor), column
        42 the share of the biases; each row sums to 1. The untrained layer gives
        ``<V_j, s> / ||s||^2`` with ``s`` the plain sum."""
        V = self.vectors(x)  # (B, 42, C)
        Z, u = self._aggregate(V)
        gate = (Z > 0).to(V.dtype) * self.combine[None, :, None]  # (B, l, C)
        e = torch.einsum("bkc,kj->bjc", gate, self.weight)  # (B, 42, C)
        t = torch.einsum("bkc,k->bc", gate, self.bias)  # (B, C)
        norm2 = (u * u).sum(dim=1, keepdim=True)  # (B, 1)
        shares = torch.cat([((e * V) * u[:, None]).sum(dim=2), (t * u).sum(dim=1, keepdim=True)], dim=1)
        return shares / norm2

    def extra_repr(self) -> str:
        return f"kernels={self.kernels}, vectors={self.n_vectors}, eps={self.eps:.0e}"
