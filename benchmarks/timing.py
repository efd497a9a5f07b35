"""Shared measuring tools of the benchmarks: timers, memory probes, machine facts, output files.

Every benchmark compares a plain reference with the library *in the same process and
run*, interleaving the two (reference, ours, reference, ours, ...) after a warm-up and
reporting the ratio of the medians. On a shared, noisy machine the absolute times move
from run to run; the ratios are the claims.

Memory is measured three ways, each where it fits:

* :class:`PeakRSS` samples the resident set size (RSS) of the process (and its
  children, e.g. DataLoader workers) from a background thread and reports the peak
  above the level at entry: what a user sees in ``top``.
* :class:`TensorMemory` follows, through a torch dispatch mode, every tensor storage an
  operation creates until it is freed: the peak of live tensor bytes and the largest
  single tensor, deterministic (the answer to "did this call ever build a tensor of
  size X?" or "does chunking bound the memory?").
* :class:`NumpyMemory` is the same for numpy code, through ``tracemalloc``.
* :func:`peak_rss_bytes` is the process-lifetime peak (``getrusage``).
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from retrieval_lib.book import report

__all__ = [
    "Timing",
    "bench",
    "compare",
    "PeakRSS",
    "TensorMemory",
    "NumpyMemory",
    "peak_rss_bytes",
    "machine_info",
    "markdown_table",
    "geomean",
    "write_results",
    "fmt_s",
    "fmt_mb",
]

MB = 2.0 ** 20


# ---------------------------------------------------------------------------------- timers
class Timing(dict):
    """Result of :func:`bench`: ``median`` seconds per call, ``times`` (one per repeat,
    seconds per call), ``number`` (calls per repeat), ``repeats``; a dict for JSON."""

    @property
    def median(self) -> float:
        return self["median"]


def _calibrate(fn: Callable[[], Any], min_time: float) -> int:
    """Calls per repeat so that one repeat lasts at least ``min_time`` seconds."""
    if min_time <= 0:
        return 1
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time or number >= 1 << 16:
            return number
        # aim a little past min_time; at most x10 per step so a first slow call is not trusted
        number = max(number + 1, min(number * 10, int(number * 1.2 * min_time / max(dt, 1e-9)) + 1))


def _one_repeat(fn: Callable[[], Any], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def bench(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` repeats, after ``warmup`` unmeasured calls.

    With ``min_time > 0`` each repeat runs ``fn`` as many times as needed to last at
    least ``min_time`` seconds (like ``timeit``) and reports the time per call, so
    microsecond-scale functions are not lost in timer noise.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    number = _calibrate(fn, min_time)
    times = [_one_repeat(fn, number) for _ in range(repeats)]
    return Timing(median=statistics.median(times), times=times, number=number, repeats=repeats)


def compare(reference: Callable[[], Any], ours: Callable[[], Any], repeats: int = 5, warmup: int = 1,
            min_time: float = 0.0) -> dict:
    """Time a reference and ours interleaved (ref, ours, ref, ours, ...), after a warm-up of each.

    Interleaving spreads any slow phase of a shared machine over both. Returns
    ``{"reference_s", "ours_s", "speedup", "reference", "ours"}`` with ``speedup =
    reference_s / ours_s`` (> 1: ours is faster); the last two hold every repeat.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        reference()
        ours()
    n_ref, n_ours = _calibrate(reference, min_time), _calibrate(ours, min_time)
    t_ref, t_ours = [], []
    for _ in range(repeats):
        t_ref.append(_one_repeat(reference, n_ref))
        t_ours.append(_one_repeat(ours, n_ours))
    ref_s, ours_s = statistics.median(t_ref), statistics.median(t_ours)
    return {
        "reference_s": ref_s,
        "ours_s": ours_s,
        "speedup": ref_s / ours_s if ours_s > 0 else math.inf,
        "reference": Timing(median=ref_s, times=t_ref, number=n_ref, repeats=repeats),
        "ours": Timing(median=ours_s, times=t_ours, number=n_ours, repeats=repeats),
    }


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of positive numbers (the mean of ratios)."""
    v = [float(x) for x in values]
    if not v or any(x <= 0 for x in v):
        raise ValueError(f"geomean needs positive numbers, got {v}")
    return math.exp(sum(math.log(x) for x in v) / len(v))


# ---------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (``getrusage``), bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _rss_bytes(proc, children: bool) -> int:
    total = proc.memory_info().rss
    if children:
        for c in proc.children(recursive=True):
            try:  # unique pages only: a forked worker shares its parent's pages until it writes
                total += c.memory_full_info().uss
            except Exception:  # a worker that just exited
                pass
    return total


class PeakRSS:
    """Context manager: peak resident memory above the level at entry, sampled every ``interval`` s.

    ``with PeakRSS() as m: work()`` then ``m.peak_extra`` (bytes) and ``m.peak`` (bytes,
    absolute). ``children=True`` adds the memory unique to child processes (DataLoader
    workers: their unique set size, since a forked child shares its parent's pages).
    Sampling can miss an allocation that lives shorter than ``interval``; run short calls
    in a loop inside the block.
    """

    def __init__(self, interval: float = 0.002, children: bool = False):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.children = children
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes(self._proc, self.children))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = _rss_bytes(self._proc, self.children)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes(self._proc, self.children))

    @property
    def peak_extra(self) -> int:
        return max(0, self.peak - self.baseline)


class TensorMemory:
    """Context manager: peak bytes of live tensors created by torch ops inside it, and the largest one.

    A torch dispatch mode sees every operator call; an output whose storage is not one
    of the inputs' storages is a fresh allocation (views and in-place ops are not). Its
    bytes count as live until the storage is freed. ``peak`` is the most bytes alive at
    once, ``largest`` the biggest single allocation and ``op`` the operator that made it.
    Deterministic, unlike sampling the resident memory: the answer to "was a
    ``(B, R, C, H, W)`` tensor ever built?" or "does chunking bound the extra memory?".
    Tensors made outside torch (numpy) are not seen: use :class:`NumpyMemory` there.
    Slows the code inside down; never time under it.
    """

    def __init__(self):
        self.live = self.peak = self.largest = 0
        self.op = ""

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _track(self, func, args, kwargs, out) -> None:
        from torch.utils._pytree import tree_leaves

        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            if nbytes == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            if nbytes > self.largest:
                self.largest, self.op = nbytes, str(func)
            weakref.finalize(storage, self._free, nbytes)

    def __enter__(self) -> "TensorMemory":
        from torch.utils._python_dispatch import TorchDispatchMode

        probe = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                probe._track(func, args, kwargs or {}, out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


class NumpyMemory:
    """Context manager: peak bytes allocated by numpy (and Python) inside it, via ``tracemalloc``.

    numpy reports its array buffers to ``tracemalloc``, so this measures the extra memory
    of numpy code exactly. ``peak`` in bytes. Slows allocation-heavy code a little.
    """

    def __init__(self):
        self.peak = 0

    def __enter__(self) -> "NumpyMemory":
        import tracemalloc

        self._was_tracing = tracemalloc.is_tracing()
        if not self._was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._start = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc) -> None:
        import tracemalloc

        self.peak = max(0, tracemalloc.get_traced_memory()[1] - self._start)
        if not self._was_tracing:
            tracemalloc.stop()


# ---------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, cores, memory, load, library versions."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    return info


def machine_line(info: dict, load: bool = True) -> str:
    """One sentence describing the machine, for the top of a results table."""
    gpu = f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"
    load = info.get("load_average") if load else None
    load = f"; load average at start {load[0]:.2f}" if load else ""
    mem = f", {info['memory_gb']} GB RAM" if "memory_gb" in info else ""
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads){mem}{gpu}; "
            f"Python {info['python']}, torch {info['torch']}, numpy {info['numpy']}, "
            f"faiss {info.get('faiss') or 'not installed'}{load}")


# ---------------------------------------------------------------------------------- output
def fmt_s(seconds: Optional[float]) -> str:
    """Seconds in a readable unit: 12.3 µs, 4.56 ms, 7.89 s."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_mb(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "–"
    return f"{nbytes / MB:.1f} MB"


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "–" if v is None else str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The library's markdown table (``retrieval_lib.book.report``) with the benchmarks' cells:
    booleans as yes / **no**, floats with 3 significant digits."""
    return report.markdown_table(headers, rows, fmt=_cell)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def write_results(out_dir: os.PathLike, name: str, result: dict, markdown: str) -> None:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
