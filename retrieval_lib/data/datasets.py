"""Benchmarks: one small interface for every image set the book uses.

Every benchmark has the interface of :class:`~retrieval_lib.data.benchmark.Benchmark`
(``database``, ``queries``, ``evaluate(ranks)``, ``ground_truth()``, ``headline_key``, ...):

- :class:`GroupDataset` — photos in groups of the same object or place: your own photos
  (one sub-folder per group, or a ``manifest.json``), :func:`real171` and
  :func:`offline_default`.
- :class:`RevisitedDataset` — Revisited Oxford5k / Paris6k (Radenović et al., CVPR 2018).
- :class:`CUB200` — CUB-200-2011 class-level retrieval (Wah et al., 2011), Recall@K.

Where data lives: the data root is the ``root`` argument, else the environment variable
``RETRIEVAL_DATA`` (:func:`data_root`); generated data goes to ``RETRIEVAL_CACHE``
(default ``~/.cache/retrieval_lib``, :func:`cache_root`). See ``data/README.md``.
Taught in ``notebooks/00_pipeline.ipynb``.

The code lives in one module per family -- ``roots`` (where data lives), ``benchmark`` (the
interface), ``groups`` (group sets, real171), ``offline`` (the offline default), ``revisited``
and ``cub`` -- and every name is importable from here, as it always was.
"""
from retrieval_lib.data.benchmark import Benchmark
from retrieval_lib.data.cub import CUB_MD5, CUB_URL, CUB200, download_cub
from retrieval_lib.data.groups import UKBENCH_SUBSET, GroupDataset, real171
from retrieval_lib.data.offline import OFFLINE_VERSION, default_benchmark, offline_default
from retrieval_lib.data.revisited import (GND_SHA256, GND_URL, IMAGE_URLS, REVISITED, RevisitedDataset,
                                          download_revisited, find_gnd, load_gnd)
from retrieval_lib.data.roots import DATA_HINT, IMAGE_EXTENSIONS, cache_root, data_root

__all__ = [
    "Benchmark", "GroupDataset", "RevisitedDataset", "CUB200",
    "real171", "offline_default", "default_benchmark", "data_root", "cache_root",
    "download_revisited", "download_cub", "load_gnd", "find_gnd",
    "IMAGE_EXTENSIONS", "REVISITED", "GND_SHA256",
    "GND_URL", "IMAGE_URLS", "CUB_URL", "CUB_MD5", "DATA_HINT", "OFFLINE_VERSION", "UKBENCH_SUBSET",
]
