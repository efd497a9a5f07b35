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

**A dry run of a scale's code path** (:data:`MAX_SIZE_ENV`): with ``RETRIEVAL_MAX_SIZE=N`` in the
environment every image size of a scale above ``N`` px is scaled down by ``N / image_size`` -- the
scale's own size (:func:`scale_config`), a notebook's size lists (:func:`capped_sizes`: 02's
``IMAGE_SIZES``, 06's ``SIZES``) and the end-to-end training recipes (:func:`dry_run_recipe`, which
also cuts them to one epoch of a few tuples). Run by ``python -m retrieval_lib reproduce``, every
notebook also gets :data:`DRY_RUN_SETTINGS_CELL` after its parameters: each per-scale setting (a dict
keyed ``smoke``/``cpu``/``full``: epochs, tuples, views, images, ...) takes its ``smoke`` value at the
scale that runs, while every ``if S == "full"`` branch stays the scale's own. ``RETRIEVAL_MAX_SIZE=64
python -m retrieval_lib reproduce --scale full ...`` so runs every ``full`` code path on a CPU in minutes
(``tests/test_fullscale.py``); the numbers of such a run mean nothing, and :meth:`ScaleConfig.summary`
says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from retrieval_lib.data.datasets import REVISITED, RevisitedDataset, default_benchmark
from retrieval_lib.errors import MissingDataError

__all__ = ["ScaleConfig", "SCALES", "scale_config", "default_scale", "default_progress", "benchmark_for_scale",
           "MAX_SIZE_ENV", "max_size", "capped_sizes", "dry_run_recipe", "DRY_RUN_SETTINGS_CELL"]

MAX_SIZE_ENV = "RETRIEVAL_MAX_SIZE"
"""The environment variable of a dry run: every image size of a scale capped at this many pixels."""


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
    capped_from: int | None = None  # a dry run (RETRIEVAL_MAX_SIZE): the scale's own image size

    def summary(self) -> str:
        """One line saying what runs: backbone, input size, scales, data, image cap."""
        scales = "one input scale" if self.scales == (1.0,) else \
            "input scales " + ", ".join(f"{s:.3g}" for s in self.scales)
        data = "the default benchmark (real171 or the offline default)" if self.data == "default" else self.data
        cap = f", at most {self.max_images} database images" if self.max_images is not None else ""
        dry = (f" (a dry run: {MAX_SIZE_ENV} caps the scale's {self.capped_from} px; its numbers mean nothing)"
               if self.capped_from is not None else "")
        return (f"{self.name}: {self.backbone} (ImageNet weights, off the shelf), longer side "
                f"{self.image_size} px{dry}, {scales}, on {data}{cap}")


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
    cfg, cap = SCALES[name], max_size()
    if cap is not None and cap < cfg.image_size:
        cfg = replace(cfg, image_size=cap, capped_from=cfg.image_size)
    return replace(cfg, **overrides) if overrides else cfg


def max_size() -> int | None:
    """The dry run's cap on image sizes, from ``RETRIEVAL_MAX_SIZE`` (``None``: unset, no cap)."""
    value = os.environ.get(MAX_SIZE_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 32:
        raise ValueError(f"{MAX_SIZE_ENV}={value!r} is not understood; set it to a size in pixels of at "
                         "least 32 (a dry run at that size), or unset it")
    return int(value)


def _shrink(size: int, factor: float) -> int:
    return max(32, int(round(size * factor)))


def capped_sizes(sizes, scale=None) -> list:
    """A notebook's list of image sizes at ``scale``, as is -- or, in a dry run (``RETRIEVAL_MAX_SIZE``
    below the scale's size), each size scaled by the cap over the scale's own size (at least 32 px,
    repeats dropped), so the list keeps its shape: ``[512, 768, 1024]`` at ``full`` with a cap of 64
    gives ``[32, 48, 64]``."""
    cfg = scale_config(scale)
    if cfg.capped_from is None:
        return list(sizes)
    factor = cfg.image_size / cfg.capped_from
    out = []
    for s in sizes:
        if _shrink(s, factor) not in out:
            out.append(_shrink(s, factor))
    return out


_RECIPE_SIZES = ("image_size", "train_size", "crop", "test_size")
_RECIPE_CUTS = {"epochs": 1, "n_queries": 4, "pool_size": 16, "batch_size": 2, "P": 4}


def dry_run_recipe(recipe: dict, scale="full") -> dict:
    """Overrides of an end-to-end training recipe (``RECIPES["gem"]``, ``CGD_RECIPE``) for a dry run:
    ``{}`` normally; with ``RETRIEVAL_MAX_SIZE`` below ``scale``'s size, its image sizes scaled as in
    :func:`capped_sizes` and its length cut to one epoch of a few tuples (``epochs``, ``n_queries``,
    ``pool_size``, ``batch_size``, CGD's classes per batch ``P``, where the recipe has them)."""
    cfg = scale_config(scale)
    if cfg.capped_from is None:
        return {}
    factor = cfg.image_size / cfg.capped_from
    out = {k: _shrink(recipe[k], factor) for k in _RECIPE_SIZES if k in recipe}
    out.update({k: min(v, recipe[k]) for k, v in _RECIPE_CUTS.items() if k in recipe})
    return out


DRY_RUN_SETTINGS_CELL = """\
# A dry run (RETRIEVAL_MAX_SIZE is set): `reproduce` added this cell. Every per-scale setting above takes its
# "smoke" value at this scale, so the scale's own code path runs with smoke's epochs, tuples, views and image
# counts (image sizes are capped by the library); the numbers of this run mean nothing.
for _name, _value in list(globals().items()):
    if isinstance(_value, dict) and set(_value) == {"smoke", "cpu", "full"}:
        globals()[_name] = {**_value, SCALE: _value["smoke"]}
        print(f"dry run: {_name}[{SCALE!r}] = {_value['smoke']!r} (smoke's), not {_value[SCALE]!r}")
"""
"""The code cell a dry run adds after a notebook's parameters (:func:`retrieval_lib.book.reproduce.run_notebooks`)."""


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
