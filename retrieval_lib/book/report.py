"""Results files and tables: each notebook's ``metrics.json`` and the gathered results table.

Every notebook ends with :func:`write_metrics`; ``python -m retrieval_lib reproduce``
reads them back with :func:`read_metrics` and prints :func:`results_table`.

"Paper vs. ours" compares like with like. A paper's number is a :func:`paper_result` and
one of ours a :func:`measured`, both with the same six setting fields (``SETTING_FIELDS``:
dataset, protocol, method, training, backbone, resolution). :func:`paper_vs_ours` pairs a
paper number only with our number whose six fields match (compared without case, spaces
or punctuation, so ``"ResNet-101"`` equals ``"resnet101"``); a paper number with no such
measurement says "no comparable measurement" and names the setting we did measure.

``metrics.json`` layout::

    {"notebook": "03_gem", "scale": "cpu", "data": "real171",
     "ours":  {"mAP/gem_p3": 0.61, ...},                 # every number measured in this run
     "measured": [{"value": 0.61, "dataset": "real171", "protocol": "mAP", "method": "GeM p=3",
                   "training": "ImageNet, off the shelf", "backbone": "efficientnet_lite0",
                   "resolution": "512 px"}, ...],        # ours, with their settings
     "paper": [{"value": 0.647, "dataset": "roxford5k", ..., "source": "..."}, ...],
     "extra": {...}}                                    # anything else worth keeping
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping

from retrieval_lib.files import write_atomic

__all__ = ["write_metrics", "read_metrics", "markdown_table", "paper_vs_ours", "results_table",
           "paper_result", "measured", "SETTING_FIELDS", "OFF_THE_SHELF", "paper_catalogue", "PAPERS_FILE", "closest_measurement",
           "explain_difference", "reproduction_rows", "reproduction_table", "REPRODUCTION_HEADER", "uncatalogued",
           "FAMILIES"]

SETTING_FIELDS = ("dataset", "protocol", "method", "training", "backbone", "resolution")
OFF_THE_SHELF = "ImageNet, off the shelf"  # the training of every backbone this library loads


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


def write_metrics(out_dir, notebook: str, ours: Mapping, paper=None,
                  scale: str | None = None, data: str | None = None, extra: Mapping | None = None,
                  measured: Iterable[Mapping] | None = None) -> Path:
    """Write ``out_dir/metrics.json`` atomically and return its path.

    ``ours``: every number of the run by name; ``measured``: those of them compared with
    papers, as :func:`measured` entries; ``paper``: :func:`paper_result` entries (a list;
    the older ``{name: {"value", "setting", "source"}}`` mapping is still written as given).
    """
    if not ours:
        raise ValueError("write_metrics needs at least one measured number in `ours`")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paper = dict(paper) if isinstance(paper, Mapping) else [dict(e) for e in (paper or [])]
    doc = {"notebook": notebook, "scale": scale, "data": data, "ours": _clean(dict(ours)),
           "measured": _clean([_check_entry(e, "measured") for e in (measured or [])]),
           "paper": _clean(paper), "extra": _clean(dict(extra or {}))}
    return write_atomic(out_dir / "metrics.json", lambda f: f.write(json.dumps(doc, indent=2).encode("utf-8")))


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
    return str(v).replace("|", "\\|")  # a "|" inside a cell would split it


def markdown_table(header, rows, fmt=_fmt) -> str:
    """A GitHub-markdown table from a header list and a list of row lists.

    ``fmt`` turns each cell into text (default: floats with 3 decimals, ``None`` as "–").
    """
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ paper vs. ours
def _entry(value, fields: dict, **more) -> dict:
    missing = [k for k in SETTING_FIELDS if fields.get(k) is None or str(fields[k]).strip() == ""]
    if missing:
        raise ValueError(f"the setting fields {missing} are empty; give all of {list(SETTING_FIELDS)} "
                         "so that the number is compared only with one measured the same way")
    if value is not None and not isinstance(value, (int, float)):
        if hasattr(value, "item"):
            value = value.item()
        else:
            raise TypeError(f"value must be a number or None, got {type(value).__name__}")
    entry = {"value": value}
    entry.update({k: fields[k] for k in SETTING_FIELDS})
    entry.update({k: v for k, v in more.items() if v is not None})
    return entry


def paper_result(value, *, dataset, protocol, method, training, backbone, resolution, source: str,
                 note: str | None = None) -> dict:
    """One number from a paper, with the setting it was measured in.

    Args:
        value: the number as a fraction (0.647 for 64.7 mAP); ``None`` when it could not be
            verified (the row then shows the setting and source without a number).
        dataset: e.g. ``"roxford5k"``, ``"oxford5k"``, ``"holidays"``, ``"real171"``.
        protocol: the metric and protocol, e.g. ``"mAP medium"``, ``"mAP hard"``, ``"mAP"``.
        method: the descriptor, e.g. ``"MAC"``, ``"GeM p=3"``, ``"R-MAC L=3 + DBA + aQE"``.
        training: e.g. :data:`OFF_THE_SHELF`, ``"fine-tuned on SfM-120k"``.
        backbone: e.g. ``"resnet101"``, ``"vgg16"`` (compared without case and punctuation).
        resolution: the input, e.g. ``"1024 px"``, ``"1024 px, 3 scales"``.
        source: where the number is printed (paper, table, row).
        note: anything else a reader should know.
    """
    if not source or not str(source).strip():
        raise ValueError("a paper number needs its source (paper, table, row)")
    return _entry(value, dict(dataset=dataset, protocol=protocol, method=method, training=training,
                              backbone=backbone, resolution=resolution), source=source, note=note)


def measured(value, *, dataset, protocol, method, training, backbone, resolution, key: str | None = None) -> dict:
    """One of our numbers, with the setting of this run (the same fields as :func:`paper_result`).

    ``key``: its name in the notebook's ``ours`` dictionary, when it has one.
    """
    return _entry(value, dict(dataset=dataset, protocol=protocol, method=method, training=training,
                              backbone=backbone, resolution=resolution), key=key)


def _check_entry(entry: Mapping, kind: str) -> dict:
    entry = dict(entry)
    if not all(k in entry for k in SETTING_FIELDS):
        raise ValueError(f"a {kind} entry needs the fields {list(SETTING_FIELDS)} and value; got "
                         f"{sorted(entry)}; build it with {kind}(...)")
    return entry


def _norm(v) -> str:
    """Compare settings without case, spaces or punctuation: "ResNet-101" == "resnet101"."""
    return re.sub(r"[^0-9a-z.=+]", "", str(v).lower())


def _resolution(v) -> str:
    """``1024`` and ``"1024"`` read as ``"1024 px"``; any other text is kept."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v} px" if re.fullmatch(r"\d+", str(v).strip()) else str(v)


