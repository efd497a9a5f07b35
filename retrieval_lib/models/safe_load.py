"""Reading a released checkpoint without letting it run code.

Every file goes through ``torch.load(weights_only=True)``; besides tensors and plain
containers only numpy's array/dtype/scalar rebuilders are allowed, and three record classes
the dirtorch files may name (scikit-learn's ``PCA``, dirtorch's ``Watch`` / ``AverageMeter``),
which are replaced by an inert record that only stores its attributes. Anything else (a
function call, another class) is refused with
:class:`~retrieval_lib.errors.UnsafeCheckpointError` before it runs. Used by
:func:`retrieval_lib.models.released.load_network`.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from retrieval_lib.errors import MissingDataError, UnsafeCheckpointError
from retrieval_lib.models.registry import released_networks

__all__ = ["safe_load", "PCARecord"]


class _InertRecord:
    """Stands in for a class a checkpoint names (scikit-learn's PCA, dirtorch's meters): it only
    stores the pickled attributes, so loading runs none of that class's code."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state of type {type(state).__name__} for a record")
        self.__dict__.update(state)


class PCARecord(_InertRecord):
    """The attributes of a pickled ``sklearn.decomposition.PCA`` (``mean_``, ``components_``,
    ``explained_variance_``, ``whiten``...), without scikit-learn."""


class _MeterRecord(_InertRecord):
    """dirtorch's ``utils.watcher`` objects, which some of its checkpoints pickle."""


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    out = [np.ndarray, np.dtype, (np.dtype, "numpy.dtype")]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(core.multiarray._reconstruct, f"{mod}._reconstruct"), (core.multiarray.scalar, f"{mod}.scalar")]
    for t in (np.float64, np.float32, np.int64, np.int32, np.bool_):  # numpy >= 1.25 pickles dtypes by class
        out.append((type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}"))
    return out


def _record_globals() -> list:
    return [(PCARecord, "sklearn.decomposition.pca.PCA"), (PCARecord, "sklearn.decomposition._pca.PCA"),
            (_MeterRecord, "utils.watcher.AverageMeter"), (_MeterRecord, "utils.watcher.Watch"),
            (_MeterRecord, "dirtorch.utils.watcher.AverageMeter"), (_MeterRecord, "dirtorch.utils.watcher.Watch")]


def safe_load(path) -> dict:
    """Read a checkpoint without letting it run code; return what it holds (on the CPU).

    ``torch.load(path, map_location="cpu", weights_only=True)`` with only these globals allowed
    besides PyTorch's tensor rebuilders: numpy's ``_reconstruct``, ``ndarray``, ``dtype`` and
    ``scalar`` (cirtorch's ``meta['Lw']`` holds numpy arrays) and inert records for the
    classes dirtorch's files name (``PCARecord`` for scikit-learn's ``PCA``).

    Raises:
        MissingDataError: no such file.
        UnsafeCheckpointError: the file names any other global (e.g. ``os.system``) or is not a
            PyTorch checkpoint at all; nothing in it was executed.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"no checkpoint at {path}; pass a released network's name "
                               f"(one of {sorted(released_networks())}) or the path of a file")
    try:
        with torch.serialization.safe_globals(_numpy_globals() + _record_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        glob = re.search(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)", str(err))
        what = f"it names {glob.group(1)}, which is not allowed" if glob else first
        raise UnsafeCheckpointError(
            f"refusing to load {path}: {what}. Checkpoints are read with torch.load(weights_only=True) and "
            "may hold only tensors, numbers, strings, containers and numpy arrays; nothing in the file was "
            "run. Get the file again from its authors (retrieval_lib.released_networks() lists the URLs)") from None
