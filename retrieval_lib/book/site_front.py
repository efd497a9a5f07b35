"""The front page of the site (``index.html``): what the run measured, paper vs. ours, the notebooks.

:func:`index_html` writes what the run measured first (the off-the-shelf table, each notebook's
headline numbers -- its ``measured`` entries -- and its comparisons with an interval,
:func:`headline_comparisons`), then paper vs. ours (the released networks of
``paper_networks.json`` when the run has one, the paper numbers measured in their own setting,
the others folded into a count), then the notebooks (title, run time, status, links) and,
folded, the run's whole ``results.md``. Used by :func:`retrieval_lib.book.site.build_site`.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from retrieval_lib.book.colab import colab_url
from retrieval_lib.book.report import closest_measurement, explain_difference
from retrieval_lib.book.site_cells import plain_text
from retrieval_lib.book.site_math import math_placeholders, put_math_back

__all__ = ["index_html", "headline_comparisons"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; line-height: 1.45; color: #1f2328; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.5rem; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.failed { color: #b42318; font-weight: 600; }
.note { color: #57606a; }
details { margin: 0.6rem 0; }
details > summary { cursor: pointer; color: #0969da; }
"""


def _markdown(text: str) -> str:
    """Markdown to HTML, its equations as MathML."""
    from nbconvert.filters.markdown import markdown2html

    table: list = []
    page, _ = put_math_back(markdown2html(math_placeholders(text, table)), table)
    return page


def _widgets_cell(widgets: list[dict]) -> str:
    """The index's summary of a page's widgets: their controls' descriptions."""
    if not widgets:
        return "–"
    names = [html.escape(c.get("description") or "(no description)") for w in widgets for c in w["controls"]]
    return f"{len(widgets)}: " + ", ".join(names)


# ---------------------------------------------------------------- the front page
def _comparison(label: str, delta, lo, hi, level=0.95, n=None) -> dict | None:
    if not all(isinstance(v, (int, float)) for v in (delta, lo, hi)):
        return None
    if delta == 0 and lo == 0 and hi == 0:
        verdict = "identical"
    elif lo > 0 or hi < 0:
        verdict = f"{'higher' if delta > 0 else 'lower'}: the interval excludes zero"
    else:
        verdict = "within the noise: the interval contains zero"
    return {"label": label, "delta": float(delta), "ci": (float(lo), float(hi)), "level": level, "n": n,
            "verdict": verdict}


def _nested_comparisons(value, path: list, out: list, parent: dict | None = None) -> None:
    """Paired comparisons (``search.compare.paired_comparison`` dicts: delta, ci, significant) anywhere in ``extra``."""
    if isinstance(value, dict):
        if {"delta", "ci"} <= set(value) and isinstance(value["ci"], (list, tuple)) and len(value["ci"]) == 2:
            found = _comparison(_label(path, parent), value["delta"], *value["ci"], value.get("level", 0.95),
                                value.get("n"))
            if found:
                out.append(found)
            return
        for k, v in value.items():
            _nested_comparisons(v, path + [k], out, value)
    elif isinstance(value, list):
        for k, v in enumerate(value):
            _nested_comparisons(v, path + [k], out, parent)


def _label(path: list, parent: dict | None) -> str:
    """A comparison's place in ``extra`` in words; a list item named by a sibling list of scalars of the same
    length (``{"dims": [8, 16, 31], "comparisons": [...]}``: ``comparisons at dims = 16``)."""
    words = []
    for i, p in enumerate(path):
        if isinstance(p, int):
            name = None
            if parent is not None and i == len(path) - 1 and i > 0:
                items = parent.get(path[i - 1])
                for key, sib in parent.items():
                    if (key != path[i - 1] and isinstance(sib, list) and isinstance(items, list)
                            and len(sib) == len(items) and all(isinstance(x, (int, float, str)) for x in sib)):
                        name = f"at {key} = {sib[p]}"
                        break
            words.append(name or f"#{p + 1}")
        else:
            words.append(str(p).replace("_", " "))
    return " / ".join(words).replace(" / at ", " at ")