def _key(entry: Mapping) -> tuple:
    return tuple(_norm(_resolution(entry[k]) if k == "resolution" else entry[k]) for k in SETTING_FIELDS)


def _structured(entry) -> bool:
    return isinstance(entry, Mapping) and all(k in entry for k in SETTING_FIELDS)


def _setting_text(entry: Mapping) -> str:
    return (f"{entry['method']}; {entry['dataset']}, {entry['protocol']}; {entry['backbone']}, "
            f"{entry['training']}, {_resolution(entry['resolution'])}")


def _paper_entries(paper) -> list:
    """Paper entries as a list; the older ``{name: {value, setting, source} | value}`` mapping too."""
    if paper is None:
        return []
    if isinstance(paper, Mapping):
        out = []
        for name, ref in paper.items():
            ref = dict(ref) if isinstance(ref, Mapping) else {"value": ref}
            ref.setdefault("name", name)
            out.append(ref)
        return out
    return [dict(e) for e in paper]


def _our_entries(ours) -> list:
    """Our structured measurements; a plain ``{name: number}`` mapping states no setting, so none."""
    if ours is None or isinstance(ours, Mapping):
        return []
    return [_check_entry(e, "measured") for e in ours]


def _compare(ours, paper) -> list:
    """Rows (paper's setting, paper value, our value, our setting or why none, source)."""
    mine = _our_entries(ours)
    by_key: dict = {}
    for e in mine:
        k = _key(e)
        if k in by_key and by_key[k]["value"] != e["value"]:
            raise ValueError(f"two measurements share the setting {_setting_text(e)!r} with different values "
                             f"({by_key[k]['value']} and {e['value']}); tell them apart in a setting field")
        by_key.setdefault(k, e)
    rows = []
    for ref in _paper_entries(paper):
        source = "; ".join(str(ref[k]) for k in ("source", "note") if ref.get(k))
        if not _structured(ref):
            label = "; ".join(str(ref[k]) for k in ("name", "setting") if ref.get(k))
            rows.append([label, ref.get("value"), None,
                         "not compared: this paper entry states no structured setting (write it with paper_result)",
                         source])
            continue
        match = by_key.get(_key(ref))
        if match is not None:
            rows.append([_setting_text(ref), ref.get("value"), match["value"], _setting_text(match), source])
            continue
        if mine:  # the closest of our settings: most fields equal, the first of ties
            closest = max(mine, key=lambda e: sum(a == b for a, b in zip(_key(e), _key(ref))))
            differ = [f for f, a, b in zip(SETTING_FIELDS, _key(closest), _key(ref)) if a != b]
            why = (f"no comparable measurement (ours: {_setting_text(closest)}; differs in "
                   f"{', '.join(differ)})")
        else:
            why = "no comparable measurement (ours: no number measured with a stated setting)"
        rows.append([_setting_text(ref), ref.get("value"), None, why, source])
    return rows


