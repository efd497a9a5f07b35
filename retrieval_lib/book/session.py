"""What every notebook does first, in one call: scale, device, seed, data, backbone.

    book = start(SCALE, DATA_ROOT, DEVICE, SEED)
    fmaps = book.fmaps()                  # backbone feature maps of the database, cached
    X = book.descriptors("gem")           # (N, D) L2-normalised
    book.evaluate(X)                      # {"mAP": ..., "mAP/<subset>": ..., ...}

At ``smoke`` and ``cpu`` scale the database's feature maps are computed once (and cached
on disk under ``RETRIEVAL_CACHE``), so trying ten poolings costs one backbone pass. At
``full`` scale (revisited Oxford/Paris at 1024 px, multi-scale) maps are not kept; each
pooling extracts its descriptors directly.

Taught in ``notebooks/00_pipeline.ipynb``; used by every notebook.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from retrieval_lib.book.config import ScaleConfig, benchmark_for_scale, default_progress, scale_config
from retrieval_lib.engine.device import get_device, seed_everything

__all__ = ["Book", "start"]


@dataclass
class Book:
    """The state a notebook works with (see the module docstring)."""

    cfg: ScaleConfig
    device: torch.device
    benchmark: object
    model: torch.nn.Module
    cache_dir: Path
    progress: bool = True
    _fmaps: dict = field(default_factory=dict, repr=False)

    @property
    def data_name(self) -> str:
        return self.benchmark.name

    @property
    def keeps_fmaps(self) -> bool:
        """Whether feature maps are kept in memory (not at ``full`` scale)."""
        return self.cfg.name != "full"

    def fmaps(self, which: str = "database", image_size: int | None = None, scale: float = 1.0) -> list:
        """Feature maps ``(C, h, w)`` of the database (or ``"queries"``) images, cached."""
        from retrieval_lib.engine.extract import extract_fmaps

        images = self._images(which)
        size = image_size or self.cfg.image_size
        key = (which, size, scale)
        if key not in self._fmaps:
            self._fmaps[key] = extract_fmaps(self.model, images, image_size=size, scale=scale, device=self.device,
                                             batch_size=self.cfg.batch_size, cache_dir=self.cache_dir,
                                             progress=self.progress)
        return self._fmaps[key]

    def _images(self, which: str):
        if which == "database":
            return self.benchmark.database
        if which == "queries":
            return self.benchmark.queries if self.benchmark.queries is not None else self.benchmark.database
        raise ValueError(f"which must be 'database' or 'queries', got {which!r}")

    def descriptors(self, pooling, which: str = "database", image_size: int | None = None,
                    scales=None) -> torch.Tensor:
        """L2-normalised descriptors ``(N, D)`` for a pooling (name, module or function)."""
        from retrieval_lib.engine.extract import extract_descriptors, pool_fmaps

        scales = tuple(scales) if scales is not None else self.cfg.scales
        if self.keeps_fmaps and scales == (1.0,):
            return pool_fmaps(self.fmaps(which, image_size), pooling)
        return extract_descriptors(self.model, self._images(which), pooling, scales=scales,
                                   image_size=image_size or self.cfg.image_size, device=self.device,
                                   batch_size=self.cfg.batch_size, cache_dir=self.cache_dir,
                                   progress=self.progress)

    def query_descriptors(self, pooling, **kw) -> torch.Tensor:
        """Descriptors of the queries (the database itself for group sets)."""
        if self.benchmark.queries is None:
            return self.descriptors(pooling, "database", **kw)
        return self.descriptors(pooling, "queries", **kw)

    def rank(self, X: torch.Tensor, Q: torch.Tensor | None = None):
        """``ranks`` (n_queries, n_db): database indices best first (Q defaults to X)."""
        from retrieval_lib.search.nearest import rank_database

        return rank_database(X if Q is None else Q, X)

    def evaluate(self, X: torch.Tensor, Q: torch.Tensor | None = None) -> dict:
        """The benchmark's metrics for database descriptors X (and queries Q)."""
        if Q is None and self.benchmark.queries is not None:
            raise ValueError("this benchmark has separate queries: pass Q (book.query_descriptors(...))")
        return self.benchmark.evaluate(self.rank(X, Q))

    def image(self, i: int, which: str = "database", image_size: int | None = None):
        """Image i as the network sees it (longer side resized to the input size), PIL RGB."""
        from retrieval_lib.engine.extract import resize_longer_side

        return resize_longer_side(self._images(which)[i], image_size or self.cfg.image_size)


def start(scale: str | None = None, data_root=None, device="auto", seed: int = 0, benchmark=None,
          progress: bool | None = None) -> Book:
    """Set up a notebook: seed, device, the scale's data and backbone.

    Data: :func:`~retrieval_lib.book.config.benchmark_for_scale`, the same choice
    ``python -m retrieval_lib reproduce`` makes: at ``smoke``/``cpu`` the default benchmark
    (real171 when ``data_root`` or ``RETRIEVAL_DATA`` has it, else the offline default), cut
    to ``cfg.max_images`` at smoke scale; at ``full``, revisited Oxford (``roxford5k``) under
    the data root, with a clear error naming
    :func:`~retrieval_lib.data.datasets.download_revisited` when it is absent.
    ``progress``: progress bars in long loops; ``None`` reads ``RETRIEVAL_PROGRESS``
    (:func:`~retrieval_lib.book.config.default_progress`: unset = on, ``0`` = off).
    """
    from retrieval_lib.models.backbones import load_backbone
    from retrieval_lib.data.datasets import cache_root

    cfg = scale_config(scale)
    progress = default_progress() if progress is None else bool(progress)
    seed_everything(seed)
    dev = get_device(device)
    if benchmark is None:
        benchmark = benchmark_for_scale(cfg, data_root)
    elif cfg.max_images is not None and len(benchmark.database) > cfg.max_images:
        benchmark = benchmark.subset(cfg.max_images)
    model = load_backbone(cfg.backbone).to(dev).eval()
    return Book(cfg=cfg, device=dev, benchmark=benchmark, model=model,
                cache_dir=cache_root() / "features", progress=progress)
