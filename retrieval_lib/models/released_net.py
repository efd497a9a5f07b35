"""A released network as the library's own module, with the head each code base writes.

:class:`ReleasedNet` is a :class:`~retrieval_lib.models.retrieval_net.RetrievalNet` whose head
follows cirtorch's or dirtorch's ``forward`` exactly; :func:`whiten_lw` and :func:`whiten_pca`
are their post-processing whitenings, :func:`cirtorch_msp` the exponent cirtorch combines
scales with. Built by :func:`retrieval_lib.models.released.load_network`; the sources are
named in that module's docstring. Taught in ``notebooks/09_reproductions.ipynb``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from retrieval_lib.errors import UsageError
from retrieval_lib.models.retrieval_net import RetrievalNet

__all__ = ["ReleasedNet", "whiten_lw", "whiten_pca", "cirtorch_msp"]


def _l2(x: torch.Tensor, style: str) -> torch.Tensor:
    """L2 normalisation of ``(B, D)`` rows as each code base writes it: cirtorch's ``l2n``
    divides by ``||x|| + 1e-6``; dirtorch's ``F.normalize`` by ``max(||x||, 1e-12)``."""
    if style == "cirtorch":
        return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-6)
    return F.normalize(x, p=2, dim=-1)


class ReleasedNet(RetrievalNet):
    """A released network as the library's own :class:`~retrieval_lib.models.retrieval_net.RetrievalNet`.

    ``backbone.features`` -> ``pooling`` -> head, with ``backbone``, ``pooling`` and ``whiten`` the
    library's modules; ``forward`` takes a batch or a list of images of any sizes as
    ``RetrievalNet`` does. Only the head differs, to follow each code base exactly:

    * cirtorch (``ImageRetrievalNet.forward``): ``l2n(pool(f))``, then with the FC whitening
      ``l2n(whiten(.))``; ``l2n`` divides by ``||x|| + 1e-6``.
    * dirtorch (``ResNet_RMAC.forward``): ``pool(f)``, L2 only if ``norm_features``, ``fc``,
      then ``F.normalize``.

    ``forward``: ``(B, 3, H, W)`` images normalised with ``backbone.mean``/``std`` -> ``(B, D)``.
    :meth:`multiscale` combines several input scales as cirtorch's ``extract_ms`` does;
    :meth:`post_whiten` applies the post-processing whitening stored with the network
    (cirtorch's ``Lw``, dirtorch's PCA). ``info`` records the format, the checkpoint's
    settings and the registry entry (when loaded by name).
    """

    def __init__(self, backbone: nn.Module, pooling: nn.Module, whiten: Optional[nn.Module] = None,
                 norm_style: str = "cirtorch", norm_before_whiten: bool = True, lw: Optional[dict] = None,
                 pca: Optional[dict] = None, info: Optional[dict] = None):
        super().__init__(pooling, backbone=backbone, whiten=whiten)
        self.norm_style = norm_style
        self.norm_before_whiten = bool(norm_before_whiten)
        self.lw = lw or {}  # {"retrieval-SfM-120k": {"ss": (m (D,), P (D', D)), "ms": ...}} float64 tensors
        self.pca = pca      # {"mean", "components", "explained_variance", "whiten"} float64 tensors
        self.info = info or {}

    @property
    def mean(self):
        return self.backbone.mean

    @property
    def std(self):
        return self.backbone.std

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The authors' head on one batch (``RetrievalNet.forward`` groups a list of images by size)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        d = self.pooling(self.backbone.features(x))  # (B, 3, H, W) -> (B, C, h, w) -> (B, C)
        if self.whiten is None:
            return _l2(d, self.norm_style)
        if self.norm_before_whiten:
            d = _l2(d, self.norm_style)
        return _l2(self.whiten(d), self.norm_style)  # (B, C) -> (B, D)

    def multiscale(self, x: torch.Tensor, scales=(1.0,), msp: float = 1.0) -> torch.Tensor:
        """cirtorch's ``extract_ms``: ``v = (mean_s forward(x_s)^msp)^(1/msp)``, then ``v / ||v||``.

        ``x_s`` is ``x`` for ``s == 1``, else ``F.interpolate(x, scale_factor=s, mode="bilinear",
        align_corners=False)`` of the normalised image, with ``recompute_scale_factor=True``: the
        output size is ``floor(H s)`` and the sampling grid follows that size, as PyTorch <= 1.5 did
        (cirtorch's README: tested with PyTorch 1.0.0). One scale returns ``forward(x)``.
        ``(B, 3, H, W) -> (B, D)``.
        """
        scales = [float(s) for s in scales]
        if len(scales) == 1 and scales[0] == 1.0:
            return self.forward(x)
        v = 0
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                                  recompute_scale_factor=True)
            v = v + self.forward(xs).pow(msp)
        v = (v / len(scales)).pow(1.0 / msp)
        return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)

    def post_whiten(self, X: torch.Tensor, multiscale: bool = False, dataset: Optional[str] = None,
                    power: float = 0.25) -> torch.Tensor:
        """The post-processing whitening stored with the network, on descriptors ``(N, D)``.

        cirtorch: ``Lw`` learned on ``dataset`` (default: the only/first one stored), the
        ``'ms'`` matrices when ``multiscale`` else ``'ss'`` (test.py), via :func:`whiten_lw`.
        dirtorch: the checkpoint's PCA with ``power`` (test_dir's ``--whitenp``, 0.25), via
        :func:`whiten_pca`. Raises ``UsageError`` when the network carries none.
        """
        if self.lw:
            name = dataset or next(iter(self.lw))
            if name not in self.lw:
                raise UsageError(f"no Lw learned on {name!r} in this network; it has {sorted(self.lw)}")
            m, P = self.lw[name]["ms" if multiscale else "ss"]
            return whiten_lw(X, m, P)
        if self.pca is not None:
            return whiten_pca(X, self.pca, power)
        raise UsageError("this network carries no post-processing whitening (no meta['Lw'], no 'pca')")