COMPARE_HEADER = ["paper's setting", "paper", "ours (this run)", "our setting", "source"]


def paper_vs_ours(ours, paper) -> str:
    """Markdown table: one row per paper number, paired only with our number of the same setting.

    Args:
        ours: our numbers as :func:`measured` entries. A plain ``{name: number}`` mapping (the
            older call) states no setting, so no paper number is paired with it.
        paper: :func:`paper_result` entries. The older ``{name: {"value", "setting",
            "source"}}`` mapping is accepted; its rows say they were not compared.

    A paper number is paired with ours only when all of ``SETTING_FIELDS`` match; each
    paired row shows both settings. A paper number without such a measurement shows "–"
    under ours and "no comparable measurement (ours: <our closest setting>; differs in
    <fields>)".

    Raises:
        ValueError: two of our numbers share a setting but differ in value, or an entry
            lacks setting fields.
    """
    return markdown_table(COMPARE_HEADER, _compare(ours, paper))


def results_table(docs) -> str:
    """Markdown over many notebooks' metrics: the paper comparisons, then every number measured.

    The first table pairs each notebook's paper numbers with its ``measured`` entries by
    the rule of :func:`paper_vs_ours`; the second lists the ``ours`` numbers.
    """
    compare, numbers = [], []
    for doc in docs:
        compare += [[doc["notebook"]] + row for row in _compare(doc.get("measured") or [], doc.get("paper"))]
        numbers += [[doc["notebook"], key, value] for key, value in doc["ours"].items()]
    parts = []
    if compare:
        parts += ["Paper vs. ours (a paper number is paired only with ours of the same dataset, protocol, "
                  "method, training, backbone and resolution):", "",
                  markdown_table(["notebook"] + COMPARE_HEADER, compare), ""]
    parts += ["Every number measured in this run:", "", markdown_table(["notebook", "metric", "ours"], numbers)]
    return "\n".join(parts)


# ------------------------------------------------------------------ the papers of the book
FAMILIES = ("darac", "cgd", "wgem", "rmac", "spoc", "gem", "mac")
"""Descriptor families, most specific first (``wgem`` before ``gem``, ``rmac`` before ``mac``)."""


def _family(method) -> str:
    """The descriptor family a method belongs to (:data:`FAMILIES`): ``"GeM (learned p) + ..."`` ->
    ``"gem"``, ``"trainable R-MAC (rigid grid)"`` -> ``"rmac"``; else its first word. A paper
    number and ours are put side by side only within one family."""
    words = re.findall(r"[a-z]+", str(method).lower().replace("-", ""))
    return next((f for f in FAMILIES if f in words), words[0] if words else "")


PAPERS_FILE = Path(__file__).with_name("papers.json")
"""The catalogue of the papers the book reproduces: data, shipped with the package."""


def paper_catalogue() -> list[dict]:
    """The papers the book reproduces, each with its numbers as :func:`paper_result` entries.

    Every number is one the notebooks already cite with its source (or, for CGD, the
    numbers of the project's issue record, which say where they come from); a value the
    notebook could not verify stays ``None``. Each paper: ``key``, ``citation``,
    ``notebook`` (where it is taught), ``ours_full`` (what our ``full`` scale runs for it,
    beside the off-the-shelf setting of :data:`~retrieval_lib.book.config.SCALES`) and
    ``entries``. The catalogue is the data file :data:`PAPERS_FILE` (``book/papers.json``),
    its sources and settings exactly as the notebooks write them (09 lists any paper number a
    notebook wrote that is not here, so a drift shows up); each entry is checked by
    :func:`paper_result` on reading. ``notebooks/09_reproductions.ipynb`` shows one table per paper.
    """
    with open(PAPERS_FILE, encoding="utf-8") as f:
        papers = json.load(f)
    for paper in papers:
        paper["entries"] = [paper_result(**entry) for entry in paper["entries"]]
    return papers


