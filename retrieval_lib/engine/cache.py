"""The on-disk cache of extraction: one file per (image files, model, image size, scale,
what is stored, numerics), written atomically and rebuilt when stale or corrupt.

Keys come from :mod:`retrieval_lib.engine.fingerprint`; :class:`ExtractionCache` computes the
fingerprints of one extraction call once and names its entries; :func:`load_entry` and
:func:`save_entry` read and write them (through :func:`retrieval_lib.files.save_atomic`).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from retrieval_lib.engine.fingerprint import fingerprint_or_reason, images_fingerprint, module_fingerprint
from retrieval_lib.files import save_atomic

__all__ = ["CACHE_VERSION", "ExtractionCache", "cache_key", "entry_key", "load_entry", "save_entry"]

CACHE_VERSION = 2  # 2: models and poolings keyed on class, settings and weights


def entry_key(images_fp: str, model_fp: str, name: str, image_size: int, scale: float, what: str) -> str:
    """The file name (without ``.pt``) of one entry, from the fingerprints and settings."""
    parts = [f"v{CACHE_VERSION}", what, name, model_fp, f"s{int(image_size)}", f"x{float(scale)!r}", images_fp]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20] + f"_{name}_{int(image_size)}_{what}"


def cache_key(images, model, image_size: int, scale: float, what: str) -> str:
    """Key of a cache entry: (image files, model, image size, scale, what is stored).

    The model enters through :func:`module_fingerprint`: its class, settings and weights,
    not only its name. Raises :class:`Unkeyable` for a model whose state cannot be read.
    """
    name = getattr(model, "name", type(model).__name__)
    return entry_key(images_fingerprint(images), module_fingerprint(model), name, image_size, scale, what)


class ExtractionCache:
    """The cache of one extraction call: fingerprints computed once, entries keyed per scale."""

    def __init__(self, cache_dir, images, model, fn: str, plan: dict):
        self.dir = None if cache_dir is None else Path(cache_dir)
        self.numerics = plan["numerics"]
        if self.dir is None:
            return
        self.model_fp, reason = fingerprint_or_reason(model)
        if self.model_fp is None:
            warnings.warn(f"{fn}: the model is not cached ({reason}); give it plain settings "
                          "(numbers, strings, torch functions) to have its results cached",
                          UserWarning, stacklevel=3)
            self.dir = None
            return
        self.name = getattr(model, "name", type(model).__name__)
        self.images_fp = images_fingerprint(images)

    def key(self, image_size: int, scale: float, what: str) -> str:
        return entry_key(self.images_fp, self.model_fp, self.name, image_size, scale, f"{what}-{self.numerics}")

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"


def load_entry(path: Path, key: str, n: int):
    """Load a cache entry, or None when it is missing, stale or corrupt (it is then rebuilt)."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("key") != key or obj.get("n") != n:
            return None
        return obj["data"]
    except Exception as err:  # corrupt / truncated / foreign file: never trust it
        warnings.warn(f"ignoring unreadable cache file {path} ({err.__class__.__name__}); rebuilding it")
        return None


def save_entry(path: Path, key: str, n: int, data) -> None:
    """Write an entry atomically (a temporary file in the same folder, then a rename)."""
    save_atomic({"key": key, "n": n, "data": data}, path)
