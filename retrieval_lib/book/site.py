"""The executed book as a static web site: ``python -m retrieval_lib site``.

:func:`build_site` turns a ``reproduce`` output folder (``python -m retrieval_lib reproduce
--out RUN``: the executed copies ``RUN/notebooks/NN_name/NN_name.ipynb``, ``results.md``,
``results.json``, ``offtheshelf.md``) into plain HTML files that any browser opens
without a server or a kernel:

- one page per executed notebook (nbconvert's JupyterLab template), its figures embedded
  as PNG data, so a page is one self-contained file;
- each live widget (``viz.live_figure``) replaced by a note that names its controls (the
  ``description`` of each slider, its range and starting value) and points at the
  static figure the notebook drew with the same function, in that cell or the code cell
  before it: a reader without a kernel sees the figure, not an empty widget area;
- ``index.html``: the notebooks in order (title, run time, a link to the page and to the
  executed ``.ipynb``), then the results table and the off-the-shelf table of the run.

``python -m retrieval_lib site --scale smoke|cpu|full --out site/`` first runs
``reproduce`` into ``site/run/`` (every notebook executed at that scale), then builds the
pages; ``--from RUN`` builds from an existing reproduce folder instead, executing nothing.
"""
from __future__ import annotations

import copy
import html
import json
import re
import shutil
import time
from pathlib import Path

from retrieval_lib.errors import ExpectedError, MissingDataError

__all__ = ["build_site", "executed_notebooks", "static_widgets", "render_notebook", "main_site",
           "WIDGET_VIEW", "WIDGET_STATE"]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")
