"""Extraction benchmark: ``extract_descriptors`` on real photos vs the bare backbone forward.

Ours: ``extract_descriptors(model, images, GeM(p=3), image_size=512)`` as a user calls
it, from JPEG files to L2-normalised descriptors (decoding, resizing, batching by size,
normalising, forward, pooling), with its default DataLoader workers.

Reference: the backbone's ``features`` alone, run the way extraction runs it on this
device (on the CPU: BatchNorm folded + channels_last, :func:`retrieval_lib.engine.extract._plan`),
on images decoded, resized, normalised and batched the same way *before* the clock
starts; nothing but the forward is timed.

Ratio = our images/s / the bare forward's images/s. Target (issue 5): >= 0.9, i.e.
decoding, resizing and pooling hidden behind the forward. Both runs alternate in the
same process; the descriptors of the two are compared (same maps, same pooling).
"""
from __future__ import annotations

import resource
import statistics
import time

import torch

from retrieval_lib.data.images import resize_longer_side, to_tensor
from retrieval_lib.engine.extract import extract_descriptors
from retrieval_lib.layers.functional import l2n
from retrieval_lib.layers.pooling import GeM

from .timing import PeakRSS, fmt_mb, markdown_table, peak_rss_bytes

NAME = "extraction"
RATIO_TARGET = 0.9


def photos(quick: bool):
    """The real171 photos when ``RETRIEVAL_DATA`` points at them, else the offline default set."""
    from retrieval_lib.data.datasets import default_benchmark
    from retrieval_lib.data.images import ImageList

    bench = default_benchmark()
    db = bench.database
    if quick:
        db = ImageList(db.paths[:8], name=f"{bench.name}[:8]")
    return bench.name + ("[:8]" if quick else ""), db


def decoded_batches(images, image_size: int, batch_size: int, mean, std) -> list:
    """Every image decoded, resized and normalised, grouped by size into batches (untimed)."""
    by_size: dict = {}
    for i in range(len(images)):
        t = to_tensor(resize_longer_side(images[i], image_size))  # (3, h, w)
        by_size.setdefault(tuple(t.shape), []).append((i, t))
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    batches = []
    for items in by_size.values():
        for k in range(0, len(items), batch_size):
            chunk = items[k:k + batch_size]
            x = torch.stack([t for _, t in chunk]).float().div_(255.0)
            batches.append(([i for i, _ in chunk], (x - m) / s))
    return batches


def forward_as_extraction_runs_it(model):
    """``(model', to_input)``: the backbone and input layout extraction uses on the CPU by default."""
    from retrieval_lib.engine.extract import _plan
    from retrieval_lib.engine.fold import fold_batchnorm

    plan = _plan(model, "cpu", None, None, None)
    if plan["fold_bn"]:
        model = fold_batchnorm(model)
    if plan["channels_last"]:
        return model.to(memory_format=torch.channels_last), lambda x: x.contiguous(memory_format=torch.channels_last)
    return model, lambda x: x


