"""The Colab install cell: made from one constant, identical in every notebook, a no-op outside Colab.

Also the scale a notebook picks when none is given (``config.default_scale``).
"""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from retrieval_lib.book import colab
from retrieval_lib.book.colab import (MARKER, REPO_URL, colab_url, install_cell_source, notebook_install_cell,
                                      pip_target, sync_notebook, sync_notebooks, sync_readme)
from retrieval_lib.book.config import default_scale

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _doc(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _install_cell(path):
    doc = _doc(path)
    i = notebook_install_cell(doc)
    assert i is not None, f"{path.name}: no install cell"
    return doc, i


# ---------------------------------------------------------------- the committed notebooks
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_install_cell_is_rendered_from_the_constant(nb):
    doc, i = _install_cell(nb)
    assert _src(doc["cells"][i]) == install_cell_source(), (
        f"{nb.name}: the install cell differs from the one rendered from REPO_URL; "
        "run `python -m retrieval_lib.book.colab`")
    first_code = next(j for j, c in enumerate(doc["cells"]) if c["cell_type"] == "code")
    assert i == first_code, f"{nb.name}: the install cell must be the first code cell"
    assert doc["cells"][0]["cell_type"] == "markdown", f"{nb.name}: the title comes before the install cell"


def test_the_cell_installs_from_the_constant():
    src = install_cell_source()
    assert src.splitlines()[0].startswith(MARKER)
    assert pip_target() == f"git+{REPO_URL}.git" and pip_target() in src
    fork = "https://github.com/someone/fork"
    assert "git+https://github.com/someone/fork.git" in install_cell_source(fork)
    assert REPO_URL not in install_cell_source(fork)


def test_readme_shows_the_constant_and_colab_links():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert REPO_URL in readme, f"the README must show the repository URL of retrieval_lib/book/colab.py ({REPO_URL})"
    for nb in NOTEBOOKS:
        assert colab_url(nb.name) in readme, f"the README has no 'Open in Colab' link for {nb.name}"


def test_readme_follows_the_constant(tmp_path):
    """The README is in sync; a copy written for another repository is rewritten to REPO_URL by the sync."""
    readme = REPO / "README.md"
    assert not sync_readme(readme, write=False), "README.md differs from REPO_URL; run `python -m retrieval_lib.book.colab`"
    other = "https://github.com/someone/fork"
    copy = tmp_path / "README.md"
    copy.write_text(readme.read_text(encoding="utf-8"), encoding="utf-8")
    assert sync_readme(copy, other)
    text = copy.read_text(encoding="utf-8")
    assert "deep-retrieval-textbook/deep-retrieval-textbook" not in text
    assert f'REPO_URL = "{other}"' in text and "git+https://github.com/someone/fork.git" in text
    assert colab_url("03_gem.ipynb", other) in text
    assert sync_readme(copy) and copy.read_text(encoding="utf-8") == readme.read_text(encoding="utf-8")


def test_colab_url():
    assert colab_url("03_gem.ipynb", "https://github.com/a/b") == \
        "https://colab.research.google.com/github/a/b/blob/main/notebooks/03_gem.ipynb"
    assert colab_url("03_gem", "https://github.com/a/b.git/") .endswith("/github/a/b/blob/main/notebooks/03_gem.ipynb")
    with pytest.raises(ValueError, match="GitHub"):
        colab_url("03_gem.ipynb", "https://gitlab.com/a/b")


# ---------------------------------------------------------------- outside Colab it does nothing
def _run_cell(in_colab: bool, monkeypatch):
    """Execute the rendered cell with or without ``google.colab`` in ``sys.modules``; return its pip and
    colab_setup calls."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(colab, "colab_setup", lambda *a, **k: calls.append("colab_setup"))
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    exec(compile(install_cell_source(), "<install cell>", "exec"), {})
    return calls


def test_the_cell_is_a_no_op_outside_colab(monkeypatch):
    assert _run_cell(False, monkeypatch) == []  # no pip, no setup, no download


def test_the_cell_installs_in_colab(monkeypatch):
    calls = _run_cell(True, monkeypatch)
    assert len(calls) == 2 and calls[1] == "colab_setup"  # pip first, then the setup from the installed package
    (argv,), kwargs = calls[0]
    assert argv[1:4] == ["-m", "pip", "install"] and argv[-1] == pip_target() and kwargs == {"check": True}


def _fake_downloads(monkeypatch):
    got = []
    monkeypatch.setattr(colab, "fetch_item", lambda name, root, progress=True: got.append((name, root)))
    return got


FULL = ["roxford5k", "real171", "rSfM120k-tl-resnet101-gem-w", "rparis6k", "retrievalSfM120k-resnet101-gem"]


def _shell():
    """A stand-in for Colab's IPython shell: a namespace and IPython's own event manager."""
    from IPython.core.events import EventManager, available_events

    shell = types.SimpleNamespace(user_ns={})
    shell.events = EventManager(shell, available_events)
    return shell


def _run_cell_in(shell, code: str, success: bool = True):
    exec(compile(code, "<cell>", "exec"), shell.user_ns)
    shell.events.trigger("post_run_cell", types.SimpleNamespace(success=success))


@pytest.mark.parametrize("scale, fetched", [("cpu", ["real171"]), ("smoke", ["real171"]),
                                           ("full", FULL)])  # full: 05-08's split and 05/08's networks too
def test_the_parameters_cell_decides_what_is_downloaded(scale, fetched, monkeypatch):
    got = _fake_downloads(monkeypatch)
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    shell = _shell()
    assert colab.colab_setup(shell=shell) == colab.COLAB_DATA_ROOT == os.environ["RETRIEVAL_DATA"]
    _run_cell_in(shell, "import os")                            # the imports cell: no SCALE yet
    assert got == []                                            # nothing before the parameters cell
    _run_cell_in(shell, f'SCALE = {scale!r}\nDATA_ROOT = os.environ.get("RETRIEVAL_DATA")')
    assert got == [(name, colab.COLAB_DATA_ROOT) for name in fetched]
    _run_cell_in(shell, 'SCALE = "full"')                       # later cells: the callback is gone
    assert got == [(name, colab.COLAB_DATA_ROOT) for name in fetched]
    assert shell.events.callbacks["post_run_cell"] == []


def test_the_cell_s_data_root_wins_and_a_failed_cell_waits(monkeypatch, tmp_path):
    got = _fake_downloads(monkeypatch)
    monkeypatch.setenv("RETRIEVAL_DATA", str(tmp_path / "env"))  # a data root already set is kept
    shell = _shell()
    assert colab.colab_setup(shell=shell) == str(tmp_path / "env")
    colab.colab_setup(shell=shell)                                # the install cell run twice: one callback
    assert len(shell.events.callbacks["post_run_cell"]) == 1
    shell.user_ns["SCALE"] = "cpu"
    shell.events.trigger("post_run_cell", types.SimpleNamespace(success=False))
    assert got == []                                              # the parameters cell failed: wait for a good run
    _run_cell_in(shell, f"SCALE = 'cpu'\nDATA_ROOT = {str(tmp_path / 'mine')!r}")
    assert got == [("real171", str(tmp_path / "mine"))]


def test_a_failed_download_warns_and_the_notebook_goes_on(monkeypatch):
    from retrieval_lib.errors import FetchError

    def offline(name, root, progress=True):
        raise FetchError(f"{name}: could not fetch ukbench56/ukbench00000.jpg (offline?)")

    monkeypatch.setattr(colab, "fetch_item", offline)
    shell = _shell()
    colab.colab_setup(root="/tmp/nowhere", shell=shell)
    with pytest.warns(UserWarning, match="scale 'cpu' could not be fetched: real171: could not fetch"):
        _run_cell_in(shell, "SCALE = 'cpu'")


def test_the_rendered_cell_in_colab_downloads_only_after_the_parameters_cell(monkeypatch):
    """The install cell as the notebooks hold it, run in a (stand-in) Colab kernel, then a parameters cell."""
    import IPython

    got = _fake_downloads(monkeypatch)
    shell = _shell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    _run_cell_in(shell, install_cell_source())
    assert got == []
    _run_cell_in(shell, 'SCALE = "cpu"\nDATA_ROOT = None')
    assert got == [("real171", colab.COLAB_DATA_ROOT)]


def test_without_ipython_the_default_scale_is_fetched_at_once(monkeypatch, tmp_path):
    import IPython
    import torch

    got = _fake_downloads(monkeypatch)
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    monkeypatch.delenv("RETRIEVAL_SCALE", raising=False)
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert colab.colab_setup(root=str(tmp_path)) == os.environ["RETRIEVAL_DATA"] == str(tmp_path)
    assert got == [(name, str(tmp_path)) for name in FULL]
    assert colab.fetch_for_scale("cpu", str(tmp_path)) == "real171" and got[-1] == ("real171", str(tmp_path))


def test_full_fetches_what_the_notebooks_use_and_only_the_large_sets_on_request(monkeypatch):
    """What colab_setup fetches at full is, item by item, what some notebook's needs cell checks at full,
    less rSfM-120k and CUB (on request); a failed item does not stop the others."""
    from retrieval_lib.book.needs import NOTEBOOKS, scale_needs
    from retrieval_lib.errors import FetchError

    used = {n.item: n for nb in NOTEBOOKS for n in scale_needs(nb, "full")}
    assert set(FULL) == {k for k, n in used.items() if not n.on_request}
    assert {k for k, n in used.items() if n.on_request} == {"rsfm120k", "cub"}
    got = []

    def fetch(name, root, progress=True):
        got.append(name)
        if name == "real171":
            raise FetchError("offline")

    monkeypatch.setattr(colab, "fetch_item", fetch)
    with pytest.raises(FetchError, match="^real171: offline$"):
        colab.fetch_for_scale("full", "/data")
    assert got == FULL


def test_the_cell_runs_here_as_a_plain_kernel_would():
    """In a fresh interpreter (no google.colab, pip not reachable offline) the cell runs and installs nothing."""
    code = install_cell_source() + "\nimport sys; print('colab' if 'google.colab' in sys.modules else 'local')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "local", out.stderr


# ---------------------------------------------------------------- the sync
def _notebook(cells, minor=5):
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": minor}


def _md(text):
    return {"cell_type": "markdown", "id": "t", "metadata": {}, "source": [text]}


def _code(text, **more):
    return {"cell_type": "code", "execution_count": None, "id": "c", "metadata": {}, "outputs": [],
            "source": text.splitlines(keepends=True), **more}


def test_sync_fixes_a_drifted_copy(tmp_path):
    for nb in NOTEBOOKS[:2]:
        shutil.copy(nb, tmp_path / nb.name)
    drifted = tmp_path / NOTEBOOKS[0].name
    doc, i = _install_cell(drifted)
    doc["cells"][i]["source"] = install_cell_source("https://github.com/old/name").splitlines(keepends=True)
    drifted.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert sync_notebooks(tmp_path, write=False) == [drifted]           # --check: found, not written
    assert "old/name" in drifted.read_text(encoding="utf-8")
    assert sync_notebooks(tmp_path) == [drifted]
    doc2, j = _install_cell(drifted)
    assert j == i and _src(doc2["cells"][j]) == install_cell_source()
    # every other cell is untouched
    assert [c for k, c in enumerate(doc2["cells"]) if k != j] == [c for k, c in enumerate(doc["cells"]) if k != i]
    assert sync_notebooks(tmp_path) == []                                # idempotent


def test_sync_replaces_the_placeholder_and_strips_outputs(tmp_path):
    path = tmp_path / "06_new.ipynb"
    path.write_text(json.dumps(_notebook([_md("# 06"), _code("# colab install cell"), _code("SCALE = 1")])))
    assert sync_notebook(path)
    cells = _doc(path)["cells"]
    assert len(cells) == 3 and _src(cells[1]) == install_cell_source() and cells[1]["id"] == "c"
    assert _src(cells[2]) == "SCALE = 1"
    # an executed install cell (outputs, count) is cleaned too
    cells[1]["outputs"], cells[1]["execution_count"] = [{"output_type": "stream", "name": "stdout", "text": "x"}], 3
    path.write_text(json.dumps(_notebook(cells)))
    assert sync_notebook(path) and _doc(path)["cells"][1]["outputs"] == []


def test_sync_replaces_the_older_hand_written_cell(tmp_path):
    old = ('# In Colab, install the library first\nimport sys, subprocess\nif "google.colab" in sys.modules:\n'
           '    subprocess.run(["pip", "install", "git+https://github.com/x/y.git"])')
    path = tmp_path / "00_x.ipynb"
    path.write_text(json.dumps(_notebook([_md("# 00"), _code(old), _code("import os")])))
    assert sync_notebook(path)
    cells = _doc(path)["cells"]
    assert len(cells) == 3 and _src(cells[1]) == install_cell_source()


def test_sync_inserts_after_the_title_when_missing(tmp_path):
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps(_notebook([_md("# 01"), _code("import os")])))
    assert sync_notebook(path)
    cells = _doc(path)["cells"]
    assert [c["cell_type"] for c in cells] == ["markdown", "code", "code"]
    assert _src(cells[1]) == install_cell_source() and _src(cells[2]) == "import os" and cells[1]["id"]
    no_title = tmp_path / "02_x.ipynb"
    no_title.write_text(json.dumps(_notebook([_code("import os")])))
    with pytest.raises(ValueError, match="no markdown title"):
        sync_notebook(no_title)


def test_check_mode_exit_code(tmp_path, capsys):
    path = tmp_path / "03_x.ipynb"
    path.write_text(json.dumps(_notebook([_md("# 03"), _code("# colab install cell")])))
    assert colab.main(["--check", "--notebooks-dir", str(tmp_path), "--readme", "none"]) == 1
    assert "03_x.ipynb" in capsys.readouterr().out
    assert colab.main(["--notebooks-dir", str(tmp_path), "--readme", "none"]) == 0
    assert colab.main(["--check", "--notebooks-dir", str(tmp_path), "--readme", "none"]) == 0


# ---------------------------------------------------------------- the default scale
def test_default_scale_follows_the_gpu(monkeypatch):
    import torch

    monkeypatch.delenv("RETRIEVAL_SCALE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_scale() == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_scale() == "cpu"


def test_default_scale_environment_wins(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RETRIEVAL_SCALE", "smoke")
    assert default_scale() == "smoke"
    monkeypatch.setenv("RETRIEVAL_SCALE", "")  # set but empty: as if unset
    assert default_scale() == "full"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_defaults_through_default_scale(nb):
    """RETRIEVAL_SCALE (nbval, reproduce) wins; otherwise the GPU decides, through the one library function."""
    cell = next(c for c in _doc(nb)["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    src = _src(cell)
    assert 'SCALE = os.environ.get("RETRIEVAL_SCALE") or default_scale()' in src, \
        f"{nb.name}: the parameters cell should read SCALE = os.environ.get(\"RETRIEVAL_SCALE\") or default_scale()"
    assert "from retrieval_lib.book.config import default_scale" in src
