"""A notebook's cells as the site shows them: live widgets as static notes, setup cells, this machine's paths.

* :func:`static_widgets` -- each live widget (``viz.live_figure``, the explorer's page)
  replaced by a note that names its controls (the ``description`` of each slider, its range
  and starting value) and points at the static figure the notebook drew with the same
  function, in that cell or the code cell before it;
* :func:`plumbing_cells` -- the setup cells of a chapter (Colab install, imports, parameters,
  papermill's injected parameters), which the page folds away;
* :func:`path_scrubber` and :func:`scrub_notebook` -- this machine's absolute paths written as a
  reader would pass them, on the pages and in the ``.ipynb`` copies.

Used by :func:`retrieval_lib.book.site.build_site`.
"""
from __future__ import annotations

import ast
import copy
import html
import os
import re
from pathlib import Path

from retrieval_lib.book.colab import MARKER
from retrieval_lib.book.site_math import plain_math, split_math

__all__ = ["static_widgets", "plumbing_cells", "plumbing_kind", "path_scrubber", "scrub_notebook", "plain_text",
           "cell_source", "cell_text", "WIDGET_VIEW", "WIDGET_STATE", "IMAGE_MIMES"]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")


def cell_source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def cell_text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


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
                _controls_from_repr(cell_text(out["data"].get("text/plain", "")))
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


def plumbing_kind(cell) -> str | None:
    if cell.get("cell_type") != "code":
        return None
    tags = cell.get("metadata", {}).get("tags", [])
    if "injected-parameters" in tags:
        return "the parameters this run passed"
    if "parameters" in tags:
        return "parameters"
    source = cell_source(cell)
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
        if plumbing_kind(cell) is None:
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


def scrub_notebook(nb, scrub) -> None:
    """Apply ``scrub`` to every text a page shows (sources, text outputs, errors), in place; images untouched."""
    for cell in nb["cells"]:
        cell["source"] = scrub(cell_source(cell))
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub(cell_text(out["text"]))
            for mime, value in list(out.get("data", {}).items()):
                if mime.startswith("text/") or mime in ("application/json",):
                    out["data"][mime] = scrub(cell_text(value)) if isinstance(value, (str, list)) else value
            if out.get("output_type") == "error":
                out["evalue"] = scrub(str(out.get("evalue", "")))
                out["traceback"] = [scrub(line) for line in out.get("traceback", [])]
    papermill = nb.get("metadata", {}).get("papermill", {})
    for where in (papermill, papermill.get("parameters")):
        if isinstance(where, dict):
            for k, v in where.items():
                if isinstance(v, str):
                    where[k] = scrub(v)


def plain_text(markdown: str) -> str:
    """A line of markdown with its equations as plain characters (for titles and links)."""
    return "".join(c if k == "text" else plain_math(c) for k, c in split_math(markdown))
