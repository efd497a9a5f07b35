"""The executed book as a static web site: ``python -m retrieval_lib site``.

:func:`build_site` turns a ``reproduce`` output folder (``python -m retrieval_lib reproduce
--out RUN``: the executed copies ``RUN/notebooks/NN_name/NN_name.ipynb``, ``results.md``,
``results.json``, ``offtheshelf.md``) into plain HTML files that any browser opens
without a server or a kernel:

- one page per executed notebook (nbconvert's JupyterLab template), its figures embedded
  as PNG data and its equations converted to MathML (:mod:`~retrieval_lib.book.site_math`),
  so a page is one self-contained file that loads no script and nothing from the network;
- the setup cells of each chapter (Colab install, imports, parameters, papermill's injected
  parameters: :func:`plumbing_cells`) folded in a collapsed ``<details>``; this machine's
  absolute paths written as a reader would pass them (:func:`path_scrubber`), on the pages and
  in the ``.ipynb`` copies; a link to the executed ``.ipynb`` and to Colab on every page;
- each live widget (``viz.live_figure``) replaced by a note that names its controls (the
  ``description`` of each slider, its range and starting value) and points at the
  static figure the notebook drew with the same function, in that cell or the code cell
  before it: a reader without a kernel sees the figure, not an empty widget area;
- ``index.html``: what the run measured first (the off-the-shelf table, each notebook's
  headline numbers -- its ``measured`` entries -- and its comparisons with an interval,
  :func:`headline_comparisons`), then paper vs. ours (the released networks of
  ``paper_networks.json`` when the run has one, the paper numbers measured in their own
  setting, the others folded into a count), then the notebooks (title, run time, status,
  links) and, folded, the run's whole ``results.md``.

``python -m retrieval_lib site --scale smoke|cpu|full --out site/`` first runs
``reproduce`` into ``site/run/`` (every notebook executed at that scale), then builds the
pages; ``--from RUN`` builds from an existing reproduce folder instead, executing nothing.
"""
from __future__ import annotations

import ast
import copy
import html
import json
import os
import re
import time
from pathlib import Path

from retrieval_lib.book.colab import MARKER, colab_url
from retrieval_lib.book.report import closest_measurement, explain_difference
from retrieval_lib.book.site_math import math_placeholders, plain_math, put_math_back, split_math
from retrieval_lib.errors import ExpectedError, MissingDataError, NotebooksFailed

__all__ = ["build_site", "executed_notebooks", "static_widgets", "render_notebook", "main_site",
           "plumbing_cells", "path_scrubber", "headline_comparisons", "WIDGET_VIEW", "WIDGET_STATE"]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")
