"""Where data lives: the data root (``root`` argument, else ``RETRIEVAL_DATA``) and the cache
of generated data (``RETRIEVAL_CACHE``, default ``~/.cache/retrieval_lib``). See ``data/README.md``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from retrieval_lib.errors import MissingDataError

__all__ = ["data_root", "cache_root", "require_root", "DATA_HINT", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DATA_HINT = ("set the environment variable RETRIEVAL_DATA to the data root (the folder that "
             "holds real171/, roxford5k/, ...; e.g. export RETRIEVAL_DATA=../shared/data) "
             "or pass root=")


def data_root() -> Optional[Path]:
    """The data root from ``RETRIEVAL_DATA`` (``~`` expanded), or ``None`` when it is unset."""
    value = os.environ.get("RETRIEVAL_DATA", "").strip()
    return Path(value).expanduser() if value else None


def cache_root() -> Path:
    """Where generated data goes: ``RETRIEVAL_CACHE``, else ``~/.cache/retrieval_lib``."""
    value = os.environ.get("RETRIEVAL_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "retrieval_lib"


def require_root(root) -> Path:
    """``root`` (``~`` expanded), else the data root; :class:`~retrieval_lib.errors.MissingDataError`
    saying how to set one when neither is given."""
    r = Path(root).expanduser() if root is not None else data_root()
    if r is None:
        raise MissingDataError(f"no data root given; {DATA_HINT}")
    return r
