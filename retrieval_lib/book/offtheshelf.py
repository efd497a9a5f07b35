"""The off-the-shelf table: MAC, SPoC, GeM (p=3) and R-MAC (L=3) of one backbone on the scale's benchmark.

The first job of ``python -m retrieval_lib reproduce`` (written as ``offtheshelf.md`` and
``offtheshelf.json``) and a table of ``notebooks/09_reproductions.ipynb``: the same data the
notebooks measure at that scale (:func:`~retrieval_lib.book.config.benchmark_for_scale`), one
extraction of the backbone's maps pooled four ways, on one process or sharded over a
``torchrun`` group. :func:`table_backbone` also takes a released network's name.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from retrieval_lib.book.config import benchmark_for_scale, scale_config
from retrieval_lib.book.report import OFF_THE_SHELF, markdown_table, measured
from retrieval_lib.engine.device import get_device
from retrieval_lib.engine.distributed import dist_env, extract_sharded, rank_device
from retrieval_lib.engine.extract import extract_descriptors
from retrieval_lib.errors import MissingDataError, UsageError
from retrieval_lib.layers.pooling import GeM, MAC, RMAC, SPoC
from retrieval_lib.models.backbones import BACKBONES, load_backbone
from retrieval_lib.models.released import load_network, released_networks
from retrieval_lib.search.nearest import rank_database

__all__ = ["offtheshelf", "offtheshelf_table", "offtheshelf_measured", "extraction_line", "check_table_backbone",
           "table_backbone", "OFF_THE_SHELF_METHODS"]

OFF_THE_SHELF_METHODS = ("MAC", "SPoC", "GeM (p=3)", "R-MAC (L=3)")


_METHOD = {"MAC": "MAC", "SPoC": "SPoC", "GeM (p=3)": "GeM p=3", "R-MAC (L=3)": "R-MAC L=3"}  # as notebooks write it


def _poolings():
    return {"MAC": MAC(), "SPoC": SPoC(), "GeM (p=3)": GeM(p=3.0, learn_p=False), "R-MAC (L=3)": RMAC(L=3)}


def check_table_backbone(name: str) -> str:
    """``"library"`` or ``"released"``: what ``--backbone name`` names, checked without loading anything."""
    if name in BACKBONES:
        return "library"
    entries = released_networks()
    is_file = str(name).endswith((".pth", ".pt")) or os.sep in str(name)
    if name not in entries and not is_file:
        features = sorted(k for k, e in entries.items() if e.format == "cirtorch-features")
        raise UsageError(f"--backbone {name!r} is neither a library backbone ({', '.join(sorted(BACKBONES))}) nor "
                         f"one of the papers' off-the-shelf networks ({', '.join(features)}) nor a .pth file")
    if name in entries and entries[name].format != "cirtorch-features":
        raise UsageError(f"--backbone {name!r} is a fine-tuned network, not off the shelf; measure it with "
                         f"`reproduce --scale full --network {name}`")
    if is_file and not Path(name).expanduser().is_file():
        raise MissingDataError(f"--backbone {name}: no such file")
    return "released"


def table_backbone(name: str):
    """The backbone of the off-the-shelf table: a library backbone (``BACKBONES``) by name, or the
    papers' off-the-shelf ImageNet weights, a released *features* network (``imagenet-caffe-resnet101``:
    cirtorch's conversion from Caffe, downloaded once and checked) or such a file.

    Raises :class:`~retrieval_lib.errors.UsageError` for a name that is neither, and for a released
    network that was fine-tuned (its table would not be "off the shelf": measure it with ``--network``).
    """
    if check_table_backbone(name) == "library":
        return load_backbone(name)
    entries = released_networks()
    net = load_network(name)
    if net.info["format"] != "cirtorch-features":
        raise UsageError(f"--backbone {name}: a {net.info['format']} network, not an ImageNet features file; "
                         "measure it with --network")
    backbone = net.backbone
    backbone.weights = f"{name} (cirtorch's ImageNet weights converted from Caffe)" if name in entries \
        else backbone.weights
    return backbone


def offtheshelf(scale="cpu", data_root=None, device="auto", cache_dir=None,
                progress: bool = True, benchmark=None, backbone=None) -> dict:
    """Run the off-the-shelf comparison; return ``{"rows": {pooling: metrics}, ...}``.

    ``scale``: a scale name or a :class:`~retrieval_lib.book.config.ScaleConfig`.
    The data is :func:`~retrieval_lib.book.config.benchmark_for_scale` (what ``start``
    gives the notebooks at this scale) unless ``benchmark`` is passed. The backbone runs
    once per image (and scale); every pooling reads the same maps.

    Under ``torchrun`` (an open process group with several processes, see
    :mod:`~retrieval_lib.engine.distributed`) every process extracts its share of the images
    on its own GPU (:func:`~retrieval_lib.engine.distributed.extract_sharded`, shares written
    under ``cache_dir``); process 0 gathers them and returns the result, the others return ``None``.
    """
    cfg = scale_config(scale) if backbone is None else scale_config(scale, backbone=str(backbone))
    env = dist_env()
    sharded = env["world_size"] > 1
    dev = rank_device(env["local_rank"]) if sharded and device == "auto" else get_device(device)
    if benchmark is None:
        benchmark = benchmark_for_scale(cfg, data_root)
    model = table_backbone(cfg.backbone).to(dev).eval()
    t0 = time.perf_counter()
    common = dict(scales=cfg.scales, image_size=cfg.image_size, device=dev, batch_size=cfg.batch_size,
                  cache_dir=cache_dir, progress=progress)
    if sharded:
        shards = Path(cache_dir or Path.cwd()) / "shards"
        X = extract_sharded(model, benchmark.database, _poolings(), out_dir=shards, **common)
        Q = X if benchmark.queries is None else extract_sharded(model, benchmark.queries, _poolings(),
                                                               out_dir=shards, **common)
        if env["rank"] != 0:
            return None
        # the shares may have come from each process's cache: the count of forwards is not known here
        info = {"skipped": [], "extracted": None,
                "images_per_s": len(benchmark.database) / (time.perf_counter() - t0)}
    else:
        X, info = extract_descriptors(model, benchmark.database, _poolings(), return_info=True, **common)
        Q = X if benchmark.queries is None else extract_descriptors(model, benchmark.queries, _poolings(), **common)
    rows = {}
    for name in OFF_THE_SHELF_METHODS:
        ranks = rank_database(Q[name], X[name])
        rows[name] = benchmark.evaluate(ranks)
    return {
        "benchmark": benchmark.name,
        "n_database": len(benchmark.database),
        "n_queries": len(benchmark.queries) if benchmark.queries is not None else len(benchmark.database),
        "setting": cfg.summary(),
        "backbone": cfg.backbone,
        "weights": getattr(model, "weights", None),  # the weight set loaded, when the backbone names it
        "image_size": cfg.image_size,
        "scales": list(cfg.scales),
        "device": str(dev) if not sharded else f"{env['world_size']} processes ({dev.type})",
        "skipped_images": list(info["skipped"]),
        "extraction_images_per_s": info["images_per_s"],  # None: every descriptor came from the cache
        "extracted_images": info["extracted"],
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


def offtheshelf_table(result: dict) -> str:
    """Markdown: one row per pooling, one column per metric (mAP first)."""
    keys: list = []
    for metrics in result["rows"].values():
        for k in metrics:
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: (not k.startswith("mAP"), k != "mAP", k))
    rows = [[name] + [metrics.get(k) for k in keys] for name, metrics in result["rows"].items()]
    head = (f"Off-the-shelf descriptors on **{result['benchmark']}** "
            f"({result['n_queries']} queries, {result['n_database']} database images), "
            f"{result['backbone']} (ImageNet weights{' ' + result['weights'] if result.get('weights') else ''}, "
            f"off the shelf) at {result['image_size']} px, scales {result['scales']}, device {result['device']}.")
    return head + "\n\n" + markdown_table(["pooling"] + keys, rows)


def extraction_line(result: dict) -> str:
    """What the extraction of an off-the-shelf run did, in words: a throughput only when measured."""
    n, speed = result.get("extracted_images"), result.get("extraction_images_per_s")
    if n == 0 or speed is None:
        return f"descriptors from the cache ({n or 0} images extracted)"
    return f"extraction: {speed:.1f} images/s" + (f" ({n} image forwards)" if n else "")


def offtheshelf_measured(result: dict) -> list[dict]:
    """The off-the-shelf table as :func:`~retrieval_lib.book.report.measured` entries.

    One entry per pooling and headline metric (``mAP``; ``mAP/easy|medium|hard`` as
    ``"mAP medium"`` ...; ``R@K``), with the run's data set, backbone and resolution
    (``"1024 px, 3 scales"`` when several input scales were averaged), marked ``from: "offtheshelf"``.
    """
    scales = result.get("scales") or [1.0]
    resolution = f"{result['image_size']} px" + (f", {len(scales)} scales" if len(scales) > 1 else "")
    out = []
    for name, metrics in result["rows"].items():
        for key, value in metrics.items():
            m = re.fullmatch(r"(mAP|R@\d+)(?:/(easy|medium|hard))?", key)
            if m is None or value is None:
                continue
            protocol = m.group(1) + (f" {m.group(2)}" if m.group(2) else "")
            entry = measured(value, dataset=result["benchmark"], protocol=protocol, method=_METHOD.get(name, name),
                             training=OFF_THE_SHELF, backbone=result["backbone"], resolution=resolution,
                             key=f"{name}/{key}")
            entry["from"] = "offtheshelf"
            out.append(entry)
    return out