def whiten_lw(X: torch.Tensor, m: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """cirtorch's ``whitenapply`` in the library's layout: ``(N, D) -> (N, D')``.

    ``y = P (x - m)``, then ``y / (||y|| + 1e-6)``; cirtorch writes it for ``D x N`` columns
    (``np.dot(P, X - m)``, ``cirtorch/utils/whiten.py``). Computed in float64 (the stored
    ``m``, ``P`` are float64 numpy arrays), returned in ``X``'s dtype.
    """
    Y = (X.to(torch.float64) - m.reshape(1, -1).to(X.device)) @ P.to(X.device).T
    Y = Y / (torch.linalg.vector_norm(Y, dim=1, keepdim=True) + 1e-6)
    return Y.to(X.dtype)


def whiten_pca(X: torch.Tensor, pca: dict, power: float = 0.25, dims: Optional[int] = None) -> torch.Tensor:
    """dirtorch's ``whiten_features`` (``dirtorch/utils/common.py``, ``transform`` with scikit-learn):
    ``y = (x - mean) C[:dims]^T``, divided by ``explained_variance[:dims] ** power`` when the PCA
    whitens, then ``y / ||y||``. ``(N, D) -> (N, dims or D)``; computed in float64.
    """
    Y = (X.to(torch.float64) - pca["mean"].to(X.device)) @ pca["components"][:dims].to(X.device).T
    if pca["whiten"]:
        Y = Y / pca["explained_variance"][:dims].to(X.device).pow(power)
    return (Y / torch.linalg.vector_norm(Y, dim=1, keepdim=True)).to(X.dtype)


def cirtorch_msp(info: dict, scales, script: str = "test.py") -> float:
    """The exponent cirtorch combines scales with.

    ``test.py`` (``main``): GeM's ``p`` when there are several scales, the pooling is GeM, not
    regional, and the network has no whitening layer; else 1. ``test_e2e.py`` always uses 1
    (``extract_vectors``' default ``msp=1``).
    """
    if script.endswith("test_e2e.py"):
        return 1.0
    if len(list(scales)) > 1 and info.get("pooling") == "gem" and not info.get("regional") \
            and not info.get("whitening"):
        return float(info["p"])
    return 1.0
