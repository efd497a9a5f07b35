"""What every notebook does first, in one call: scale, device, seed, data, backbone.

    book = start(SCALE, DATA_ROOT, DEVICE, SEED)
    fmaps = book.fmaps()                  # backbone feature maps of the database, cached
    X = book.describe("gem")              # (N, D) L2-normalised database descriptors
    Q = book.describe("gem", "queries")   # the queries' (None when the queries are the database)
    book.evaluate(X, Q)                   # {"mAP": ..., "mAP/<subset>": ..., ...}

At ``smoke`` and ``cpu`` scale the database's feature maps are computed once (and cached
on disk under ``RETRIEVAL_CACHE``), so trying ten poolings costs one backbone pass. At
``full`` scale (revisited Oxford/Paris at 1024 px, multi-scale) maps are not kept; each
pooling extracts its descriptors directly.

Taught in ``notebooks/00_pipeline.ipynb``; used by every notebook.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from retrieval_lib.book.config import ScaleConfig, benchmark_for_scale, default_progress, scale_config
from retrieval_lib.data.datasets import cache_root
from retrieval_lib.data.images import ImageList, resize_longer_side
from retrieval_lib.engine.allocator import tune_allocator
from retrieval_lib.engine.device import get_device, seed_everything
from retrieval_lib.engine.extract import extract_descriptors, extract_fmaps, pool_fmaps
from retrieval_lib.models.backbones import load_backbone
from retrieval_lib.models.released import load_network
from retrieval_lib.search.nearest import rank_database

__all__ = ["Book", "start"]


@dataclass
class Book:
    """A notebook's session: settings, device, benchmark, backbone and the maps computed so far.

    Made by :func:`start`; every notebook calls it ``book``. ``which`` is ``"database"`` or
    ``"queries"`` throughout.

    * images: :meth:`images`, :meth:`image`;
    * feature maps ``(C, h, w)``: :meth:`fmaps` (all, or some by ``indices``), :meth:`fmap` (one);
    * descriptors ``(N, D)``: :meth:`describe` (one pooling, or a dict of poolings in one pass);
    * search and scores: :meth:`rank`, :meth:`evaluate`; what is right for a query is the
      benchmark's (``book.benchmark.relevance(q, i)``, ``.top_results``, ``.headline_key``).

    Self-queries: when every database image is a query (group sets and CUB,
    ``benchmark.queries is None``) the queries *are* the database images.
    ``images("queries")``, ``fmaps("queries")`` and ``image(i, "queries")`` give the
    database's, and ``describe(..., "queries")`` gives ``None``: ``Q=None`` is what
    :meth:`rank`, :meth:`evaluate` and :func:`retrieval_lib.search.rerank.expand` take to mean
    "rank every image against the database, itself included and then ignored as junk".
    So ``X = book.describe(p); Q = book.describe(p, "queries"); book.evaluate(X, Q)``
    works on every benchmark.

    The name: the session is the reader's handle on the book (``book = start(...)`` in
    every notebook), so it keeps the name ``Book``; its module says what it is.
    """

    cfg: ScaleConfig
    device: torch.device
    benchmark: object
    model: torch.nn.Module
    cache_dir: Path
    progress: bool = True
    network: object = None  # the released network when start(network=...) loaded one; model is its backbone
    _fmaps: dict = field(default_factory=dict, repr=False)

    @property
    def data_name(self) -> str:
        return self.benchmark.name

    @property
    def keeps_fmaps(self) -> bool:
        """Whether the maps of every image are kept in memory and re-pooled (not at ``full`` scale)."""
        return self.cfg.name != "full"

    # -- images
    def _which(self, which: str) -> str:
        """``which``, with ``"queries"`` read as ``"database"`` when the queries are the database."""
        if which not in ("database", "queries"):
            raise ValueError(f"which must be 'database' or 'queries', got {which!r}")
        return "database" if self.benchmark.queries is None else which

    def images(self, which: str = "database"):
        """The :class:`~retrieval_lib.data.images.ImageList` of the database or of the queries.

        The queries of a benchmark whose queries are its database images are the database.
        """
        which = self._which(which)
        return self.benchmark.database if which == "database" else self.benchmark.queries

    def image(self, i: int, which: str = "database", image_size: int | None = None):
        """Image i as the network sees it (longer side resized to the input size), PIL RGB."""
        return resize_longer_side(self.images(which)[i], image_size or self.cfg.image_size)

    # -- feature maps
    def fmaps(self, which: str = "database", image_size: int | None = None, scale: float = 1.0,
              indices=None) -> list:
        """Backbone feature maps ``(C, h, w)`` (float32, CPU) of the database or query images.

        Without ``indices``: the maps of every image, computed once (and cached on disk
        under ``cache_dir``), then kept. With ``indices``: the maps of those images, in
        that order; taken from the kept maps when the session keeps them (``smoke``/``cpu``)
        or already has them, else only those images go through the backbone (``full``
        scale, where the maps of thousands of 1024 px images are not kept). Raises
        ``IndexError`` for an index outside the image list.
        """
        which = self._which(which)
        images = self.images(which)
        size = int(image_size or self.cfg.image_size)
        key = (which, size, float(scale))
        if indices is None:
            if key not in self._fmaps:
                self._fmaps[key] = extract_fmaps(self.model, images, image_size=size, scale=scale,
                                                 device=self.device, batch_size=self.cfg.batch_size,
                                                 cache_dir=self.cache_dir, progress=self.progress)
            return self._fmaps[key]
        idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        bad = [i for i in idx if not 0 <= i < len(images)]
        if bad:
            raise IndexError(f"fmaps: indices {bad} are outside the {len(images)} {which} images (0..{len(images) - 1})")
        if self.keeps_fmaps or key in self._fmaps:
            maps = self.fmaps(which, size, scale)
            return [maps[i] for i in idx]
        sub = ImageList([images.paths[i] for i in idx],
                        boxes=None if images.boxes is None else [images.boxes[i] for i in idx],
                        min_size=images.min_size, max_aspect=images.max_aspect, on_error=images.on_error)
        return extract_fmaps(self.model, sub, image_size=size, scale=scale, device=self.device,
                             batch_size=1, progress=False)

    def fmap(self, i: int, which: str = "database", image_size: int | None = None) -> torch.Tensor:
        """The feature map ``(C, h, w)`` of image ``i``, at any scale (see :meth:`fmaps`)."""
        return self.fmaps(which, image_size, indices=[i])[0]

    # -- descriptors
    def describe(self, poolings, which: str = "database", image_size: int | None = None, scales=None):
        """L2-normalised descriptors ``(N, D)`` of the database or query images.

        ``poolings`` is one pooling (a name such as ``"gem"``, a module or a function
        ``(B, C, H, W) -> (B, D)``), giving one tensor, or a dict ``{label: pooling}``,
        giving ``{label: (N, D)}`` from a single backbone pass. At ``smoke``/``cpu`` scale
        with one scale (``scales`` default: the scale's own) every pooling re-pools the
        kept maps; otherwise the backbone runs once per scale for all the poolings
        (multi-scale as in :func:`~retrieval_lib.engine.extract.extract_descriptors`).

        ``which="queries"`` on a benchmark whose queries are its database images gives
        ``None`` (``{label: None}`` for a dict): pass it on as ``Q``. Taught in
        ``notebooks/00_pipeline.ipynb``.
        """
        single = not isinstance(poolings, Mapping)
        pools = {"_": poolings} if single else dict(poolings)
        if not pools:
            raise ValueError("describe: the dict of poolings is empty; give {label: pooling}, e.g. {'mac': 'mac'}")
        if self._which(which) != which:  # the queries are the database images
            return None if single else {label: None for label in pools}
        scales = tuple(float(s) for s in scales) if scales is not None else tuple(self.cfg.scales)
        if self.keeps_fmaps and scales == (1.0,):
            maps = self.fmaps(which, image_size)
            out = {label: pool_fmaps(maps, pool) for label, pool in pools.items()}
        else:
            out = extract_descriptors(self.model, self.images(which), pools, scales=scales,
                                      image_size=image_size or self.cfg.image_size, device=self.device,
                                      batch_size=self.cfg.batch_size, cache_dir=self.cache_dir,
                                      progress=self.progress)
        return out["_"] if single else out

    # -- search and scores
    def rank(self, X: torch.Tensor, Q: torch.Tensor | None = None):
        """``ranks`` (n_queries, n_db): database indices best first; ``Q=None``: the queries are X."""
        return rank_database(X if Q is None else Q, X)

    def evaluate(self, X: torch.Tensor, Q: torch.Tensor | None = None) -> dict:
        """The benchmark's metrics for database descriptors X and query descriptors Q.

        ``Q=None`` when every database image is a query (``describe(..., "queries")``
        gives ``None`` then); the metric to lead with is ``benchmark.headline_key``.
        """
        if Q is None and self.benchmark.queries is not None:
            raise ValueError(f"{self.benchmark.name} has {len(self.benchmark.queries)} separate queries: pass "
                             "their descriptors, Q = book.describe(pooling, 'queries')")
        return self.benchmark.evaluate(self.rank(X, Q))


def start(scale: str | None = None, data_root=None, device="auto", seed: int = 0, benchmark=None,
          progress: bool | None = None, network=None) -> Book:
    """Set up a notebook: seed, device, the scale's data and backbone.

    Data: :func:`~retrieval_lib.book.config.benchmark_for_scale`, the same choice
    ``python -m retrieval_lib reproduce`` makes: at ``smoke``/``cpu`` the default benchmark
    (real171 when ``data_root`` or ``RETRIEVAL_DATA`` has it, else the offline default), cut
    to ``cfg.max_images`` at smoke scale; at ``full``, revisited Oxford (``roxford5k``) under
    the data root, with a clear error naming
    :func:`~retrieval_lib.data.datasets.download_revisited` when it is absent.
    ``progress``: progress bars in long loops; ``None`` reads ``RETRIEVAL_PROGRESS``
    (:func:`~retrieval_lib.book.config.default_progress`: unset = on, ``0`` = off).
    ``network``: a released network's name or checkpoint file
    (:func:`~retrieval_lib.models.released.load_network`); the book's backbone is then that
    network's fine-tuned backbone (with its own mean/std) and ``book.network`` the whole network.
    """
    tune_allocator()  # once per process (a faster CPU forward); RETRIEVAL_ALLOCATOR=system keeps glibc's malloc
    cfg = scale_config(scale)
    progress = default_progress() if progress is None else bool(progress)
    seed_everything(seed)
    dev = get_device(device)
    if benchmark is None:
        benchmark = benchmark_for_scale(cfg, data_root)
    elif cfg.max_images is not None and len(benchmark.database) > cfg.max_images:
        benchmark = benchmark.subset(cfg.max_images)
    net = load_network(network, progress=progress).to(dev).eval() if network is not None else None
    model = net.backbone if net is not None else load_backbone(cfg.backbone).to(dev).eval()
    return Book(cfg=cfg, device=dev, benchmark=benchmark, model=model,
                cache_dir=cache_root() / "features", progress=progress, network=net)
