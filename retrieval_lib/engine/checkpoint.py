"""Trainer checkpoints: written atomically, read without running code, found newest-first.

A checkpoint is one ``ckpt-<step>.pt`` file (9 digits) holding plain data and tensors:
the model's and optimizer's state, the random generators, the epoch's plan and the run's
:meth:`~retrieval_lib.engine.trainer.Trainer.config`. :func:`~retrieval_lib.files.save_atomic` writes it to
a temporary file in the same folder, fsyncs and renames it, so a file named ``ckpt-*.pt`` is
either complete or absent; :func:`latest_checkpoint` skips a newer file that still cannot be
read (cut short by a full disk, say). Taught in ``notebooks/05_wgem.ipynb``.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from retrieval_lib.files import save_atomic

__all__ = ["CHECKPOINT_FORMAT", "save_atomic", "write_checkpoint", "list_checkpoints", "load_checkpoint",
           "latest_checkpoint", "clear_unfinished", "config_diff", "jsonable"]

CHECKPOINT_FORMAT = "retrieval_lib.trainer/1"
_CKPT = re.compile(r"^ckpt-(\d{9})\.pt$")
_NEEDED = {"format", "step", "epoch", "next_batch", "plan", "model", "optimizer", "config", "history"}


def list_checkpoints(folder) -> list:
    """``(step, path)`` of the checkpoint files in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return sorted(found, reverse=True)


def write_checkpoint(payload: dict, folder, step: int, keep: int) -> Path:
    """Write ``payload`` as ``<folder>/ckpt-<step>.pt`` (atomically) and delete all but the
    ``keep`` newest checkpoints. Returns the new file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{step:09d}.pt"
    save_atomic(payload, path, fsync=True)
    for _, old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def clear_unfinished(folder) -> int:
    """Delete the temporary files a run left when it stopped while writing a checkpoint;
    returns how many there were."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".ckpt-") and p.suffix == ".tmp"]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :class:`~retrieval_lib.engine.trainer.Trainer` (tensors and
    plain data only: no code runs).

    Raises ``ValueError`` when the file is cut short, corrupt, or not a trainer checkpoint.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: never trust it
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it was "
                         "probably cut short while being written") from err
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT or not _NEEDED <= set(obj):
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return obj


def latest_checkpoint(folder) -> Optional[Path]:
    """The newest checkpoint in ``folder`` that reads completely, or ``None``.

    Newer files that cannot be read (cut short while being written, corrupt) are skipped
    with a warning naming them.
    """
    for _, path in list_checkpoints(folder):
        try:
            load_checkpoint(path)
        except ValueError as err:
            warnings.warn(f"skipping a checkpoint: {err}", stacklevel=2)
            continue
        return path
    return None


def config_diff(old, new, prefix: str = "") -> list:
    """Readable differences between two JSON-like values (``"a.b: 1 -> 2"``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += config_diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def jsonable(value):
    """``value`` as JSON would give it back (what a checkpoint's config compares with)."""
    return json.loads(json.dumps(value, default=repr))
