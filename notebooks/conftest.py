"""The notebooks run as tests by nbval (``pytest`` collects ``notebooks/`` with ``--nbval-lax``).

nbval injects no parameters and starts one kernel per notebook, which inherits this
process's environment at that moment. So, just before a notebook's kernel starts (the
setup of its first cell), the environment is set to what a smoke-scale test run needs,
and restored once the kernel is up:

- ``RETRIEVAL_SCALE=smoke``: every parameters cell reads ``SCALE`` from it;
- ``RETRIEVAL_PROGRESS=0``: no progress widgets;
- ``RETRIEVAL_CACHE``: a private folder for this pytest session, not ``~/.cache``;
- ``RETRIEVAL_DATA``: ``../shared/data`` beside the checkout when present, unless already set
  (``RETRIEVAL_DATA=`` runs them on the offline default);
- ``MPLBACKEND``: matplotlib's inline backend, the one a Jupyter user gets, even where the
  shell exported ``MPLBACKEND=Agg`` for headless scripts.

Only the cells marked ``# NBVAL_CHECK_OUTPUT`` have their committed output compared (they
print something exact by construction, the same at every scale and with or without real
data); every other cell must run without error within ``--nbval-cell-timeout`` seconds.
After editing a checked cell, store its new output with

    python notebooks/conftest.py notebooks/00_pipeline.ipynb

which runs the notebook at smoke scale and copies the outputs (and execution counts) of the
checked cells only into the committed file.
"""
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"

_cache_dir = None


def kernel_environment(cache_dir) -> dict:
    """The environment variables the notebook kernels start with (``None``: unset)."""
    if "RETRIEVAL_DATA" in os.environ:  # set, even to "" (= the offline default): keep it
        data = os.environ["RETRIEVAL_DATA"]
    else:
        data = str(SHARED_DATA) if SHARED_DATA.is_dir() else None
    return {"RETRIEVAL_SCALE": "smoke", "RETRIEVAL_PROGRESS": "0", "RETRIEVAL_CACHE": str(cache_dir),
            "RETRIEVAL_DATA": data, "MPLBACKEND": INLINE_BACKEND}


@contextlib.contextmanager
def environment(values: dict):
    """Set (``None``: unset) environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_ignore_collect(collection_path, config):
    """Only the numbered notebooks are tests: not executed copies or anything in subfolders."""
    if collection_path.parent == HERE and collection_path.suffix == ".ipynb":
        return True if not collection_path.name[:2].isdigit() else None
    if collection_path.is_dir() and collection_path != HERE:
        return True
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    global _cache_dir
    if item.path.suffix != ".ipynb":
        return (yield)
    if _cache_dir is None:
        _cache_dir = tempfile.mkdtemp(prefix="retrieval_nbval_cache_")
    with environment(kernel_environment(_cache_dir)):
        return (yield)  # the first cell's setup starts the notebook's kernel, which copies the environment


def pytest_unconfigure(config):
    if _cache_dir is not None:
        shutil.rmtree(_cache_dir, ignore_errors=True)


# ---------------------------------------------------------------- refreshing the checked outputs
def is_checked(cell) -> bool:
    return cell["cell_type"] == "code" and any(line.strip() == CHECK_OUTPUT for line in _source(cell).splitlines())


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _on_disk(output) -> dict:
    """An output as Jupyter stores it: keys sorted, multi-line strings as lists of lines."""
    def lines(v):
        return v.splitlines(keepends=True) if isinstance(v, str) else v

    out = dict(output)
    if "text" in out:
        out["text"] = lines(out["text"])
    if "data" in out:
        out["data"] = {mime: lines(v) for mime, v in sorted(dict(out["data"]).items())}
    if "metadata" in out:
        out["metadata"] = dict(out["metadata"])
    return dict(sorted(out.items()))


def refresh_checked_outputs(path) -> list:
    """Run the notebook at smoke scale; store the outputs of its checked cells in ``path``.

    Every other cell stays without output. The file is read again just before writing and
    only the checked cells whose source is the one that ran are touched, so an edit made
    to the notebook meanwhile survives. Returns the indices of the refreshed cells.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    if not any(is_checked(c) for c in nb.cells):
        return []
    with tempfile.TemporaryDirectory(prefix="retrieval_nbval_cache_") as cache:
        with environment(kernel_environment(cache)):
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                           store_widget_state=False).execute()
    ran = {_source(c): c for c in nb.cells if is_checked(c)}
    doc = json.loads(path.read_text(encoding="utf-8"))
    done = []
    for i, cell in enumerate(doc["cells"]):
        if is_checked(cell) and _source(cell) in ran:
            cell["outputs"] = [_on_disk(o) for o in ran[_source(cell)].outputs]
            cell["execution_count"] = ran[_source(cell)].execution_count
            done.append(i)
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return done


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, "checked cells refreshed:", refresh_checked_outputs(arg))