_NB_NAME = re.compile(r"^\d\d_[\w-]+$")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; line-height: 1.45; color: #1f2328; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.5rem; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.failed { color: #b42318; font-weight: 600; }
.note { color: #57606a; }
"""
_WIDGET_CSS = """
.rl-nav { font-family: system-ui, sans-serif; padding: 0.5rem 1rem; border-bottom: 1px solid #d0d7de;
          margin-bottom: 1rem; }
.rl-widget { border-left: 4px solid #0969da; background: #f6f8fa; padding: 0.5rem 0.9rem; margin: 0.3rem 0;
             font-family: system-ui, sans-serif; font-size: 0.92rem; }
.rl-widget ul { margin: 0.3rem 0; }
"""


# ---------------------------------------------------------------- reading a reproduce run
def executed_notebooks(run_dir) -> list[Path]:
    """The executed notebooks of a reproduce folder, in order: ``RUN/notebooks/NN_x/NN_x.ipynb``.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no executed notebook.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise MissingDataError(f"no reproduce run at {run_dir}: run `python -m retrieval_lib reproduce --out "
                                f"{run_dir}` first, or leave out --from to execute the notebooks now")
    found = sorted(p for p in run_dir.glob("notebooks/*/[0-9][0-9]_*.ipynb")
                   if p.parent.name == p.stem and _NB_NAME.match(p.stem))
    if not found:
        raise MissingDataError(f"{run_dir} holds no executed notebook (expected notebooks/NN_name/NN_name.ipynb, "
                                "as `python -m retrieval_lib reproduce --out DIR` writes them); point --from at "
                                "that DIR, or leave out --from to execute the notebooks now")
    return found


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def notebook_title(nb, default: str) -> str:
    """The text of the first markdown heading (without the ``#``), else ``default``."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            m = re.search(r"^#+\s+(.+?)\s*$", _source(cell), re.M)
            if m:
                return m.group(1)
    return default


def _was_executed(nb) -> bool:
    return any(c.get("cell_type") == "code" and c.get("execution_count") is not None for c in nb["cells"])


def _first_error(nb):
    """Where the run stopped: ``(code cell number, what happened)``, or None when every code cell ran.

    The first error output; else, when code cells were left unexecuted after others ran (a
    cell that timed out leaves no error output), the last code cell that ran.
    """
    code = [c for c in nb["cells"] if c.get("cell_type") == "code"]
    for k, cell in enumerate(code):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return k, f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"
    ran = [k for k, c in enumerate(code) if c.get("execution_count") is not None]
    if not ran:
        return None
    left = [k for k, c in enumerate(code) if k > ran[-1] and _source(c).strip()]
    if left:
        return ran[-1], (f"the run ended here: code cells {left[0]} to {left[-1]} did not run "
                         "(a cell that runs out of time leaves no error output)")
    return None


# ---------------------------------------------------------------- widgets -> static notes
def _has_image(cell) -> bool:
    return any(m in out.get("data", {}) for out in cell.get("outputs", []) for m in IMAGE_MIMES)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _controls(model_id: str, state: dict) -> list[dict]:
    """The controls inside the widget ``model_id`` (a ``VBox`` of sliders + an ``Output``), from the saved state."""
    model = state.get(model_id)
    if model is None:
        return []
    st = model.get("state", {})
    children = [c.split("IPY_MODEL_", 1)[-1] for c in st.get("children", [])]
    if not children:
        children = [model_id]
    out = []
    for cid in children:
        child = state.get(cid, {})
        cs = child.get("state", {})
        name = child.get("model_name", "")
        if name == "OutputModel" or not name.endswith("Model") or name.endswith(("LayoutModel", "StyleModel")):
            continue
        kind = name[: -len("Model")]
        ctl = {"kind": kind, "description": cs.get("description", "")}
        if "_options_labels" in cs:
            ctl["options"] = list(cs["_options_labels"])
            idx = cs.get("index")
            if isinstance(idx, int) and 0 <= idx < len(ctl["options"]):
                ctl["value"] = ctl["options"][idx]
        else:
            for key in ("min", "max", "value", "base"):
                if key in cs:
                    ctl[key] = cs[key]
        out.append(ctl)
    return out


def _controls_from_repr(text: str) -> list[dict]:
    """Controls named in a widget's ``text/plain`` repr, when the notebook saved no widget state."""
    kinds = list(re.finditer(r"\b(\w+(?:Slider|Buttons|Dropdown|Text|Checkbox|Select\w*))\(", text))
    found = []
    for m, nxt in zip(kinds, kinds[1:] + [None]):
        args = text[m.end(): nxt.start() if nxt else len(text)]
        d = re.search(r"description='((?:[^'\\]|\\.)*)'", args)
        found.append({"kind": m.group(1), "description": d.group(1) if d else ""})
    return found


def _control_html(ctl: dict) -> str:
    label = html.escape(ctl.get("description") or "(no description)")
    if "options" in ctl:
        choice = ", ".join(html.escape(str(o)) for o in ctl["options"])
        rest = f"one of {choice}"
    elif "min" in ctl and "max" in ctl:
        lo, hi = ctl["min"], ctl["max"]
        if ctl.get("kind") == "FloatLogSlider":  # min/max are exponents of the base
            b = ctl.get("base", 10)
            lo, hi = b ** lo, b ** hi
        rest = f"from {_fmt_value(lo)} to {_fmt_value(hi)}"
    else:
        rest = html.escape(ctl.get("kind", "control"))
    start = f", drawn at {html.escape(_fmt_value(ctl['value']))}" if "value" in ctl else ""
    return f"<li><b>{label}</b>: {rest}{start}</li>"


def static_widgets(nb) -> tuple[dict, list[dict]]:
    """A copy of the executed notebook ``nb`` (a dict) with every live widget made static.

    Each widget view output becomes a ``text/html`` note (``<div class="rl-widget"
    data-figure-cell="cell-id=ID">``) listing the widget's controls, pointing at the cell
    whose figure the widget redraws in Jupyter: the same cell when it holds an image, else
    the closest earlier code cell that does. The widget state is dropped (without a kernel
    nothing could move). Returns ``(notebook, widgets)``, one dict per widget with
    ``cell`` (the widget's cell id), ``figure_cell`` (``None`` when no figure precedes it)
    and ``controls``.
    """
    nb = copy.deepcopy(nb)
    state = nb.get("metadata", {}).pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    widgets = []
    figure_cell = None
    for i, cell in enumerate(nb["cells"]):
        if not cell.get("id"):  # nbformat < 4.5: give every cell an id, the anchor a note points at
            cell["id"] = f"cell-{i}"
        if cell.get("cell_type") != "code":
            continue
        if _has_image(cell):
            figure_cell = cell["id"]
        outputs = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                outputs.append(out)
                continue
            controls = _controls(view.get("model_id", ""), state) or \
                _controls_from_repr(_text(out["data"].get("text/plain", "")))
            target = figure_cell
            where = (f'the figure <a href="#cell-id={html.escape(target)}">above</a>' if target is not None
                     else "a figure (none was drawn before this cell in this run)")
            note = (f'<div class="rl-widget" data-figure-cell="cell-id={html.escape(target or "")}">'
                    f"<b>Interactive in Jupyter.</b> With a live kernel these controls redraw {where}:"
                    f"<ul>{''.join(_control_html(c) for c in controls)}</ul>"
                    "Open the notebook in JupyterLab or Colab to move them.</div>")
            outputs.append({"output_type": "display_data", "metadata": {},
                            "data": {"text/html": note, "text/plain": "(interactive widget; see the figure above)"}})
            widgets.append({"cell": cell["id"], "figure_cell": target, "controls": controls})
        cell["outputs"] = outputs
    nb.setdefault("metadata", {})
    nb["nbformat"], nb["nbformat_minor"] = 4, max(int(nb.get("nbformat_minor", 5)), 5)
    return nb, widgets


# ---------------------------------------------------------------- rendering
def _exporter():
    """nbconvert's HTML exporter with the JupyterLab template; its alt-text warnings silenced (alts are set below)."""
    import logging

    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True)
    quiet = logging.getLogger("retrieval_lib.site.nbconvert")
    quiet.setLevel(logging.ERROR)
    exporter.log = quiet
    return exporter


