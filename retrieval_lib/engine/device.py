"""Device choice and seeding for notebooks and scripts (the library itself never moves tensors).

Taught in ``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["get_device", "seed_everything"]


def get_device(device: str | torch.device = "auto") -> torch.device:
    """Return a ``torch.device``; ``"auto"`` picks CUDA, then Apple MPS, then CPU.

    Any other value is passed to ``torch.device`` unchanged, so ``"cpu"``, ``"cuda:1"`` work.
    Asking for CUDA on a machine without it raises a ``RuntimeError`` that says so.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was requested but CUDA is not available here; "
            "use DEVICE='auto' or 'cpu'"
        )
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats."""
    seed = int(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
