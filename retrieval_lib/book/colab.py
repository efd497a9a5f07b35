"""Opening the notebooks in Google Colab: the repository's URL, the install cell, and its sync.

The repository URL lives in exactly one place, :data:`REPO_URL`. Everything else is made
from it: the first code cell of every notebook (:func:`install_cell_source`), the "Open in
Colab" links (:func:`colab_url`) and the ``pip install`` line the README shows. A fork
changes :data:`REPO_URL`, then runs::

    python -m retrieval_lib.book.colab            # rewrite every notebook's install cell and the README's links
    python -m retrieval_lib.book.colab --check    # exit 1 and name the notebooks that differ

``tests/test_colab.py`` fails while a notebook's install cell differs from the rendered one,
or while the README does not show :data:`REPO_URL`.

The install cell runs before the package can be imported (in Colab it is what installs
it), so it cannot import :data:`REPO_URL`: the sync writes the URL into it. Outside Colab
(Jupyter, papermill, nbval, the tests) it does nothing: it is guarded by
``"google.colab" in sys.modules``, which holds only inside a Colab kernel. In Colab it then
calls :func:`colab_setup`: ``RETRIEVAL_DATA`` defaults to :data:`COLAB_DATA_ROOT`, and nothing
is downloaded yet. The notebook's ``parameters`` cell decides the scale (``SCALE``: by default
``full`` on a GPU runtime and ``cpu`` otherwise, :func:`~retrieval_lib.book.config.default_scale`);
right after that cell has run, :func:`fetch_for_scale` downloads what the notebooks use at that
scale (:func:`~retrieval_lib.book.needs.default_downloads`) into the data root (``DATA_ROOT`` when
the cell sets one): real171 from its public sources at ``smoke``/``cpu`` (87 MB of sources, so the
CPU runtime runs on real photos); at ``full`` revisited Oxford, real171 (05-08's honest split) and
the two released networks 05 and 08 measure. rSfM-120k and CUB-200-2011 are fetched only on request
(the notebooks that use them say how). Each item is fetched only when missing, so a second notebook
in the same runtime downloads nothing. The hook is IPython's ``post_run_cell``
event, registered by :func:`colab_setup` and removed once it has fired.

How the sync finds the cell (:func:`sync_notebook`): a code cell whose first line is
:data:`MARKER` (a rendered install cell, or the placeholder of a new notebook, whose whole
source is the marker); else the first code cell that tests for ``google.colab`` (the
older hand-written cell); else a new cell is inserted right after the title (the first
markdown cell).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
import warnings
from pathlib import Path

from retrieval_lib.book.downloads import fetch_item
from retrieval_lib.book.needs import default_downloads
from retrieval_lib.book.reproduce import find_notebooks
from retrieval_lib.errors import ExpectedError, FetchError

__all__ = ["REPO_URL", "MARKER", "COLAB_DATA_ROOT", "install_cell_source", "pip_target", "colab_url", "colab_setup",
           "fetch_for_scale", "notebook_install_cell", "sync_notebook", "sync_notebooks", "sync_readme", "main"]

REPO_URL = "https://github.com/deep-retrieval-textbook/deep-retrieval-textbook"
"""The repository every notebook installs from in Colab (a fork edits this line, then runs the sync)."""

BRANCH = "main"
"""The branch the "Open in Colab" links open."""

MARKER = "# colab install cell"
"""First line of the install cell: how the sync finds it (a new notebook's placeholder is this line alone)."""

COLAB_DATA_ROOT = "/content/data"
"""Where data goes in Colab when ``RETRIEVAL_DATA`` is unset (the runtime's local disk)."""


def pip_target(repo_url: str = REPO_URL) -> str:
    """What ``pip install`` gets in Colab: ``git+<repo_url>.git``."""
    url = repo_url.rstrip("/")
    return "git+" + (url if url.endswith(".git") else url + ".git")


def install_cell_source(repo_url: str = REPO_URL) -> str:
    """The source of the install cell, rendered from ``repo_url`` (default :data:`REPO_URL`)."""
    return (
        f"{MARKER}: in Colab, install retrieval_lib from the repository; anywhere else this does nothing.\n"
        "# Written by `python -m retrieval_lib.book.colab` from REPO_URL in retrieval_lib/book/colab.py (edit it there).\n"
        "import subprocess, sys\n"
        "if \"google.colab\" in sys.modules:\n"
        "    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\",\n"
        f"                    \"{pip_target(repo_url)}\"], check=True)\n"
        "    from retrieval_lib.book.colab import colab_setup\n"
        "    colab_setup()  # data root /content/data; the data SCALE needs is fetched after the parameters cell"
    )


def fetch_for_scale(scale: str | None = None, root=None, progress: bool = True) -> str:
    """Download what the notebooks use at ``scale`` into the data root ``root`` (default ``RETRIEVAL_DATA``);
    return the items, joined by ``+``.

    The items are :func:`~retrieval_lib.book.needs.default_downloads` -- the same list each notebook's
    needs cell checks: ``smoke`` and ``cpu`` measure real171 (built from its public sources); ``full``
    measures revisited Oxford, trains 05-08's heads on real171's honest split and shows two released
    networks (``"roxford5k+real171+rSfM120k-tl-resnet101-gem-w+retrievalSfM120k-resnet101-gem"``).
    Each goes through ``python -m retrieval_lib download``'s code (:func:`~retrieval_lib.book.downloads.fetch_item`),
    which skips what is already there. Every item is tried; those that failed are named in one
    :class:`~retrieval_lib.errors.FetchError` at the end.
    """
    root = root or os.environ.get("RETRIEVAL_DATA")
    items, failed = default_downloads(scale), []
    for item in items:
        try:
            fetch_item(item, root, progress=progress)
        except ExpectedError as err:
            failed.append(str(err) if str(err).startswith(item) else f"{item}: {err}")
    if failed:
        raise FetchError("; ".join(failed))
    return "+".join(items)


_HOOKS: list = []  # the callback colab_setup registered last


def _after_parameters(shell, progress: bool):
    """A ``post_run_cell`` callback: once a cell has left ``SCALE`` in the notebook's namespace
    (the parameters cell), fetch that scale's data and unregister itself."""

    def callback(result=None):
        if "SCALE" not in shell.user_ns or (result is not None and not getattr(result, "success", True)):
            return
        shell.events.unregister("post_run_cell", callback)
        scale, root = shell.user_ns["SCALE"], shell.user_ns.get("DATA_ROOT")
        try:
            fetch_for_scale(scale, root, progress=progress)
        except ExpectedError as err:  # the notebook still runs: offline default (cpu) or a clear error (full)
            warnings.warn(f"the data for scale {scale!r} could not be fetched: {err}", stacklevel=2)

    return callback


def colab_setup(root: str | None = None, progress: bool = True, shell=None) -> str:
    """What the install cell does in Colab once the package is installed; returns the data root.

    Sets ``RETRIEVAL_DATA`` to ``root`` (default :data:`COLAB_DATA_ROOT`) unless it is set, and
    downloads nothing: the parameters cell, which runs later, decides the scale. Registers on
    the IPython ``shell`` (default: the running one) a ``post_run_cell`` callback that, after the
    first cell that defines ``SCALE``, calls :func:`fetch_for_scale` with that ``SCALE`` and the
    cell's ``DATA_ROOT`` (real171 at ``smoke``/``cpu``, revisited Oxford at ``full``). Without
    IPython (a plain script) it fetches for :func:`~retrieval_lib.book.config.default_scale` at once.
    """
    os.environ.setdefault("RETRIEVAL_DATA", root or COLAB_DATA_ROOT)
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            get_ipython = None
        shell = get_ipython() if get_ipython is not None else None
    if shell is None:
        fetch_for_scale(None, os.environ["RETRIEVAL_DATA"], progress=progress)
    else:
        for old in _HOOKS:  # the install cell run again: one callback, not one per run
            if old in shell.events.callbacks.get("post_run_cell", []):
                shell.events.unregister("post_run_cell", old)
        _HOOKS[:] = [_after_parameters(shell, progress)]
        shell.events.register("post_run_cell", _HOOKS[0])
    return os.environ["RETRIEVAL_DATA"]


def colab_url(notebook: str, repo_url: str = REPO_URL, branch: str = BRANCH) -> str:
    """The "Open in Colab" address of ``notebooks/<notebook>`` (a name such as ``"03_gem.ipynb"``)."""
    prefix = "https://github.com/"
    if not repo_url.startswith(prefix):
        raise ValueError(f"Colab opens notebooks from GitHub; REPO_URL {repo_url!r} does not start with {prefix}")
    path = repo_url[len(prefix):].rstrip("/").removesuffix(".git")
    name = notebook if notebook.endswith(".ipynb") else notebook + ".ipynb"
    return f"https://colab.research.google.com/github/{path}/blob/{branch}/notebooks/{name}"


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _is_install_cell(cell) -> bool:
    return cell["cell_type"] == "code" and _src(cell).lstrip().startswith(MARKER)


def _is_legacy_install_cell(cell) -> bool:
    src = _src(cell)
    return cell["cell_type"] == "code" and "google.colab" in src and "pip" in src


def notebook_install_cell(doc: dict) -> int | None:
    """Index (among all cells) of the notebook's install cell as the sync finds it; ``None`` if it has none."""
    for i, cell in enumerate(doc["cells"]):
        if _is_install_cell(cell):
            return i
    for i, cell in enumerate(doc["cells"]):
        if cell["cell_type"] == "code":  # the older hand-written cell was the first code cell
            return i if _is_legacy_install_cell(cell) else None
    return None


def _code_cell(source: str, like: dict | None = None) -> dict:
    """A code cell without outputs holding ``source``; ``like``'s other fields (id, metadata) are kept."""
    cell = dict(like or {"cell_type": "code", "metadata": {}})
    cell.update(cell_type="code", execution_count=None, outputs=[], source=source.splitlines(keepends=True))
    return dict(sorted(cell.items()))  # the key order Jupyter writes


def sync_notebook(path, repo_url: str = REPO_URL, write: bool = True) -> bool:
    """Make the install cell of the notebook at ``path`` equal :func:`install_cell_source`.

    Returns whether the notebook differed (and, with ``write``, was rewritten). Only that
    cell changes; the file is written as the notebooks are (json, indent 1, UTF-8, final newline).

    Raises:
        ValueError: the notebook has no cell to replace and no markdown title to insert after.
    """
    path = Path(path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    want = install_cell_source(repo_url)
    i = notebook_install_cell(doc)
    if i is not None:
        cell = doc["cells"][i]
        if _src(cell) == want and not cell.get("outputs") and cell.get("execution_count") is None:
            return False
        doc["cells"][i] = _code_cell(want, like=cell)
    else:
        title = next((j for j, c in enumerate(doc["cells"]) if c["cell_type"] == "markdown"), None)
        if title is None:
            raise ValueError(f"{path} has no install cell (a code cell starting with {MARKER!r}) and no "
                             "markdown title to put one after; add a title cell first")
        like = None
        if (doc.get("nbformat", 4), doc.get("nbformat_minor", 0)) >= (4, 5):  # cells carry ids from 4.5 on
            like = {"cell_type": "code", "id": uuid.uuid4().hex[:8], "metadata": {}}
        doc["cells"].insert(title + 1, _code_cell(want, like=like))
    if write:
        path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def sync_notebooks(notebooks_dir=None, repo_url: str = REPO_URL, write: bool = True) -> list[Path]:
    """:func:`sync_notebook` on every ``NN_*.ipynb`` of ``notebooks_dir``; returns those that differed.

    ``notebooks_dir`` defaults to the checkout's ``notebooks/`` (as ``reproduce`` finds it).
    """
    return [nb for nb in find_notebooks(notebooks_dir) if sync_notebook(nb, repo_url, write=write)]


_README_PATTERNS = (  # (what, regex): each occurrence is rewritten from REPO_URL
    ("Colab links", r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/notebooks/"),
    ("pip target", r"git\+https://github\.com/[^/\s`'\")]+/[^/\s`'\")]+?\.git"),
    ("the constant", r'REPO_URL = "[^"]*"'),
)


def sync_readme(path, repo_url: str = REPO_URL, write: bool = True) -> bool:
    """Rewrite the README's Colab links, its ``pip install git+...`` target and the ``REPO_URL = "..."``
    line it shows from ``repo_url``; return whether anything differed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new_for = {"Colab links": colab_url("X.ipynb", repo_url).removesuffix("X.ipynb"),
               "pip target": pip_target(repo_url), "the constant": f'REPO_URL = "{repo_url}"'}
    new = text
    for what, pattern in _README_PATTERNS:
        new = re.sub(pattern, lambda m, w=what: new_for[w], new)
    if new == text:
        return False
    if write:
        path.write_text(new, encoding="utf-8")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrieval_lib.book.colab",
                                     description="Write the Colab install cell (from REPO_URL) into every notebook.")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a notebook's install cell differs from the rendered one")
    parser.add_argument("--notebooks-dir", default=None, help="where the NN_*.ipynb notebooks are")
    parser.add_argument("--readme", default=None,
                        help="the README whose Colab links and pip line follow REPO_URL (default: the checkout's "
                             "README.md beside the notebooks folder; 'none' to leave it)")
    args = parser.parse_args(argv)
    changed = sync_notebooks(args.notebooks_dir, write=not args.check)
    readme = args.readme
    if readme is None:
        found = find_notebooks(args.notebooks_dir)
        readme = found[0].parent.parent / "README.md" if found else None
    if readme and str(readme) != "none" and Path(readme).is_file() and \
            sync_readme(readme, write=not args.check):
        changed.append(Path(readme))
    verb = "differs" if args.check else "rewritten"
    for nb in changed:
        print(f"{nb.name}: {'links' if nb.suffix == '.md' else 'install cell'} {verb}")
    if args.check and changed:
        print("run `python -m retrieval_lib.book.colab` to rewrite them from REPO_URL", file=sys.stderr)
        return 1
    if not changed:
        print(f"every install cell installs {pip_target()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
