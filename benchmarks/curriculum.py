"""The whole curriculum timed: every notebook through ``python -m retrieval_lib reproduce``.

Three runs, each a ``reproduce`` subprocess (the off-the-shelf comparison, then every
notebook executed with papermill in order):

1. ``--scale smoke`` with an empty cache: each notebook's seconds (target <= 30 s each);
2. ``--scale cpu`` on real171 (when ``RETRIEVAL_DATA`` holds it) with an empty feature
   cache: the *cold* curriculum (target <= 15 min);
3. the same again with the cache the cold run filled: the *warm* curriculum (target
   <= 15 min), what a reader who re-runs the book pays.

Each part's seconds and share of the run's wall time are listed, with the load average
before and after each run (the machine is shared). Quick mode only checks the harness:
the smoke scale, the off-the-shelf comparison without notebooks, cold then warm.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .suite import run_reproduce
from .timing import markdown_table

NAME = "curriculum"
CPU_TARGET_S = 15 * 60
SMOKE_TARGET_S = 30
CPU_TIMEOUT_S = 3 * CPU_TARGET_S


def _timed_reproduce(label: str, **kwargs) -> dict:
    before = os.getloadavg()
    res = run_reproduce(**kwargs)
    res.update(label=label, load_before=list(before), load_after=list(os.getloadavg()))
    return res


def parts(res: dict) -> list:
    """``(part, seconds, share of the run)`` for the off-the-shelf comparison and every notebook."""
    total = res["wall_s"]
    rows = []
    if res.get("offtheshelf_s") is not None:
        rows.append(("off-the-shelf comparison", res["offtheshelf_s"], res["offtheshelf_s"] / total))
    rows += [(nb, t, t / total) for nb, t in res["notebooks"].items()]
    return rows


def _ok(res: dict, target_s: float) -> bool:
    return res["returncode"] == 0 and res["wall_s"] <= target_s


def run(quick: bool = False, repeats: int | None = None, data=None, notebooks: str | None = None,
        keep=None) -> dict:
    """Time the curriculum (see the module docstring); ``repeats`` is ignored (one run each).

    ``keep``: a folder that receives each cpu run's output (``cpu_cold/``, ``cpu_warm/``:
    executed notebooks, ``metrics.json``, figures), so the timed run is also the one read.
    """
    notebooks = notebooks or ("none" if quick else "all")
    runs = {}
    with tempfile.TemporaryDirectory() as smoke_cache:
        runs["smoke"] = _timed_reproduce("smoke, cold cache", scale="smoke", data=data, cache=smoke_cache,
                                         notebooks=notebooks, timeout=CPU_TIMEOUT_S)
        if quick:  # the harness only: warm = the same small run again
            runs["smoke_warm"] = _timed_reproduce("smoke, warm cache", scale="smoke", data=data,
                                                  cache=smoke_cache, notebooks=notebooks, timeout=CPU_TIMEOUT_S)
    if not quick:
        with tempfile.TemporaryDirectory() as cpu_cache:
            for key, label in (("cpu_cold", "cpu, cold cache"), ("cpu_warm", "cpu, warm cache")):
                runs[key] = _timed_reproduce(label, scale="cpu", data=data, cache=cpu_cache, notebooks=notebooks,
                                             timeout=CPU_TIMEOUT_S,
                                             keep=None if keep is None else Path(keep) / key)
    smoke_nb = runs["smoke"]["notebooks"]
    summary = {
        "smoke_slowest_notebook_s": max(smoke_nb.values(), default=None),
        "smoke_target_met": runs["smoke"]["returncode"] == 0 and all(t <= SMOKE_TARGET_S for t in smoke_nb.values()),
        "all_ran": all(r["returncode"] == 0 for r in runs.values()),
    }
    for key in ("cpu_cold", "cpu_warm"):
        if key in runs:
            summary[f"{key}_s"] = runs[key]["wall_s"]
            summary[f"{key}_target_met"] = _ok(runs[key], CPU_TARGET_S)
    return {"name": NAME, "quick": quick, "notebooks_arg": notebooks, "runs": runs, "summary": summary}


def to_markdown(res: dict) -> str:
    lines = ["### The curriculum: every notebook, smoke and cpu scale", ""]
    s = res["summary"]
    for key, r in res["runs"].items():
        ended = ("killed at the time limit, last notebook started: " + ((r.get("notebooks_started") or ["?"])[-1])
                 if r.get("timed_out") else f"exit code {r['returncode']}")
        target = SMOKE_TARGET_S if r["scale"] == "smoke" else CPU_TARGET_S
        verdict = ""
        if r["scale"] == "cpu":
            verdict = f" (target <= {CPU_TARGET_S // 60} min: {'met' if _ok(r, CPU_TARGET_S) else 'NOT met'})"
        lines += [f"**{r['label']}** on {r.get('benchmark') or '?'}: {r['wall_s'] / 60:.1f} min{verdict}; {ended}; "
                  f"load average {r['load_before'][0]:.2f} before, {r['load_after'][0]:.2f} after.", ""]
        rows = [[p, f"{t:.1f}", f"{100 * share:.0f} %"] + ([t <= target] if r["scale"] == "smoke" else [])
                for p, t, share in parts(r)]
        if rows:
            head = ["part", "seconds", "share"] + ([f"<= {SMOKE_TARGET_S} s"] if r["scale"] == "smoke" else [])
            lines += [markdown_table(head, rows), ""]
        if r.get("stderr_tail"):
            lines += ["```", *r["stderr_tail"], "```", ""]
    if s.get("smoke_slowest_notebook_s") is not None:
        lines.append(f"Slowest notebook at smoke scale: {s['smoke_slowest_notebook_s']:.1f} s (target <= "
                     f"{SMOKE_TARGET_S} s each: {'met' if s['smoke_target_met'] else 'NOT met'}).")
    if res.get("quick"):
        lines.append("Quick mode: the off-the-shelf comparison at smoke scale only, cold then warm "
                     "(a check of the harness).")
    return "\n".join(lines).rstrip()
