"""Suite time: the whole ``pytest`` run, each notebook at smoke (and, on request, ``reproduce --scale cpu``).

* ``pytest`` runs once in a subprocess with a JUnit XML report: its wall time, the time
  of each test file, and each notebook's smoke run (the ``test_runs_at_smoke_scale``
  cases of ``tests/test_notebooks.py``, which execute the notebook with papermill at
  ``SCALE="smoke"``). Targets: the suite <= 10 min, each notebook <= 30 s.
* ``python -m retrieval_lib reproduce --scale cpu`` runs in a subprocess on the data
  root (real171 when ``RETRIEVAL_DATA`` finds it): its wall time, the off-the-shelf
  comparison's seconds and each notebook's seconds and share, read back from the
  ``offtheshelf.json`` and ``results.json`` it writes. Target: <= 15 min. Only with
  ``run(reproduce=True)``: ``python -m benchmarks`` times the curriculum, cold and
  warm, in ``benchmarks/curriculum.py``.

Not part of ``--quick``: it takes as long as the things it measures (tens of minutes).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .timing import markdown_table

NAME = "suite"
REPO = Path(__file__).resolve().parents[1]
SUITE_TARGET_S = 600
NOTEBOOK_TARGET_S = 30  # issue 12 (was 60)
REPRODUCE_TARGET_S = 900
# a hung notebook (e.g. a cell waiting on a widget) must not hang the benchmark: stop at 3x the target
PYTEST_TIMEOUT_S = 3 * SUITE_TARGET_S
REPRODUCE_TIMEOUT_S = 3 * REPRODUCE_TARGET_S
_SMOKE_TEST = re.compile(r"test_runs_at_smoke_scale\[(.+)\]")


def parse_junit(path: os.PathLike) -> dict:
    """Per-file seconds, per-notebook smoke seconds, and pass/fail counts from a JUnit XML report."""
    root = ET.parse(path).getroot()
    files: dict = {}
    notebooks: dict = {}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for case in root.iter("testcase"):
        t = float(case.get("time", 0.0))
        module = case.get("classname", "").split(".")
        name = (module[-1] if module and module[-1].startswith("test_") else ".".join(module)) + ".py"
        files[name] = files.get(name, 0.0) + t
        counts["tests"] += 1
        for tag, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            if case.find(tag) is not None:
                counts[key] += 1
        m = _SMOKE_TEST.fullmatch(case.get("name", ""))
        if m:
            notebooks[m.group(1)] = t
    return {"files": files, "notebooks": notebooks, "counts": counts}


def _run(cmd: list, timeout: float) -> tuple:
    """Run ``cmd`` in the repository root: (exit code or None when killed at ``timeout``, stdout, stderr, wall s)."""
    t0 = time.perf_counter()
    # its own session, so that a timeout stops its children too (notebook kernels, DataLoader workers)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return code, out, err, time.perf_counter() - t0


def run_pytest(extra_args: tuple = (), timeout: float = PYTEST_TIMEOUT_S) -> dict:
    """The whole test suite in a subprocess: wall seconds, exit code (None: killed at ``timeout``)
    and the parsed JUnit report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *extra_args]
        code, out, _, wall = _run(cmd, timeout)
        parsed = parse_junit(report) if report.exists() else {"files": {}, "notebooks": {}, "counts": {}}
    tail = out.strip().splitlines()[-1:] if out.strip() else []
    line = tail[0] if tail else ""
    if code is None:
        line = f"killed after {timeout:.0f} s (a test hung?)"
    return {"wall_s": wall, "returncode": code, "summary_line": line, **parsed}


