"""The main job: ``python -m retrieval_lib reproduce``.

1. The off-the-shelf comparison of MAC, SPoC, GeM (p=3) and R-MAC (L=3) on the
   available data (real171 when ``RETRIEVAL_DATA`` finds it, else the offline default),
   written as ``offtheshelf.md`` and ``offtheshelf.json``.
2. Every notebook ``notebooks/NN_*.ipynb`` executed in order with papermill at the same
   scale, the executed copies saved, and every ``metrics.json`` gathered into
   ``results.md`` / ``results.json`` with the papers' numbers beside ours.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from retrieval_lib.book.config import scale_config
from retrieval_lib.book.report import markdown_table, read_metrics, results_table

__all__ = ["offtheshelf", "offtheshelf_table", "run_notebooks", "find_notebooks", "OFF_THE_SHELF"]

OFF_THE_SHELF = ("MAC", "SPoC", "GeM (p=3)", "R-MAC (L=3)")
CELL_TIMEOUT_S = {"smoke": 300, "cpu": 1800, "full": 4 * 3600}


def _poolings():
    from retrieval_lib.layers.pooling import GeM, MAC, RMAC, SPoC

    return {"MAC": MAC(), "SPoC": SPoC(), "GeM (p=3)": GeM(p=3.0, learn_p=False), "R-MAC (L=3)": RMAC(L=3)}


def offtheshelf(scale: str = "cpu", data_root=None, device="auto", cache_dir=None,
                progress: bool = True, benchmark=None) -> dict:
    """Run the off-the-shelf comparison; return ``{"rows": {pooling: metrics}, ...}``.

    The backbone runs once per image (and scale); every pooling reads the same maps.
    """
    from retrieval_lib.models.backbones import load_backbone
    from retrieval_lib.data.datasets import default_benchmark
    from retrieval_lib.engine.device import get_device
    from retrieval_lib.search.nearest import rank_database

    cfg = scale_config(scale)
    dev = get_device(device)
    if benchmark is None:
        benchmark = default_benchmark(data_root)
        if cfg.max_images is not None:
            benchmark = benchmark.subset(cfg.max_images)
    model = load_backbone(cfg.backbone).to(dev).eval()
    t0 = time.perf_counter()
    common = dict(scales=cfg.scales, image_size=cfg.image_size, device=dev, batch_size=cfg.batch_size,
                  cache_dir=cache_dir, progress=progress)
    from retrieval_lib.engine.extract import extract_descriptors

    X, info = extract_descriptors(model, benchmark.database, _poolings(), return_info=True, **common)
    Q = X if benchmark.queries is None else extract_descriptors(model, benchmark.queries, _poolings(), **common)
    rows = {}
    for name in OFF_THE_SHELF:
        ranks = rank_database(Q[name], X[name])
        rows[name] = benchmark.evaluate(ranks)
    return {
        "benchmark": benchmark.name,
        "n_database": len(benchmark.database),
        "n_queries": len(benchmark.queries) if benchmark.queries is not None else len(benchmark.database),
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "scales": list(cfg.scales),
        "device": str(dev),
        "skipped_images": list(info["skipped"]),
        "extraction_images_per_s": info["images_per_s"],
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
            f"{result['backbone']} at {result['image_size']} px, scales {result['scales']}, "
            f"device {result['device']}.")
    return head + "\n\n" + markdown_table(["pooling"] + keys, rows)


def find_notebooks(notebooks_dir=None, only=None) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` in order (optionally only those whose NN is listed)."""
    nb_dir = Path(notebooks_dir) if notebooks_dir else Path(__file__).resolve().parents[1] / "notebooks"
    if not nb_dir.is_dir():
        raise FileNotFoundError(f"no notebooks folder at {nb_dir}; pass --notebooks DIR")
    found = sorted(p for p in nb_dir.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if p.name[:2] in set(only)]
    return found


def run_notebooks(scale: str, out_dir, notebooks_dir=None, only=None, data_root=None,
                  progress: bool = True) -> list[dict]:
    """Execute the notebooks with papermill; return the gathered metrics documents."""
    import papermill as pm

    out_dir = Path(out_dir)
    docs = []
    for nb in find_notebooks(notebooks_dir, only):
        nb_out = out_dir / nb.stem
        nb_out.mkdir(parents=True, exist_ok=True)
        params = {"SCALE": scale, "OUT_DIR": str(nb_out)}
        if data_root is not None:
            params["DATA_ROOT"] = str(data_root)
        t0 = time.perf_counter()
        # a per-cell limit, so that a stuck cell fails the run instead of hanging it
        pm.execute_notebook(str(nb), str(nb_out / nb.name), parameters=params, progress_bar=progress,
                            cwd=str(nb.parent), kernel_name="python3",
                            execution_timeout=CELL_TIMEOUT_S[scale])
        doc = read_metrics(nb_out)
        doc["seconds"] = time.perf_counter() - t0
        docs.append(doc)
    return docs


def main_reproduce(args) -> int:
    """Entry point behind ``python -m retrieval_lib reproduce``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data is not None:
        os.environ["RETRIEVAL_DATA"] = str(args.data)
    os.environ["RETRIEVAL_SCALE"] = args.scale
    cache_dir = args.cache or os.environ.get("RETRIEVAL_CACHE") or str(Path.home() / ".cache" / "retrieval_lib")
    res = offtheshelf(args.scale, data_root=args.data, device=args.device, cache_dir=Path(cache_dir) / "features",
                      progress=not args.quiet)
    table = offtheshelf_table(res)
    (out / "offtheshelf.md").write_text(table + "\n")
    (out / "offtheshelf.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(table)
    print(f"\nextraction: {res['extraction_images_per_s']:.1f} images/s; wrote {out / 'offtheshelf.md'}")
    if args.notebooks == "none":
        return 0
    only = None if args.notebooks == "all" else [s.strip().zfill(2) for s in args.notebooks.split(",")]
    docs = run_notebooks(args.scale, out / "notebooks", args.notebooks_dir, only, args.data, progress=not args.quiet)
    if docs:
        table = results_table(docs)
        timing = markdown_table(["notebook", "seconds"], [[d["notebook"], d["seconds"]] for d in docs])
        (out / "results.md").write_text(table + "\n\n" + timing + "\n")
        (out / "results.json").write_text(json.dumps(docs, indent=2) + "\n")
        print("\n" + table + "\n\n" + timing)
    return 0