def headline_comparisons(doc: dict) -> list[dict]:
    """The comparisons with an interval that a notebook's ``metrics.json`` records.

    Two forms are read: a paired-comparison dict anywhere under ``extra`` (``delta``, ``ci``,
    ``level``, ``n``), and in ``ours`` a key with ``ci_low`` in its name beside the same key
    with ``ci_high``, whose difference is the key without ``_ci_low`` (``gap_ci_low/spoc-mac``
    -> ``gap/spoc-mac``) or with ``delta`` in its place (``heldout_ci_low`` -> ``heldout_delta``).
    Each: ``label``, ``delta``, ``ci`` (low, high), ``level``, ``n`` and ``verdict`` (identical,
    higher/lower with the interval excluding zero, or within the noise).
    """
    out: list = []
    _nested_comparisons(doc.get("extra") or {}, [], out)
    ours = doc.get("ours") or {}
    for key in ours:
        if "ci_low" not in key:
            continue
        high = key.replace("ci_low", "ci_high")
        base = next((k for k in (key.replace("_ci_low", ""), key.replace("ci_low", "delta"),
                                 key.replace("_ci_low", "_delta")) if k in ours and k != key), None)
        if base is None or high not in ours:
            continue
        found = _comparison(base, ours[base], ours[key], ours[high])
        if found:
            out.append(found)
    return out


def _num(v, digits=3) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v)))


def _signed(v: float) -> str:
    return f"{v:+.1e}" if v != 0 and abs(v) < 5e-4 else f"{v:+.3f}"


