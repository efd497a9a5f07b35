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

import copy
import html
import json
import logging
import re
import time
from pathlib import Path

from retrieval_lib.book.colab import colab_url
from retrieval_lib.book.reproduce import main_reproduce
from retrieval_lib.book.site_cells import (IMAGE_MIMES, WIDGET_STATE, WIDGET_VIEW, cell_source, cell_text, path_scrubber,
                                           plain_text, plumbing_cells, plumbing_kind, scrub_notebook, static_widgets)
from retrieval_lib.book.site_front import headline_comparisons, index_html
from retrieval_lib.book.site_math import math_placeholders, put_math_back
from retrieval_lib.errors import ExpectedError, MissingDataError, NotebooksFailed

__all__ = ["build_site", "executed_notebooks", "static_widgets", "render_notebook", "main_site",
           "plumbing_cells", "path_scrubber", "headline_comparisons", "WIDGET_VIEW", "WIDGET_STATE"]

_NB_NAME = re.compile(r"^\d\d_[\w-]+$")


_HERE = Path(__file__).resolve().parents[2]


_REPO = _HERE if (_HERE / "pyproject.toml").is_file() else None  # a checkout (not an installed copy)


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


def notebook_title(nb, default: str) -> str:
    """The text of the first markdown heading (without the ``#``), else ``default``."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            m = re.search(r"^#+\s+(.+?)\s*$", cell_source(cell), re.M)
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
    left = [k for k, c in enumerate(code) if k > ran[-1] and cell_source(c).strip()]
    if left:
        return ran[-1], (f"the run ended here: code cells {left[0]} to {left[-1]} did not run "
                         "(a cell that runs out of time leaves no error output)")
    return None


def _math_to_placeholders(nb, table: list) -> None:
    """Every equation of the markdown cells and the markdown outputs replaced by a placeholder, in place."""
    for cell in nb["cells"]:
        if cell.get("cell_type") == "markdown":
            cell["source"] = math_placeholders(cell_source(cell), table)
        for out in cell.get("outputs", []):
            if "text/markdown" in out.get("data", {}):
                out["data"]["text/markdown"] = math_placeholders(cell_text(out["data"]["text/markdown"]), table)


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
        cell.source = cell_source(cell)
    title = plain_text(title)
    body, _ = (exporter or _exporter()).from_notebook_node(node, resources={"metadata": {"name": title}})
    body = _CDN_SCRIPT.sub("", _MATHJAX.sub("", body))
    if setup:
        kinds = []
        for i in setup:
            kind = plumbing_kind(nb["cells"][i])
            if kind not in kinds:
                kinds.append(kind)
        passed = [line.strip() for i in setup if "injected-parameters" in nb["cells"][i].get("metadata", {}).get("tags", [])
                  for line in cell_source(nb["cells"][i]).splitlines() if line.strip() and not line.lstrip().startswith("#")]
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
        scrub_notebook(shown, scrub)  # the page and the copy show no path of this machine
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
    index.write_text(scrub(index_html(pages, run_dir, scale)), encoding="utf-8")
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