def bare_forward(model, batches) -> list:
    """The reference: ``model.features`` on each pre-built batch; returns the maps.

    ``model`` and the batches as :func:`forward_as_extraction_runs_it` prepared them.
    """
    with torch.inference_mode():
        return [(idx, model.features(x)) for idx, x in batches]


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn):
    c0, t0 = _cpu_seconds(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _cpu_seconds() - c0


def run(quick: bool = False, repeats: int | None = None, image_size: int | None = None, batch_size: int = 8) -> dict:
    """Run the extraction benchmark; return a JSON-able dict with ``rows`` and ``summary``.

    Each repeat runs the bare forward, then ``extract_descriptors`` with its default
    DataLoader workers, then with the other choice (1 worker if the default is to decode
    in the main process, else 0), back to back; the ratio of each run to the bare forward of the same repeat is
    taken, and the median over repeats reported (robust to a machine whose load
    changes between repeats). CPU seconds (process + workers) are reported too: they
    move less with the load than wall time. Quick mode: 8 photos at 256 px, only to
    exercise the code (its ratio is not a claim).
    """
    from retrieval_lib.models.backbones import load_backbone
    from retrieval_lib.engine.batching import default_workers

    repeats = repeats or (1 if quick else 5)
    image_size = image_size or (256 if quick else 512)
    name, images = photos(quick)
    model = load_backbone("efficientnet_lite0").eval()
    pooling = GeM(p=3.0, learn_p=False)
    n = len(images)
    t0 = time.perf_counter()
    batches = decoded_batches(images, image_size, batch_size, model.mean, model.std)
    decode_s = time.perf_counter() - t0
    bare_model, layout = forward_as_extraction_runs_it(model)
    bare_batches = [(idx, layout(x)) for idx, x in batches]

    def ours(workers):
        return lambda: extract_descriptors(model, images, pooling, image_size=image_size, batch_size=batch_size,
                                           num_workers=workers, progress=False)

    # the default, and the other choice: decoding in the main process vs in one worker process
    default = default_workers(torch.device("cpu"))
    other = 1 if default == 0 else 0
    variants = {f"default ({default} DataLoader workers)": None, f"num_workers={other}": other}
    ours(None)()  # warm-up of both, over every batch shape (allocator, first-touch pages)
    bare_forward(bare_model, bare_batches)
    runs = {"bare": []} | {v: [] for v in variants}
    X = None
    for _ in range(repeats):
        maps, wall, cpu = _timed(lambda: bare_forward(bare_model, bare_batches))
        runs["bare"].append((wall, cpu))
        for label, workers in variants.items():
            out, wall, cpu = _timed(ours(workers))
            runs[label].append((wall, cpu))
            X = out if X is None else X
    # memory in separate, untimed runs: the sampling thread would compete with the forward
    peaks = {}
    for label, fn in [("bare", lambda: bare_forward(bare_model, bare_batches))] + [(k, ours(w)) for k, w in variants.items()]:
        with PeakRSS(interval=0.02, children=True) as mem:
            fn()
        peaks[label] = mem.peak_extra
    ref = torch.zeros_like(X)
    with torch.inference_mode():
        for idx, fmap in maps:
            ref[idx] = l2n(pooling(fmap))
    err = (X - ref).abs().max().item()
    rows = []
    for label, rs in runs.items():
        ratios = [runs["bare"][i][0] / rs[i][0] for i in range(repeats)]
        rows.append({
            "pipeline": label, "wall_s": [w for w, _ in rs], "cpu_s": [c for _, c in rs],
            "images_per_s": n / statistics.median(w for w, _ in rs),
            "cpu_s_per_image": statistics.median(c for _, c in rs) / n,
            "ratio": statistics.median(ratios), "ratios": ratios,
            "peak_extra_rss_bytes": peaks[label],
        })
    default = rows[1]
    return {
        "name": NAME, "quick": quick, "repeats": repeats, "dataset": name, "n_images": n,
        "image_size": image_size, "batch_size": batch_size, "n_batches": len(batches),
        "torch_threads": torch.get_num_threads(), "decode_resize_s_untimed": decode_s,
        "rows": rows, "max_abs_err": err,
        "peak_extra_rss_bytes": default["peak_extra_rss_bytes"], "peak_rss_bytes": peak_rss_bytes(),
        "summary": {"ratio": default["ratio"], "target_met": default["ratio"] >= RATIO_TARGET,
                    "best_ratio": max(r["ratio"] for r in rows[1:]), "match": err < 1e-4},
    }


def to_markdown(res: dict) -> str:
    s = res["summary"]
    names = {"bare": "bare `model.features` on pre-decoded batches (as extraction runs it)"}
    rows = [[names.get(r["pipeline"], f"`extract_descriptors`, {r['pipeline']}"), f"{r['images_per_s']:.2f}",
             f"{r['cpu_s_per_image']:.3f}", f"{r['ratio']:.2f}", fmt_mb(r["peak_extra_rss_bytes"])]
            for r in res["rows"]]
    return "\n".join([
        "### Extraction: images/s on real photos", "",
        f"{res['n_images']} photos of {res['dataset']}, EfficientNet-Lite0 at {res['image_size']} px, GeM, "
        f"batch size {res['batch_size']} ({res['n_batches']} batches of equal-size images), "
        f"{res['torch_threads']} torch threads. `extract_descriptors` goes from JPEG files to descriptors; "
        f"the reference times only the forward on batches decoded, resized and normalised beforehand. "
        f"Ratio: median over {res['repeats']} repeats of (bare time / our time) within a repeat.", "",
        markdown_table(["pipeline", "images/s", "CPU s / image", "ratio to bare", "peak extra RSS"], rows), "",
        f"Ratio with the defaults {s['ratio']:.2f} (target >= {RATIO_TARGET}: "
        f"{'met' if s['target_met'] else 'NOT met'}); descriptors equal to the reference's: "
        f"{'yes' if s['match'] else 'NO'} (max |diff| {res['max_abs_err']:.1e}). Peak extra RSS: resident memory "
        f"above the level at the start of one untimed run (main process + the workers' own pages); the "
        f"benchmark process peaked at {fmt_mb(res['peak_rss_bytes'])} in all. Decoding + resizing alone took "
        f"{res['decode_resize_s_untimed']:.2f} s single-threaded (outside the reference's clock).",
    ])