def run_reproduce(scale: str = "cpu", data=None, timeout: float = REPRODUCE_TIMEOUT_S, cache=None,
                  notebooks: str = "all", keep=None) -> dict:
    """``python -m retrieval_lib reproduce --scale SCALE`` in a subprocess with a fresh output folder.

    ``cache``: the feature cache folder (default: a fresh, empty one, i.e. a cold cache;
    pass the same folder twice to time a warm run). ``notebooks``: ``--notebooks``
    (``all``, ``none`` or numbers such as ``00,03``). Exit code None: killed at
    ``timeout``; the notebooks finished by then are still reported.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results"
        cmd = [sys.executable, "-m", "retrieval_lib", "reproduce", "--scale", scale, "--out", str(out),
               "--cache", str(cache if cache is not None else Path(tmp) / "cache"), "--quiet",
               "--notebooks", notebooks]
        if data is not None:
            cmd += ["--data", str(data)]
        code, _, err, wall = _run(cmd, timeout)
        offtheshelf = json.loads((out / "offtheshelf.json").read_text()) if (out / "offtheshelf.json").exists() else {}
        docs = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
        # results.json is written at the end: after a timeout, tell which executed copies exist
        started = sorted(p.name for p in (out / "notebooks").glob("*") if p.is_dir()) if code is None else []
        if keep is not None and out.exists():
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(out, keep)
    notebooks = {d.get("notebook", f"#{i}"): float(d.get("seconds", 0.0)) for i, d in enumerate(docs)}
    return {
        "wall_s": wall, "returncode": code, "scale": scale, "timed_out": code is None,
        "notebooks_started": started,
        "stderr_tail": err.strip().splitlines()[-5:] if code else [],
        "offtheshelf_s": offtheshelf.get("seconds"),
        "benchmark": offtheshelf.get("benchmark"),
        "extraction_images_per_s": offtheshelf.get("extraction_images_per_s"),
        "notebooks": notebooks,
    }


def run(quick: bool = False, repeats: int | None = None, pytest: bool = True, reproduce: bool = False,
        scale: str = "cpu", data=None) -> dict:
    """Run the suite benchmark (``quick`` is refused: this one is long by nature).

    ``reproduce=True`` adds one cold ``reproduce --scale SCALE``; ``python -m benchmarks``
    leaves it to the ``curriculum`` benchmark, which times it cold and warm.
    """
    if quick:
        raise ValueError("the suite benchmark runs the whole test suite and `reproduce --scale cpu` "
                         "(tens of minutes); it has no quick mode, run it without --quick")
    res: dict = {"name": NAME, "quick": False}
    if pytest:
        res["pytest"] = run_pytest()
    if reproduce:
        res["reproduce"] = run_reproduce(scale, data)
    summary = {}
    if pytest:
        p = res["pytest"]
        summary["suite_s"] = p["wall_s"]
        summary["suite_target_met"] = p["wall_s"] <= SUITE_TARGET_S
        summary["slowest_notebook_smoke_s"] = max(p["notebooks"].values(), default=None)
        summary["notebook_target_met"] = all(t <= NOTEBOOK_TARGET_S for t in p["notebooks"].values())
        summary["suite_passed"] = p["returncode"] == 0
    if reproduce:
        r = res["reproduce"]
        summary["reproduce_s"] = r["wall_s"]
        summary["reproduce_target_met"] = r["wall_s"] <= REPRODUCE_TARGET_S and r["returncode"] == 0
    res["summary"] = summary
    return res


def to_markdown(res: dict) -> str:
    lines = ["### Suite and curriculum time", ""]
    s = res["summary"]
    if "pytest" in res:
        p = res["pytest"]
        lines += [f"Whole `pytest`: {p['wall_s'] / 60:.1f} min (target <= {SUITE_TARGET_S // 60} min: "
                  f"{'met' if s['suite_target_met'] else 'NOT met'}); {p['summary_line']}.", ""]
        nb_rows = [[nb, f"{t:.1f}", "yes" if t <= NOTEBOOK_TARGET_S else "**no**"]
                   for nb, t in sorted(p["notebooks"].items())]
        if nb_rows:
            lines += [markdown_table(["notebook (smoke, papermill)", "seconds", f"<= {NOTEBOOK_TARGET_S} s"],
                                     nb_rows), ""]
        file_rows = [[f, f"{t:.1f}"] for f, t in sorted(p["files"].items(), key=lambda kv: -kv[1])]
        if file_rows:
            lines += [markdown_table(["test file", "seconds"], file_rows), ""]
    if "reproduce" in res:
        r = res["reproduce"]
        total = r["wall_s"]
        ended = (f"killed after {total / 60:.0f} min, last notebook started: "
                 f"{(r.get('notebooks_started') or ['?'])[-1]}" if r.get("timed_out") else f"exit code {r['returncode']}")
        lines += [f"`python -m retrieval_lib reproduce --scale {r['scale']}` on {r.get('benchmark') or '?'}: "
                  f"{total / 60:.1f} min (target <= {REPRODUCE_TARGET_S // 60} min: "
                  f"{'met' if s['reproduce_target_met'] else 'NOT met'}; {ended}).", ""]
        rows = []
        if r.get("offtheshelf_s") is not None:
            rows.append(["off-the-shelf comparison (extraction + 4 poolings)", f"{r['offtheshelf_s']:.1f}",
                         f"{100 * r['offtheshelf_s'] / total:.0f} %"])
        rows += [[nb, f"{t:.1f}", f"{100 * t / total:.0f} %"] for nb, t in r["notebooks"].items()]
        if rows:
            lines.append(markdown_table(["part", "seconds", "share"], rows))
    return "\n".join(lines).rstrip()