def _read_docs(run_dir: Path) -> list[dict]:
    """Each notebook's ``metrics.json`` in the run, in notebook order (results.json's copies when a file is missing)."""
    docs = {}
    for path in sorted(run_dir.glob("notebooks/*/metrics.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "notebook" in doc:
            docs[doc["notebook"]] = doc
    try:
        for doc in json.loads((run_dir / "results.json").read_text(encoding="utf-8")):
            if isinstance(doc, dict) and "notebook" in doc:
                docs.setdefault(doc["notebook"], doc)
    except (OSError, ValueError, TypeError):
        pass
    return [docs[k] for k in sorted(docs)]


def _measured_html(docs: list[dict], pages: list[dict]) -> str:
    """Per notebook: its headline numbers (the ``measured`` entries) and its comparisons with an interval."""
    link = {p["name"]: p["html"] for p in pages}
    rows, cmp_rows = [], []
    for doc in docs:
        name = doc["notebook"]
        cell = (f'<a href="{link[name]}">{html.escape(name)}</a>' if name in link else html.escape(name))
        numbers = [e for e in doc.get("measured") or [] if isinstance(e, dict) and "value" in e]
        if numbers:
            settings = sorted({f"{e.get('protocol', '')} on {e.get('dataset', '')}" for e in numbers})
            shown = " · ".join(f"{html.escape(str(e.get('method', '')))} <b>{_num(e['value'])}</b>" for e in numbers)
            rows.append(f"<tr><td>{cell}</td><td>{shown}</td><td>{html.escape('; '.join(settings))}</td></tr>")
        for c in headline_comparisons(doc):
            lo, hi = c["ci"]
            cmp_rows.append(f'<tr><td>{cell}</td><td><code>{html.escape(c["label"])}</code></td>'
                            f'<td class="num">{_signed(c["delta"])}</td>'
                            f'<td class="num">{_signed(lo)} … {_signed(hi)}</td>'
                            f'<td class="num">{"–" if c["n"] is None else c["n"]}</td>'
                            f'<td>{html.escape(c["verdict"])}</td></tr>')
    parts = []
    if rows:
        parts += ['<h3 id="headline">Each notebook\'s headline numbers</h3>',
                  '<table class="headline"><thead><tr><th>notebook</th><th>measured in this run</th>'
                  "<th>protocol and data</th></tr></thead><tbody>", *rows, "</tbody></table>"]
    if cmp_rows:
        parts += ['<h3 id="comparisons">Comparisons with a 95 % bootstrap interval</h3>',
                  '<p class="note">Paired over the same queries; a difference is called higher or lower only when '
                  "its interval excludes zero (several comparisons at once: one of them may do so by chance).</p>",
                  '<table class="comparisons"><thead><tr><th>notebook</th><th>comparison (key in metrics.json)</th>'
                  "<th>difference</th><th>interval</th><th>queries</th><th>verdict</th></tr></thead><tbody>",
                  *cmp_rows, "</tbody></table>"]
    return "\n".join(parts)


def _network_rows(path: Path) -> list[dict]:
    """The rows of ``paper_networks.json``, same-setting rows first: a list of rows (network, dataset, protocol,
    paper, ours, diff or difference, same_setting), or a list of network results each holding its ``rows``."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = []
    for item in doc if isinstance(doc, list) else []:
        if isinstance(item, dict) and isinstance(item.get("rows"), list):
            rows += [r for r in item["rows"] if isinstance(r, dict)]
        elif isinstance(item, dict):
            rows.append(item)
    rows = [{**r, "diff": r.get("diff", r.get("difference"))} for r in rows]
    return sorted(rows, key=lambda r: not r.get("same_setting"))


def _network_table(rows: list[dict]) -> str:
    """HTML of :func:`_network_rows`; numbers above 1 are read as mAP in % (one decimal), else as fractions."""
    values = [r.get(k) for r in rows for k in ("paper", "ours") if isinstance(r.get(k), (int, float))]
    percent = bool(values) and max(abs(v) for v in values) > 1.0

    def value(v, sign=False):
        if not isinstance(v, (int, float)):
            return "–"
        if percent:
            return f"{v:+.1f}" if sign else f"{v:.1f}"
        return _signed(v) if sign else _num(float(v))

    body = []
    for r in rows:
        why = "; ".join(map(str, r.get("differences") or []))
        same = "yes" if r.get("same_setting") else ("no: " + why if why else "no")
        body.append(f"<tr><td>{html.escape(str(r.get('network', '')))}</td>"
                    f"<td>{html.escape(str(r.get('dataset', '')))}</td><td>{html.escape(str(r.get('protocol', '')))}</td>"
                    f'<td class="num">{value(r.get("paper"))}</td><td class="num">{value(r.get("ours"))}</td>'
                    f'<td class="num">{value(r.get("diff"), sign=True)}</td><td>{html.escape(same)}</td></tr>')
    unit = " (%)" if percent else ""
    return ('<table class="networks"><thead><tr><th>network</th><th>dataset</th><th>protocol</th>'
            f"<th>paper{unit}</th><th>ours{unit}</th><th>ours − paper</th><th>same setting</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _paper_html(docs: list[dict], run_dir: Path) -> str:
    """The released networks' reproductions (``paper_networks.json``), then paper numbers measured in the same
    setting, then a count of the others in a collapsed ``<details>`` holding their table."""
    parts = []
    rows = _network_rows(run_dir / "paper_networks.json")
    if rows:
        parts += ['<h3 id="networks">The papers\' released networks, run here</h3>', _network_table(rows)]
    same, other = [], []
    for doc in docs:
        for ref in doc.get("paper") or []:
            if not isinstance(ref, dict) or "method" not in ref:
                continue
            try:
                mine = closest_measurement(ref, doc.get("measured") or [])
                why = explain_difference(ref, mine)
            except (KeyError, ValueError, TypeError):
                continue
            setting = (f"{ref.get('method')}; {ref.get('dataset')}, {ref.get('protocol')}; {ref.get('backbone')}, "
                       f"{ref.get('training')}, {ref.get('resolution')}")
            source = "; ".join(str(ref[k]) for k in ("source", "note") if ref.get(k))
            if mine is not None and why.startswith("same setting"):
                gap = (_signed(mine["value"] - ref["value"]) if isinstance(mine.get("value"), (int, float))
                       and isinstance(ref.get("value"), (int, float)) else "–")
                same.append(f"<tr><td>{html.escape(doc['notebook'])}</td><td>{html.escape(setting)}</td>"
                            f'<td class="num">{_num(ref.get("value"))}</td><td class="num">{_num(mine.get("value"))}</td>'
                            f'<td class="num">{gap}</td><td>{html.escape(source)}</td></tr>')
            else:
                other.append(f"<tr><td>{html.escape(doc['notebook'])}</td><td>{html.escape(setting)}</td>"
                             f'<td class="num">{_num(ref.get("value"))}</td><td>{html.escape(why)}</td>'
                             f"<td>{html.escape(source)}</td></tr>")
    if same:
        parts += ['<h3 id="same-setting">Paper numbers measured here in the same setting</h3>',
                  '<table class="same-setting"><thead><tr><th>notebook</th><th>setting</th><th>paper</th>'
                  "<th>ours</th><th>ours − paper</th><th>source</th></tr></thead><tbody>", *same, "</tbody></table>"]
    else:
        parts.append('<p class="note">No paper number was measured in its own setting in this run (dataset, '
                     "protocol, method, training, backbone and resolution all equal); the scales below full run other "
                     "data and backbones.</p>")
    if other:
        parts += [f'<details class="rl-other"><summary>{len(other)} paper numbers with no comparable measurement in '
                  "this run (click for the list and what differs)</summary>",
                  '<table class="other"><thead><tr><th>notebook</th><th>paper\'s setting</th><th>paper</th>'
                  "<th>why not compared</th><th>source</th></tr></thead><tbody>", *other, "</tbody></table></details>"]
    return "\n".join(parts)


def index_html(pages: list[dict], run_dir: Path, scale: str | None) -> str:
    rows = []
    for p in pages:
        status = "ran" if p["error"] is None else (f'<span class="failed">stopped in code cell {p["error"][0]}: '
                                                     f'{html.escape(p["error"][1][:200])}</span>')
        secs = "–" if p["seconds"] is None else f"{p['seconds']:.1f}"
        rows.append(f'<tr><td><a href="{p["html"]}">{html.escape(p["name"])}</a></td>'
                    f"<td>{html.escape(plain_text(p['title']))}</td><td class=\"num\">{secs}</td>"
                    f"<td>{status}</td><td class=\"num\">{p['figures']}</td><td>{_widgets_cell(p['widgets'])}</td>"
                    f'<td><a href="{p["ipynb"]}">.ipynb</a> · <a href="{html.escape(colab_url(p["name"]))}">Colab</a>'
                    "</td></tr>")
    docs = _read_docs(run_dir)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>The runnable textbook of deep image retrieval: executed notebooks</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>The runnable textbook of deep image retrieval</h1>",
        '<p class="note">What this run measured'
        + (f" at <b>{html.escape(scale)}</b> scale" if scale else "") +
        ", then the papers' numbers beside ours, then the notebooks as they ran (numbers and figures come from "
        "that run). Widgets are shown as the figure they start from; open a notebook in JupyterLab or Colab to "
        "move its sliders.</p>",
        '<h2 id="measured">What this run measured</h2>',
    ]
    offtheshelf = run_dir / "offtheshelf.md"
    if offtheshelf.is_file():
        parts += ['<h3 id="offtheshelf">Off-the-shelf descriptors</h3>',
                  f'<div class="offtheshelf">{_markdown(offtheshelf.read_text(encoding="utf-8"))}</div>']
    parts.append(_measured_html(docs, pages) or '<p class="note">No notebook of this run wrote a metrics.json.</p>')
    parts += ['<h2 id="paper">Paper vs. ours</h2>', _paper_html(docs, run_dir)]
    parts += ['<h2 id="notebooks">Notebooks</h2>',
              '<table class="notebooks"><thead><tr><th>notebook</th><th>title</th><th>run time (s)</th>'
              "<th>status</th><th>figures</th><th>widgets</th><th>open</th></tr></thead><tbody>",
              *rows, "</tbody></table>"]
    results = run_dir / "results.md"
    parts.append('<h2 id="results">Every number of this run</h2>')
    if results.is_file():
        parts.append('<details class="results"><summary>The full results table of the run (results.md: every '
                     "number each notebook wrote, and the paper comparisons row by row)</summary>"
                     f"{_markdown(results.read_text(encoding='utf-8'))}</details>")
    else:
        parts.append('<p class="failed">No results table: the run folder holds no results.md (reproduce '
                     "writes it once every notebook has run).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