_NO_ALT = 'alt="No description has been provided for this image"'


def render_notebook(nb, title: str, nav: str = "", exporter=None) -> str:
    """One executed notebook (a dict, widgets already static) as a self-contained HTML page.

    Output images get the alt text "<title>: figure k"; ``nav`` (HTML) goes at the top of
    the page; ``exporter`` reuses an nbconvert exporter across pages (faster).
    """
    import nbformat

    node = nbformat.from_dict(nb)
    for cell in node.cells:  # a notebook read as plain JSON keeps sources as lists of lines
        cell.source = _source(cell)
    body, _ = (exporter or _exporter()).from_notebook_node(node, resources={"metadata": {"name": title}})
    counter = iter(range(1, 1 << 30))
    body = re.sub(re.escape(_NO_ALT), lambda m: f'alt="{html.escape(title)}: figure {next(counter)}"', body)
    extra = f"<style>{_WIDGET_CSS}</style>"
    body = body.replace("</head>", extra + "\n</head>", 1)
    if nav:
        body, n = re.subn(r"(<main[^>]*>)", lambda m: m.group(1) + nav, body, count=1)
        if n == 0:
            body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, body, count=1)
    return body


def _markdown(text: str) -> str:
    from nbconvert.filters.markdown import markdown2html

    return markdown2html(text)


def _nav(pages: list[dict], k: int) -> str:
    parts = ['<a href="index.html">Contents</a>']
    if k > 0:
        parts.append(f'← <a href="{pages[k - 1]["html"]}">{html.escape(pages[k - 1]["name"])}</a>')
    if k + 1 < len(pages):
        parts.append(f'<a href="{pages[k + 1]["html"]}">{html.escape(pages[k + 1]["name"])}</a> →')
    return '<nav class="rl-nav">' + " · ".join(parts) + "</nav>"


def _widgets_cell(widgets: list[dict]) -> str:
    """The index's summary of a page's widgets: their controls' descriptions."""
    if not widgets:
        return "–"
    names = [html.escape(c.get("description") or "(no description)") for w in widgets for c in w["controls"]]
    return f"{len(widgets)}: " + ", ".join(names)


def _index_html(pages: list[dict], run_dir: Path, scale: str | None) -> str:
    rows = []
    for p in pages:
        status = "ran" if p["error"] is None else (f'<span class="failed">stopped in code cell {p["error"][0]}: '
                                                     f'{html.escape(p["error"][1][:200])}</span>')
        secs = "–" if p["seconds"] is None else f"{p['seconds']:.1f}"
        rows.append(f'<tr><td><a href="{p["html"]}">{html.escape(p["name"])}</a></td>'
                    f"<td>{html.escape(p['title'])}</td><td class=\"num\">{secs}</td>"
                    f"<td>{status}</td><td class=\"num\">{p['figures']}</td><td>{_widgets_cell(p['widgets'])}</td>"
                    f'<td><a href="{p["ipynb"]}">.ipynb</a></td></tr>')
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>The runnable textbook of deep image retrieval: executed notebooks</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>The runnable textbook of deep image retrieval</h1>",
        '<p class="note">Every page below is a notebook as it ran'
        + (f" at <b>{html.escape(scale)}</b> scale" if scale else "") +
        " (numbers and figures come from that run). Widgets are shown as the figure they start from; "
        "open a notebook in JupyterLab or Colab to move its sliders.</p>",
        '<h2 id="notebooks">Notebooks</h2>',
        '<table class="notebooks"><thead><tr><th>notebook</th><th>title</th><th>run time (s)</th><th>status</th>'
        "<th>figures</th><th>widgets</th><th>executed copy</th></tr></thead><tbody>",
        *rows, "</tbody></table>",
    ]
    results = run_dir / "results.md"
    parts.append('<h2 id="results">Results</h2>')
    if results.is_file():
        parts.append(f'<div class="results">{_markdown(results.read_text(encoding="utf-8"))}</div>')
    else:
        parts.append(f'<p class="failed">No results table: {html.escape(str(results))} is missing (reproduce '
                     "writes it once every notebook has run).</p>")
    offtheshelf = run_dir / "offtheshelf.md"
    if offtheshelf.is_file():
        parts += ['<h2 id="offtheshelf">Off-the-shelf descriptors</h2>',
                  f'<div class="offtheshelf">{_markdown(offtheshelf.read_text(encoding="utf-8"))}</div>']
    parts.append("</body></html>")
    return "\n".join(parts)


