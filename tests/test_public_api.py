"""The public face: what ``retrieval_lib`` and ``retrieval_lib.book`` export is what the notebooks and scripts use.

* a notebook imports the library's names from ``retrieval_lib`` and the book's from
  ``retrieval_lib.book`` (the Colab install cell, written by ``book/colab.py``, and the
  ``parameters`` cell, which papermill and ``test_colab`` read as they are, excepted), and
  every name it imports is exported there;
* every name the top level exports is used by a notebook or a script of ``benchmarks/``
  (``seed_everything`` and ``start`` aside, the first thing a script and a notebook call, and
  ``Trainer``, the training engine's one class);
* no object is exported under two names, and the two faces share only ``start``.

The notebooks and scripts are read with ``ast``; nothing is executed.
"""
import ast
import inspect
import json
from pathlib import Path

import pytest

import retrieval_lib
import retrieval_lib.book as book

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ALWAYS = {"start", "seed_everything", "Trainer"}


def _imports(source: str):
    """``[(module, name)]`` of every ``from retrieval_lib... import name`` in some Python source."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrieval_lib")
            for alias in node.names]


def _fixed(cell) -> bool:
    """The Colab install cell and the parameters cell, whose imports other tests pin."""
    return "parameters" in cell.get("metadata", {}).get("tags", []) or "colab install cell" in "".join(cell["source"])


def _notebook_imports(every_cell: bool = False):
    """``{notebook: [(module, name)]}``, the fixed cells left out unless ``every_cell``."""
    out = {}
    for path in NOTEBOOKS:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        out[path.stem] = [imp for c in cells if every_cell or not _fixed(c) for imp in _imports("".join(c["source"]))]
    return out


def _script_imports():
    return [imp for path in sorted((REPO / "benchmarks").glob("*.py")) for imp in _imports(path.read_text())]


def test_the_faces_export_what_they_name():
    for face in (retrieval_lib, book):
        assert len(face.__all__) == len(set(face.__all__)), f"{face.__name__}.__all__ lists a name twice"
        missing = [n for n in face.__all__ if not hasattr(face, n)]
        assert not missing, f"{face.__name__}.__all__ names what it does not hold: {missing}"
    assert set(retrieval_lib.__all__) & set(book.__all__) == {"start"}
    assert retrieval_lib.start is book.start


def test_no_object_under_two_names():
    """One function or class, one public name (constants may coincide in value, so only callables count)."""
    names = {}
    for face in (retrieval_lib, book):
        for n in face.__all__:
            obj = getattr(face, n)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                names.setdefault(id(obj), set()).add(n)
    twice = [sorted(v) for v in names.values() if len(v) > 1]
    assert not twice, f"exported under two names: {twice}"


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in this checkout")
def test_notebooks_import_from_the_two_faces():
    wrong, missing = [], []
    for nb, imports in _notebook_imports().items():
        for module, name in imports:
            if module not in ("retrieval_lib", "retrieval_lib.book"):
                wrong.append(f"{nb}: from {module} import {name}")
            elif name not in (retrieval_lib if module == "retrieval_lib" else book).__all__:
                missing.append(f"{nb}: {name} is not in {module}.__all__")
    assert not wrong, "import from retrieval_lib or retrieval_lib.book instead:\n" + "\n".join(wrong)
    assert not missing, "\n".join(missing)


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in this checkout")
def test_the_top_level_is_shaped_by_use():
    used = {name for imports in _notebook_imports(every_cell=True).values() for _, name in imports}
    used |= {name for _, name in _script_imports()}
    unused = sorted(set(retrieval_lib.__all__) - used - ALWAYS)
    assert not unused, f"exported at the top but used by no notebook or script: {unused}; drop them from __all__"
    book_unused = sorted(set(book.__all__) - used - ALWAYS - {"Book"})
    assert not book_unused, f"exported by retrieval_lib.book but used by no notebook: {book_unused}"


def test_the_checker_reads_imports():
    src = "import os\nfrom retrieval_lib import gem, start\nfrom retrieval_lib.book.viz import (overlay,\n    live_figure)\n%matplotlib inline"
    assert _imports(src) == [("retrieval_lib", "gem"), ("retrieval_lib", "start"),
                             ("retrieval_lib.book.viz", "overlay"), ("retrieval_lib.book.viz", "live_figure")]
