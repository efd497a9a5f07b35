"""Test-session settings: real photos when present, a private cache, and the README's run.

No matplotlib backend is forced here: outside Jupyter and without a display matplotlib
falls back to Agg by itself, and the notebooks must run with the backend Jupyter users
get (inline), so that a figure that goes missing fails the tests.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
README_RUN_TIMEOUT_S = 1500  # the whole README run at smoke scale; each cell also has reproduce's own limit

# The real photos beside the checkout (never copied into the repo); CI sets this too.
if "RETRIEVAL_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["RETRIEVAL_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Generated data and cached features go to a per-session folder, not ~/.cache."""
    if "RETRIEVAL_CACHE" in os.environ and os.environ.get("RETRIEVAL_TEST_KEEP_CACHE"):
        yield
        return
    old = os.environ.get("RETRIEVAL_CACHE")
    os.environ["RETRIEVAL_CACHE"] = str(tmp_path_factory.mktemp("retrieval_cache"))
    yield
    if old is None:
        os.environ.pop("RETRIEVAL_CACHE", None)
    else:
        os.environ["RETRIEVAL_CACHE"] = old


@pytest.fixture(scope="session")
def data_root():
    """The data root holding real171/ and revisited_gnd/, or None when absent."""
    root = os.environ.get("RETRIEVAL_DATA")
    return Path(root) if root and Path(root).is_dir() else None


# ---------------------------------------------------------------- the README's quickstart
def quickstart_commands(readme: str) -> list:
    """The commands of the first ``bash`` block under ``## Quickstart``, in order.

    Backslash-continued lines are joined, comments dropped, and ``a && b`` split into
    ``a`` and ``b``.
    """
    section = re.search(r"^## Quickstart\s*$(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, "README.md has no '## Quickstart' section"
    block = re.search(r"^```bash\s*$(.*?)^```", section.group(1), re.M | re.S)
    assert block, "the Quickstart section of README.md has no ```bash block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def main_command(commands: list) -> str:
    """The one ``python -m retrieval_lib reproduce`` command, as the README writes it."""
    found = [c for c in commands if re.search(r"\bretrieval_lib reproduce\b", c)]
    assert len(found) == 1, f"expected one 'python -m retrieval_lib reproduce' in the Quickstart block, got {found}"
    return found[0]


def _copy_checkout(src: Path, dst: Path) -> None:
    """The files a clone of ``src`` would hold (plus uncommitted work), without venv, caches or results."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=src, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:
        skip = shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", "*.egg-info", ".pytest_cache",
                                      ".ipynb_checkpoints", "cache", "downloads", "offline_default")
        shutil.copytree(src, dst, ignore=skip)
        return
    for rel in filter(None, listed):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


@pytest.fixture(scope="session")
def readme_commands() -> list:
    """The Quickstart block's commands (:func:`quickstart_commands`)."""
    return quickstart_commands((REPO / "README.md").read_text(encoding="utf-8"))


@dataclass
class ReadmeRun:
    """The README's main command, run at smoke scale in a copy of the checkout."""

    command: str          # as run (the README's, with --scale smoke)
    root: Path            # the copy; the command's working directory
    returncode: int
    seconds: float
    log: str = field(repr=False)           # stdout + stderr
    files_before: set = field(repr=False)  # files of the copy before the run (relative paths)
    widget_log: Path = None                # book.widget_check's records of the run's live widgets

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-n:])


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory, readme_commands) -> ReadmeRun:
    """Run the README's ``python -m retrieval_lib reproduce ...`` literally, once per session.

    Only ``--scale cpu`` becomes ``--scale smoke``. It runs from the root of a copy of
    the checkout, so relative paths (``--out results``) are exercised without touching
    this checkout's results/, with no ``../shared`` beside it and ``RETRIEVAL_DATA``
    unset (the offline default), no forced matplotlib backend and no progress setting:
    the environment of a user who just followed the README. ``python`` is the
    interpreter running the tests (where ``pip install -e .`` put the package). The
    executed notebooks are what ``tests/test_notebooks.py`` inspects.
    """
    command = main_command(readme_commands)
    assert re.search(r"--scale[ =]cpu\b", command), f"the README's main command has no '--scale cpu': {command!r}"
    command = re.sub(r"--scale([ =])cpu\b", r"--scale\1smoke", command)
    base = tmp_path_factory.mktemp("readme")
    root = base / "checkout"
    _copy_checkout(REPO, root)
    files_before = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    bin_dir = base / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RETRIEVAL_DATA", "RETRIEVAL_SCALE", "RETRIEVAL_PROGRESS", "MPLBACKEND")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["RETRIEVAL_CACHE"] = str(base / "cache")  # not the user's ~/.cache
    # the one addition to a user's environment: each live widget is moved once and its redraw
    # recorded (book/widget_check.py), which tests/test_notebooks.py reads; outputs are unchanged
    env["RETRIEVAL_WIDGET_CHECK"] = str(base / "widgets.jsonl")
    log_path = base / "log.txt"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", command], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=README_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and the kernels it started
            proc.wait()
            returncode = -1
    seconds = time.perf_counter() - t0
    log_text = log_path.read_text(errors="replace")
    if returncode == -1:
        log_text += f"\n[killed after {README_RUN_TIMEOUT_S} s]"
    return ReadmeRun(command, root, returncode, seconds, log_text, files_before, base / "widgets.jsonl")


# ---------------------------------------------------------------- the full-scale dry run
def pytest_configure(config):
    config.addinivalue_line("markers", "fullscale: the full scale's dry run on a CPU stand-in (minutes, part of "
                                       "`pytest` and CI; `-m 'not fullscale'` leaves it out while working)")