def closest_measurement(paper: Mapping, ours) -> dict | None:
    """Our measurement to set beside a paper number: of the same descriptor family
    (:func:`_family`), the one with the most setting fields equal (the first of ties);
    ``None`` when we measured nothing of that family."""
    same = [e for e in _our_entries(ours) if _family(e["method"]) == _family(paper["method"])]
    if not same:
        return None
    return max(same, key=lambda e: sum(a == b for a, b in zip(_key(e), _key(paper))))


def _gap(ours, paper) -> str:
    return f"{ours - paper:+.3f}"


def explain_difference(paper: Mapping, ours: Mapping | None) -> str:
    """One sentence: how our number relates to the paper's, computed from the two settings.

    Same setting in all of ``SETTING_FIELDS``: the gap is a reproduction gap. Otherwise
    every differing field is named with both values, and the gap (when both numbers
    exist) is said to measure those differences, not a failure to reproduce.
    """
    if ours is None:
        return f"not measured in this run: no {_family(paper['method']).upper() or 'such'} number in the results"
    differ = [f for f, a, b in zip(SETTING_FIELDS, _key(ours), _key(paper)) if a != b]
    have_both = paper.get("value") is not None and ours.get("value") is not None
    if not differ:
        if have_both:
            return f"same setting in all six fields: ours − paper = {_gap(ours['value'], paper['value'])}, a reproduction gap"
        return "same setting in all six fields; the paper's value is not quoted (see its source)"
    shown = "; ".join(f"{f}: ours {_resolution(ours[f]) if f == 'resolution' else ours[f]}, paper "
                      f"{_resolution(paper[f]) if f == 'resolution' else paper[f]}" for f in differ)
    head = f"not comparable, {len(differ)} of {len(SETTING_FIELDS)} setting fields differ ({shown})"
    if have_both:
        return head + f"; ours − paper = {_gap(ours['value'], paper['value'])} measures these differences, " \
                      "not a failure to reproduce"
    if paper.get("value") is None:
        return head + "; the paper's value is not quoted (see its source)"
    return head


REPRODUCTION_HEADER = ["paper's setting", "paper", "source", "ours (this run)", "our setting", "from",
                       "difference explained"]


def reproduction_rows(paper_entries, ours) -> list:
    """Rows of :data:`REPRODUCTION_HEADER`: each paper number, our closest measurement of the
    same family (:func:`closest_measurement`) and :func:`explain_difference`."""
    out = []
    for ref in _paper_entries(paper_entries):
        if not _structured(ref):
            continue
        mine = closest_measurement(ref, ours)
        source = "; ".join(str(ref[k]) for k in ("source", "note") if ref.get(k))
        out.append([_setting_text(ref), ref.get("value"), source,
                    None if mine is None else mine.get("value"),
                    "–" if mine is None else _setting_text(mine),
                    "–" if mine is None else mine.get("from", "–"),
                    explain_difference(ref, mine)])
    return out


def reproduction_table(paper_entries, ours) -> str:
    """Markdown of :func:`reproduction_rows`."""
    return markdown_table(REPRODUCTION_HEADER, reproduction_rows(paper_entries, ours))


def uncatalogued(docs) -> list:
    """Paper numbers that notebooks wrote into their ``metrics.json`` but :func:`paper_catalogue`
    lacks (compared by setting, source and value): ``[(notebook, entry), ...]``.

    ``09_reproductions`` shows them too, so a notebook that cites a new number is never
    left out of the reproductions, and a catalogue entry that drifted from its notebook shows up.
    """
    known = {(_key(e), e.get("value"), e.get("source")) for p in paper_catalogue() for e in p["entries"]}
    out = []
    for doc in docs:
        for ref in _paper_entries(doc.get("paper")):
            if _structured(ref) and (_key(ref), ref.get("value"), ref.get("source")) not in known:
                out.append((doc["notebook"], ref))
    return out
