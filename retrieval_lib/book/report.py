"""Results files and tables: each notebook's ``metrics.json`` and the gathered results table.

Every notebook ends with :func:`write_metrics`; ``python -m retrieval_lib reproduce``
reads them back with :func:`read_metrics` and prints :func:`results_table`.

``metrics.json`` layout::

    {"notebook": "03_gem", "scale": "cpu", "data": "real171",
     "ours":  {"mAP/gem_p3": 0.61, ...},                 # numbers measured in this run
     "paper": {"mAP/gem_p3": {"value": 0.647, "source": "...", "setting": "..."}},
     "extra": {...}}                                    # anything else worth keeping
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Mapping

__all__ = ["write_metrics", "read_metrics", "markdown_table", "paper_vs_ours", "results_table"]


def _clean(value):
    """Numbers to plain floats (NaN/inf to None) so the JSON is standard."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(out_dir, notebook: str, ours: Mapping, paper: Mapping | None = None,
                  scale: str | None = None, data: str | None = None, extra: Mapping | None = None) -> Path:
    """Write ``out_dir/metrics.json`` atomically and return its path."""
    if not ours:
        raise ValueError("write_metrics needs at least one measured number in `ours`")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"notebook": notebook, "scale": scale, "data": data, "ours": _clean(dict(ours)),
           "paper": _clean(dict(paper or {})), "extra": _clean(dict(extra or {}))}
    path = out_dir / "metrics.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
    os.replace(tmp, path)
    return path


def read_metrics(path) -> dict:
    """Read a ``metrics.json`` written by :func:`write_metrics` (a folder or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    with open(path) as f:
        doc = json.load(f)
    for key in ("notebook", "ours"):
        if key not in doc:
            raise ValueError(f"{path} is not a metrics file: the key {key!r} is missing")
    return doc


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(header, rows) -> str:
    """A GitHub-markdown table from a header list and a list of row lists."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def paper_vs_ours(ours: Mapping, paper: Mapping) -> str:
    """Markdown table: metric | ours | paper | paper's setting and source.

    Rows for every metric in ``paper``; a paper number with no measured counterpart shows
    "–" under ours, so it is visible that it was not reproduced.
    """
    rows = []
    for key, ref in paper.items():
        ref = ref if isinstance(ref, Mapping) else {"value": ref}
        rows.append([key, ours.get(key), ref.get("value"),
                     "; ".join(str(ref[k]) for k in ("setting", "source") if ref.get(k))])
    return markdown_table(["metric", "ours (this run)", "paper", "paper's setting / source"], rows)


def results_table(docs) -> str:
    """One markdown table over many notebooks' metrics: notebook | metric | ours | paper."""
    rows = []
    for doc in docs:
        paper = doc.get("paper") or {}
        for key, value in doc["ours"].items():
            ref = paper.get(key)
            ref_value = ref.get("value") if isinstance(ref, Mapping) else ref
            rows.append([doc["notebook"], key, value, ref_value])
    return markdown_table(["notebook", "metric", "ours", "paper"], rows)
