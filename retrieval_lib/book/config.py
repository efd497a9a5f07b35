"""The three scales every expensive step runs at: ``smoke``, ``cpu`` and ``full``.

- ``smoke``: seconds, for the tests; EfficientNet-Lite0 at 224 px, at most 40 images of the
  default benchmark.
- ``cpu``: minutes on a laptop; EfficientNet-Lite0 at 512 px on the default benchmark
  (real171 when the data root holds it, else the offline default).
- ``full``: a GPU / Colab; ResNet-101 with the ImageNet weights that
  :func:`~retrieval_lib.models.backbones.load_backbone` loads for it (off the shelf: no
  fine-tuning), longer side 1024 px, three input scales (1, 1/√2, 1/2), on revisited Oxford
  (``roxford5k``) under the data root. Input size, multi-scale and data follow the papers'
  test protocol; the papers' fine-tuned networks are not used.

Each scale measures ONE benchmark, chosen by :func:`benchmark_for_scale`; the notebooks
(through :func:`~retrieval_lib.book.session.start`) and ``python -m retrieval_lib
reproduce`` both call it, so their numbers are measured on the same data.

Notebooks read their scale from the ``SCALE`` parameter (default: the environment
variable ``RETRIEVAL_SCALE``, else :func:`default_scale`: ``"full"`` with a CUDA GPU,
``"cpu"`` without) and look the settings up here, so that one word changes every notebook
and ``python -m retrieval_lib reproduce`` at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from retrieval_lib.data.datasets import REVISITED, RevisitedDataset, default_benchmark
from retrieval_lib.errors import MissingDataError

__all__ = ["ScaleConfig", "SCALES", "scale_config", "default_scale", "default_progress", "benchmark_for_scale"]


@dataclass(frozen=True)
class ScaleConfig:
    """Settings of one scale (see the module docstring).

    ``data`` names the benchmark this scale measures: ``"default"`` (real171 when the data
    root holds it, else the offline default) or a revisited data set (``"roxford5k"``,
    ``"rparis6k"``).
    """

    name: str
    backbone: str
    image_size: int
    max_images: int | None  # None: the whole benchmark
    scales: tuple = (1.0,)
    batch_size: int = 8
    data: str = "default"

    def summary(self) -> str:
        """One line saying what runs: backbone, input size, scales, data, image cap."""
        scales = "one input scale" if self.scales == (1.0,) else \
            "input scales " + ", ".join(f"{s:.3g}" for s in self.scales)
        data = "the default benchmark (real171 or the offline default)" if self.data == "default" else self.data
        cap = f", at most {self.max_images} database images" if self.max_images is not None else ""
        return (f"{self.name}: {self.backbone} (ImageNet weights, off the shelf), longer side "
                f"{self.image_size} px, {scales}, on {data}{cap}")


SCALES = {
    "smoke": ScaleConfig("smoke", "efficientnet_lite0", image_size=224, max_images=40),
    "cpu": ScaleConfig("cpu", "efficientnet_lite0", image_size=512, max_images=None),
    "full": ScaleConfig("full", "resnet101", image_size=1024, max_images=None,
                        scales=(1.0, 2 ** -0.5, 0.5), batch_size=1, data="roxford5k"),
}


def default_scale() -> str:
    """The scale a notebook runs at when none is given.

    ``RETRIEVAL_SCALE`` from the environment when set (the tests and ``reproduce`` set it),
    else ``"full"`` when PyTorch sees a CUDA GPU (a Colab GPU runtime) and ``"cpu"`` otherwise.
    """
    value = os.environ.get("RETRIEVAL_SCALE", "").strip()
    if value:
        return value
    return "full" if torch.cuda.is_available() else "cpu"


def default_progress() -> bool:
    """Whether long loops show progress bars: ``RETRIEVAL_PROGRESS`` unset or ``1`` = yes, ``0`` = no.

    ``python -m retrieval_lib reproduce`` sets it to ``0`` for the notebooks it executes, so
    the saved notebooks hold no progress widgets (which static viewers show as empty bars).
    """
    value = os.environ.get("RETRIEVAL_PROGRESS", "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"RETRIEVAL_PROGRESS={value!r} is not understood; set it to 0 (no progress bars) "
                     "or 1 (progress bars), or unset it")


def scale_config(name: str | ScaleConfig | None = None, **overrides) -> ScaleConfig:
    """The :class:`ScaleConfig` called ``name`` (default :func:`default_scale`), with overrides.

    ``name`` may also be a :class:`ScaleConfig` (returned as is, or with the overrides)."""
    if isinstance(name, ScaleConfig):
        return replace(name, **overrides) if overrides else name
    name = default_scale() if name is None else name
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; choose one of {sorted(SCALES)}")
    return replace(SCALES[name], **overrides) if overrides else SCALES[name]


def benchmark_for_scale(cfg: ScaleConfig | str | None = None, data_root=None):
    """The one benchmark a scale measures, cut to ``cfg.max_images`` database images.

    ``cfg.data == "default"``: :func:`~retrieval_lib.data.datasets.default_benchmark`
    (real171 under ``data_root``, else ``RETRIEVAL_DATA``, else the offline default).
    A revisited name (``full`` scale: ``roxford5k``): that data set under the data root;
    when its images are absent, ``FileNotFoundError`` says how to download them.
    """
    cfg = scale_config(cfg)
    if cfg.data == "default":
        benchmark = default_benchmark(data_root)
    elif cfg.data in REVISITED:
        try:
            benchmark = RevisitedDataset(cfg.data, root=data_root)
        except FileNotFoundError as err:
            where = f" --data {data_root}" if data_root is not None else " --data DIR"
            raise MissingDataError(
                f"{cfg.name} scale runs on {cfg.data}: {err}. Download it once with "
                f"`python -m retrieval_lib download {cfg.data}{where}` (from Python: "
                f"retrieval_lib.data.datasets.download_revisited({cfg.data!r}, root); about 2 GB), "
                "or run at scale 'cpu'") from err
    else:
        raise ValueError(f"scale {cfg.name!r} names unknown data {cfg.data!r}; use 'default' or one of {REVISITED}")
    if cfg.max_images is not None and len(benchmark.database) > cfg.max_images:
        benchmark = benchmark.subset(cfg.max_images)
    return benchmark
