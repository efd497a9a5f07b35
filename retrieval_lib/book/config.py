"""The three scales every expensive step runs at: ``smoke``, ``cpu`` and ``full``.

- ``smoke``: seconds, for the tests; few images, small inputs.
- ``cpu``: minutes on a laptop; the real photos (real171) or the offline default, 512 px.
- ``full``: a GPU / Colab; the papers' setting (ResNet-101, 1024 px, multi-scale,
  revisited Oxford/Paris when their images are present under the data root).

Notebooks read their scale from the ``SCALE`` parameter (default: the environment
variable ``RETRIEVAL_SCALE``, else ``"cpu"``) and look the settings up here, so that one
word changes every notebook and ``python -m retrieval_lib reproduce`` at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

__all__ = ["ScaleConfig", "SCALES", "scale_config", "default_scale"]


@dataclass(frozen=True)
class ScaleConfig:
    """Settings of one scale (see the module docstring)."""

    name: str
    backbone: str
    image_size: int
    max_images: int | None  # None: the whole benchmark
    scales: tuple = (1.0,)
    batch_size: int = 8
    epochs: int = 1  # for notebooks that train a small head
    datasets: tuple = field(default_factory=tuple)  # extra benchmarks at this scale


SCALES = {
    "smoke": ScaleConfig("smoke", "efficientnet_lite0", image_size=224, max_images=40, epochs=1),
    "cpu": ScaleConfig("cpu", "efficientnet_lite0", image_size=512, max_images=None, epochs=10),
    "full": ScaleConfig("full", "resnet101", image_size=1024, max_images=None,
                        scales=(1.0, 2 ** -0.5, 0.5), batch_size=1, epochs=30,
                        datasets=("roxford5k", "rparis6k")),
}


def default_scale() -> str:
    """``RETRIEVAL_SCALE`` from the environment, else ``"cpu"``."""
    return os.environ.get("RETRIEVAL_SCALE", "cpu")


def scale_config(name: str | None = None, **overrides) -> ScaleConfig:
    """The :class:`ScaleConfig` called ``name`` (default :func:`default_scale`), with overrides."""
    name = default_scale() if name is None else name
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; choose one of {sorted(SCALES)}")
    return replace(SCALES[name], **overrides) if overrides else SCALES[name]