_NB_NAME = re.compile(r"^\d\d_[\w-]+$")
_HERE = Path(__file__).resolve().parents[2]
_REPO = _HERE if (_HERE / "pyproject.toml").is_file() else None  # a checkout (not an installed copy)

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
_WIDGET_CSS = """
.rl-nav { font-family: system-ui, sans-serif; padding: 0.5rem 1rem; border-bottom: 1px solid #d0d7de;
          margin-bottom: 1rem; }
.rl-widget { border-left: 4px solid #0969da; background: #f6f8fa; padding: 0.5rem 0.9rem; margin: 0.3rem 0;
             font-family: system-ui, sans-serif; font-size: 0.92rem; }
.rl-widget ul { margin: 0.3rem 0; }
.rl-nav .rl-links { float: right; }
.rl-colab { display: inline-block; padding: 0.05rem 0.5rem; border-radius: 0.25rem; background: #f9ab00;
            color: #1f2328; font-weight: 600; text-decoration: none; font-size: 0.85rem; }
details.rl-setup { border: 1px solid #d0d7de; border-radius: 0.3rem; margin: 0.5rem 0; padding: 0.2rem 0.6rem; }
details.rl-setup > summary { cursor: pointer; color: #57606a; font-family: system-ui, sans-serif; font-size: 0.9rem; }
math[display="block"] { margin: 0.6em 0; }
math { font-size: 1.08em; }
.rl-tex-error { color: #b42318; }
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


_CONTAINERS = ("Box", "HBox", "VBox", "GridBox", "Tab", "Accordion", "Stack")
_DISPLAY_ONLY = ("HTML", "HTMLMath", "Label", "Image", "Output", "Valid", "Audio", "Video")


def _control(cs: dict, kind: str) -> dict:
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
    return ctl


def _controls(model_id: str, state: dict, _seen=None) -> list[dict]:
    """The controls inside the widget ``model_id``, from the saved state.

    A ``VBox`` of sliders + an ``Output`` (``viz.live_figure``) gives its sliders; a whole page of
    widgets (``10_explorer``'s app) is walked through its boxes, display-only models (HTML, images,
    outputs) are left out, a row of three or more buttons (or buttons that differ only by a number,
    such as thumbnails ``#0`` … ``#39``) becomes one entry naming them, and a control that appears
    twice is listed once.
    """
    seen = set() if _seen is None else _seen
    if model_id in seen or model_id not in state:
        return []
    seen.add(model_id)
    model = state[model_id]
    name = model.get("model_name", "")
    st = model.get("state", {})
    if not name.endswith("Model") or name.endswith(("LayoutModel", "StyleModel")):
        return []
    kind = name[: -len("Model")]
    if kind in _DISPLAY_ONLY:
        return []
    children = [c.split("IPY_MODEL_", 1)[-1] for c in st.get("children", [])]
    if kind not in _CONTAINERS and not children:
        return [_control(st, kind)]
    buttons = [c for c in children if state.get(c, {}).get("model_name") == "ButtonModel"]
    out = []
    if len(buttons) >= 3:
        labels = [state[c].get("state", {}).get("description", "") for c in buttons]
        shown = ", ".join(labels[:3]) + (", …" if len(labels) > 3 else "")
        out.append({"kind": "Button", "description": f"{len(buttons)} buttons ({shown})"})
        seen.update(buttons)
    for cid in children:
        for ctl in _controls(cid, state, seen):
            if ctl not in out:
                out.append(ctl)
    return out if _seen is not None else _collapse_numbered_buttons(out)


def _collapse_numbered_buttons(controls: list[dict]) -> list[dict]:
    """Buttons that differ only by a number (a grid of thumbnails ``#0``, ``#1``, ...) as one entry."""
    shapes: dict = {}
    for c in controls:
        if c["kind"] == "Button" and re.search(r"\d", c["description"]):
            shapes.setdefault(re.sub(r"\d+", "N", c["description"]), []).append(c["description"])
    many = {shape: labels for shape, labels in shapes.items() if len(labels) >= 3}
    out, done = [], set()
    for c in controls:
        shape = re.sub(r"\d+", "N", c["description"]) if c["kind"] == "Button" else None
        if shape in many:
            if shape not in done:
                labels = many[shape]
                out.append({"kind": "Button", "description": f"{len(labels)} buttons ({labels[0]} … {labels[-1]})"})
                done.add(shape)
            continue
        out.append(c)
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


# ---------------------------------------------------------------- chapters without plumbing
_PLUMBING_TAGS = ("parameters", "injected-parameters")


def _only_imports(source: str) -> bool:
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    return bool(body) and all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body)


def _plumbing_kind(cell) -> str | None:
    if cell.get("cell_type") != "code":
        return None
    tags = cell.get("metadata", {}).get("tags", [])
    if "injected-parameters" in tags:
        return "the parameters this run passed"
    if "parameters" in tags:
        return "parameters"
    source = _source(cell)
    if source.lstrip().startswith(MARKER):
        return "Colab install"
    if _only_imports(source):
        return "imports"
    return None


def plumbing_cells(nb) -> list[int]:
    """Indices of the cells that set a chapter up: its first run of code cells that are the Colab
    install cell (``colab.MARKER``), import-only cells, the ``parameters`` cell and papermill's
    ``injected-parameters`` cell. The site folds them; a later import cell is part of the text."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code" and not found:
            continue  # the title and the introduction before the setup
        if _plumbing_kind(cell) is None:
            break
        found.append(i)
    return found


_ABSOLUTE = re.compile(r"(?<![\w.~:/\\-])/(?:tmp|home|root|work|Users|usr|opt|var|mnt|srv|private|data|scratch)"
                       r"/[^\s\"'<>`)\]},;]*")


def path_scrubber(run_dir, parameters: dict | None = None, repo=None):
    """A function ``str -> str`` that writes this machine's absolute paths the way a reader would pass them.

    A path inside ``run_dir`` becomes ``<run folder name>/<rest>`` (``run/notebooks/03_gem``,
    as ``reproduce --out run`` would make it), a path parameter outside it (``DATA_ROOT``)
    becomes its name in capitals (``DATA_ROOT``: the folder you pass), the home folder ``~``, a
    file of an installed package ``site-packages/...``, one of the checkout ``repo`` its path
    in the checkout, and any other absolute path under a usual root (``/tmp``, ``/home``,
    ``/work``, ``/usr``, ...) ``…/<last two parts>``.
    """
    run_dir = Path(run_dir)
    prefixes = [(str(run_dir), run_dir.name)]
    for name, value in (parameters or {}).items():
        if isinstance(value, str) and os.path.isabs(value) and not value.startswith(str(run_dir)):
            prefixes.append((value.rstrip("/"), name))
    if repo is not None:
        prefixes.append((str(Path(repo)), "."))
    prefixes.append((str(Path.home()), "~"))
    prefixes.sort(key=lambda p: -len(p[0]))  # the longest first: run_dir inside home stays run_dir

    def one(m):
        path = m.group(0)
        tail = path[len(path.rstrip(".:!?")):]  # "... in /tmp/run:" -- the colon is the sentence's
        path = path[:len(path) - len(tail)]
        for prefix, short in prefixes:
            if prefix and prefix != "/" and (path == prefix or path.startswith(prefix + "/")):
                return short + path[len(prefix):] + tail
        if "/site-packages/" in path:
            return "site-packages/" + path.split("/site-packages/", 1)[1] + tail
        parts = [p for p in path.split("/") if p]
        return "…/" + "/".join(parts[-2:]) + tail

    def scrub(text: str) -> str:
        return _ABSOLUTE.sub(one, text) if "/" in text else text

    return scrub


def _scrub_notebook(nb, scrub) -> None:
    """Apply ``scrub`` to every text a page shows (sources, text outputs, errors), in place; images untouched."""
    for cell in nb["cells"]:
        cell["source"] = scrub(_source(cell))
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub(_text(out["text"]))
            for mime, value in list(out.get("data", {}).items()):
                if mime.startswith("text/") or mime in ("application/json",):
                    out["data"][mime] = scrub(_text(value)) if isinstance(value, (str, list)) else value
            if out.get("output_type") == "error":
                out["evalue"] = scrub(str(out.get("evalue", "")))
                out["traceback"] = [scrub(line) for line in out.get("traceback", [])]
    papermill = nb.get("metadata", {}).get("papermill", {})
    for where in (papermill, papermill.get("parameters")):
        if isinstance(where, dict):
            for k, v in where.items():
                if isinstance(v, str):
                    where[k] = scrub(v)


def _math_to_placeholders(nb, table: list) -> None:
    """Every equation of the markdown cells and the markdown outputs replaced by a placeholder, in place."""
    for cell in nb["cells"]:
        if cell.get("cell_type") == "markdown":
            cell["source"] = math_placeholders(_source(cell), table)
        for out in cell.get("outputs", []):
            if "text/markdown" in out.get("data", {}):
                out["data"]["text/markdown"] = math_placeholders(_text(out["data"]["text/markdown"]), table)


def plain_text(markdown: str) -> str:
    """A line of markdown with its equations as plain characters (for titles and links)."""
    return "".join(c if k == "text" else plain_math(c) for k, c in split_math(markdown))


def _fold(page: str, nb, cells: list[int], summary: str) -> str:
    """Wrap the rendered cells ``cells`` (consecutive) of ``page`` in a collapsed ``<details class="rl-setup">``."""
    if not cells:
        return page
    first = page.find(f'id="cell-id={nb["cells"][cells[0]]["id"]}"')
    if first < 0:
        return page
    start = page.rfind("<div", 0, first)
    end = -1
    if cells[-1] + 1 < len(nb["cells"]):
        nxt = page.find(f'id="cell-id={nb["cells"][cells[-1] + 1]["id"]}"', first)
        end = page.rfind("<div", 0, nxt) if nxt > 0 else -1
    if end < 0:
        end = page.find("</main>", first)
    if start < 0 or end < 0:
        return page
    return (page[:start] + f'<details class="rl-setup"><summary>{summary}</summary>\n' + page[start:end]
            + "</details>\n" + page[end:])


_CDN_SCRIPT = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>\s*')
_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)


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


def render_notebook(nb, title: str, nav: str = "", exporter=None, math_failures: list | None = None) -> str:
    """One executed notebook (a dict, widgets already static) as a self-contained HTML page.

    Every ``$...$`` and ``$$...$$`` of the markdown (cells and markdown outputs) is MathML
    (:mod:`~retrieval_lib.book.site_math`), so the page needs no script and no network; the
    CDN scripts of nbconvert's template (MathJax, require.js) are left out. The setup cells
    (:func:`plumbing_cells`) are folded in a collapsed ``<details class="rl-setup">``. Output
    images get the alt text "<title>: figure k"; ``nav`` (HTML) goes at the top of the page;
    ``exporter`` reuses an nbconvert exporter across pages (faster); an equation that cannot be
    converted is shown as its source and appended to ``math_failures`` as ``(tex, message)``.
    """
    import nbformat

    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb["cells"]):
        cell.setdefault("id", f"cell-{i}")
    setup = plumbing_cells(nb)
    table: list = []
    _math_to_placeholders(nb, table)
    node = nbformat.from_dict(nb)
    for cell in node.cells:  # a notebook read as plain JSON keeps sources as lists of lines
        cell.source = _source(cell)
    title = plain_text(title)
    body, _ = (exporter or _exporter()).from_notebook_node(node, resources={"metadata": {"name": title}})
    body = _CDN_SCRIPT.sub("", _MATHJAX.sub("", body))
    if setup:
        kinds = []
        for i in setup:
            kind = _plumbing_kind(nb["cells"][i])
            if kind not in kinds:
                kinds.append(kind)
        passed = [line.strip() for i in setup if "injected-parameters" in nb["cells"][i].get("metadata", {}).get("tags", [])
                  for line in _source(nb["cells"][i]).splitlines() if line.strip() and not line.lstrip().startswith("#")]
        summary = "Setup code (" + ", ".join(kinds) + "): click to show"
        if passed:
            summary += ". This run: <code>" + html.escape("; ".join(passed)) + "</code>"
        body = _fold(body, nb, setup, summary)
    body, failures = put_math_back(body, table)
    if math_failures is not None:
        math_failures.extend(failures)
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
    """Markdown to HTML, its equations as MathML."""
    from nbconvert.filters.markdown import markdown2html

    table: list = []
    page, _ = put_math_back(markdown2html(math_placeholders(text, table)), table)
    return page


def _nav(pages: list[dict], k: int) -> str:
    parts = ['<a href="index.html">Contents</a>']
    if k > 0:
        parts.append(f'← <a href="{pages[k - 1]["html"]}">{html.escape(pages[k - 1]["name"])}</a>')
    if k + 1 < len(pages):
        parts.append(f'<a href="{pages[k + 1]["html"]}">{html.escape(pages[k + 1]["name"])}</a> →')
    page = pages[k]
    links = (f'<span class="rl-links"><a class="rl-ipynb" href="{page["ipynb"]}" download>executed notebook '
             f'(.ipynb)</a> · <a class="rl-colab" href="{html.escape(colab_url(page["name"]))}" '
             'title="Open this notebook in Google Colab">Open in Colab</a></span>')
    return '<nav class="rl-nav">' + links + " · ".join(parts) + "</nav>"


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


def _index_html(pages: list[dict], run_dir: Path, scale: str | None) -> str:
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
    (``(code cell, message)`` or None), ``figures`` (images), ``widgets`` (from
    :func:`static_widgets`) and ``math_failures`` (equations shown as source, see
    :func:`render_notebook`; none for the book's notebooks). Absolute paths of this machine are
    written as the reader would pass them (:func:`path_scrubber`) on the pages and in the copies.

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
        params = nb.get("metadata", {}).get("papermill", {}).get("parameters", {})
        scale = scale or params.get("SCALE")
        scrub = path_scrubber(run_dir, params, repo=_REPO)
        shown = copy.deepcopy(nb)
        _scrub_notebook(shown, scrub)  # the page and the copy show no path of this machine
        nbformat.write(shown, out_dir / "ipynb" / path.name)
        static, widgets = static_widgets(shown)
        figures = sum(1 for c in static["cells"] for o in c.get("outputs", []) for m in IMAGE_MIMES
                      if m in o.get("data", {}))
        pages.append({"name": path.stem, "title": notebook_title(nb, path.stem), "html": f"{path.stem}.html",
                      "ipynb": f"ipynb/{path.name}", "seconds": seconds.get(path.stem), "error": _first_error(nb),
                      "figures": figures, "widgets": widgets})
        docs.append(static)
    exporter = _exporter()
    for k, (page, static) in enumerate(zip(pages, docs)):
        failures: list = []
        body = render_notebook(static, f"{page['name']}: {page['title']}", nav=_nav(pages, k), exporter=exporter,
                               math_failures=failures)
        page["math_failures"] = failures
        (out_dir / page["html"]).write_text(body, encoding="utf-8")
    index = out_dir / "index.html"
    scrub = path_scrubber(run_dir, repo=_REPO)
    index.write_text(scrub(_index_html(pages, run_dir, scale)), encoding="utf-8")
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
        except NotebooksFailed as err:  # the run went on: show what ran, name what failed, then fail
            print(f"reproduce: {err}")
            status = err.exit_code
        except ExpectedError:  # refused arguments or missing data: nothing ran, nothing to show
            raise
        except Exception as err:  # a failing notebook: still show what ran, then fail
            print(f"reproduce stopped: {type(err).__name__}: {str(err)[:500]}")
            status = 1
    run_seconds = time.perf_counter() - t0
    built = build_site(run_dir, out)
    failed = [p["name"] for p in built["pages"] if p["error"] is not None]
    for p in built["pages"]:
        for tex, why in p.get("math_failures", []):
            print(f"site: {p['name']}: an equation is shown as its source: {why}")
    print(f"site: {built['index']} ({len(built['pages'])} notebooks"
          + (f", {len(failed)} stopped with an error: {', '.join(failed)}" if failed else "")
          + f"); rendering {built['seconds']:.1f} s"
          + ("" if args.from_dir else f", executing {run_seconds:.1f} s")
          + f", total {time.perf_counter() - t0:.1f} s")
    return 1 if (status or failed) else 0
