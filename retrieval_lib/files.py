"""Writing files safely: one home for the library's atomic writes and built-once folders.

* :func:`write_atomic` / :func:`save_atomic` -- a file is written to a temporary name in its
  folder and renamed over ``path``, so ``path`` is either the old file, the new one or absent,
  never half written (a run killed mid-write, a full disk). Used by extraction's cache, the
  checkpoints, the distributed shares and real171's record.
* :func:`build_once` -- a folder of generated files (the offline default, training views,
  composites) is built under a temporary name and renamed into place once complete; a
  concurrent build that wins the rename is kept.
* :func:`files_fingerprint` -- a short name for a set of input files as they are now and the
  settings they are built with, so a changed file or setting gives another folder.

A ground-floor module: it imports nothing from the library.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

__all__ = ["write_atomic", "save_atomic", "build_once", "files_fingerprint"]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, write: Callable[[BinaryIO], None], fsync: bool = False) -> Path:
    """``write(f)`` into a temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    With ``fsync`` the file and the rename are flushed to disk first (checkpoints: a power cut
    leaves the previous one). The temporary file is removed whatever happens. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_atomic(obj, path, fsync: bool = False) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`write_atomic`."""
    return write_atomic(path, lambda f: torch.save(obj, f), fsync=fsync)


def files_fingerprint(paths, params: dict) -> str:
    """16 hex digits naming ``params`` (JSON) and the files ``paths`` as they are now (path,
    size, modification time): a changed file or setting gives another name."""
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_once(final: Path, index_name: str, build: Callable[[Path], dict], prefix: str = ".build-",
               indent=None) -> Path:
    """Make the folder ``final`` once: ``build(tmp)`` writes its files into a temporary folder
    beside it and returns the index (JSON-able), written as ``index_name`` (``json.dumps`` with
    ``indent``); the folder is then renamed to ``final``. A folder without its index (an
    interrupted build) is rebuilt; when a concurrent build wins the rename, its folder is kept.
    Returns the index file's path."""
    final = Path(final)
    index = final / index_name
    if index.is_file():
        return index
    if final.exists():
        shutil.rmtree(final)  # no index: an incomplete folder
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        (tmp / index_name).write_text(json.dumps(build(tmp), indent=indent))
        try:
            os.rename(tmp, final)
        except OSError:
            if not index.is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index