def _seconds_by_notebook(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    try:
        docs = json.loads(path.read_text())
        return {d["notebook"]: d.get("seconds") for d in docs if isinstance(d, dict) and "notebook" in d}
    except (OSError, ValueError, TypeError):
        return {}


def build_site(run_dir, out_dir) -> dict:
    """Render a reproduce folder ``run_dir`` into ``out_dir``: ``index.html`` + one page per notebook.

    Pages are ``out_dir/NN_name.html``; the executed notebooks are copied to
    ``out_dir/ipynb/``. ``out_dir`` may be ``run_dir``'s parent (``site/run`` is where
    ``python -m retrieval_lib site`` puts its own run). Returns ``{"index": Path, "pages":
    [page info], "seconds": rendering time}``; each page info holds ``name``, ``title``,
    ``html``, ``ipynb``, ``seconds`` (run time from results.json, or None), ``error``
    (``(code cell, message)`` or None), ``figures`` (images) and ``widgets`` (from
    :func:`static_widgets`).

    Raises:
        FileNotFoundError: ``run_dir`` holds no executed notebook (:func:`executed_notebooks`).
        ValueError: a notebook there was never executed (no execution counts).
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    paths = executed_notebooks(run_dir)
    seconds = _seconds_by_notebook(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ipynb").mkdir(exist_ok=True)
    pages, docs, scale = [], [], None
    import nbformat

    for path in paths:
        nb = nbformat.read(path, as_version=4)  # sources as strings, as nbconvert wants them
        if not _was_executed(nb):
            raise ValueError(f"{path} was never executed (no code cell has an execution count); build the site "
                             "from a folder written by `python -m retrieval_lib reproduce`")
        scale = scale or nb.get("metadata", {}).get("papermill", {}).get("parameters", {}).get("SCALE")
        static, widgets = static_widgets(nb)
        figures = sum(1 for c in static["cells"] for o in c.get("outputs", []) for m in IMAGE_MIMES
                      if m in o.get("data", {}))
        pages.append({"name": path.stem, "title": notebook_title(nb, path.stem), "html": f"{path.stem}.html",
                      "ipynb": f"ipynb/{path.name}", "seconds": seconds.get(path.stem), "error": _first_error(nb),
                      "figures": figures, "widgets": widgets})
        docs.append(static)
        shutil.copyfile(path, out_dir / "ipynb" / path.name)
    exporter = _exporter()
    for k, (page, static) in enumerate(zip(pages, docs)):
        body = render_notebook(static, f"{page['name']}: {page['title']}", nav=_nav(pages, k), exporter=exporter)
        (out_dir / page["html"]).write_text(body, encoding="utf-8")
    index = out_dir / "index.html"
    index.write_text(_index_html(pages, run_dir, scale), encoding="utf-8")
    return {"index": index, "pages": pages, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- command line
def main_site(args) -> int:
    """Entry point behind ``python -m retrieval_lib site`` (arguments of ``reproduce`` plus ``--from``).

    Without ``--from``, runs ``reproduce`` with the same arguments into ``OUT/run`` first;
    if a notebook fails there, the pages of what ran are still built (the index names the
    error) and the exit code is 1.
    """
    t0 = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    status = 0
    if args.from_dir:
        run_dir = Path(args.from_dir).expanduser().resolve()
        executed_notebooks(run_dir)  # a missing or empty run folder is refused before anything is written
    else:
        from retrieval_lib.book.reproduce import main_reproduce

        run_dir = out / "run"
        rep_args = copy.copy(args)
        rep_args.out = str(run_dir)
        try:
            status = main_reproduce(rep_args)
        except ExpectedError:  # refused arguments or missing data: nothing ran, nothing to show
            raise
        except Exception as err:  # a failing notebook: still show what ran, then fail
            print(f"reproduce stopped: {type(err).__name__}: {str(err)[:500]}")
            status = 1
    run_seconds = time.perf_counter() - t0
    built = build_site(run_dir, out)
    failed = [p["name"] for p in built["pages"] if p["error"] is not None]
    print(f"site: {built['index']} ({len(built['pages'])} notebooks"
          + (f", {len(failed)} stopped with an error: {', '.join(failed)}" if failed else "")
          + f"); rendering {built['seconds']:.1f} s"
          + ("" if args.from_dir else f", executing {run_seconds:.1f} s")
          + f", total {time.perf_counter() - t0:.1f} s")
    return 1 if (status or failed) else 0
