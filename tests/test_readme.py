"""The README's Quickstart, run as written (see ``readme_run`` in conftest.py).

The main command runs literally, at smoke scale, from the root of a copy of the
checkout with no real data anywhere: relative ``--out``, the offline default, the
environment of someone who just followed the README. Its executed notebooks are
inspected cell by cell in ``tests/test_notebooks.py``.
"""
import json
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _out_dir(run) -> Path:
    args = shlex.split(run.command)
    assert "--out" in args, f"the README's main command names no --out folder: {run.command!r}"
    out = Path(args[args.index("--out") + 1])
    assert not out.is_absolute(), f"the README's --out is meant to be relative to the repository root, got {out}"
    return run.root / out


def test_quickstart_parses(readme_commands):
    commands = readme_commands
    main = [c for c in commands if "retrieval_lib reproduce" in c]
    assert len(main) == 1 and re.search(r"--scale[ =]cpu\b", main[0]) and "--out" in main[0], commands
    assert any(re.fullmatch(r"(python3? -m )?pytest\b.*", c) for c in commands), \
        f"the Quickstart block should say how to run the tests (pytest): {commands}"
    for c in commands:
        m = re.search(r"\bpip install\b.*?-r\s+(\S+)", c)
        if m:
            assert (REPO / m.group(1)).is_file(), f"the Quickstart installs from {m.group(1)}, which does not exist"
        if re.search(r"\bpip install\b.*(-e\s+)?\.(\s|$)", c):
            assert (REPO / "pyproject.toml").is_file(), "the Quickstart installs '.', but there is no pyproject.toml"


def test_main_command_succeeds(readme_run):
    assert readme_run.returncode == 0, (f"`{readme_run.command}` (from the README, in {readme_run.root}) failed "
                                        f"with exit code {readme_run.returncode}:\n{readme_run.tail()}")


def test_main_command_writes_what_the_readme_promises(readme_run):
    out = _out_dir(readme_run)
    for name in ("offtheshelf.md", "results.md"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, \
            f"the README promises {path.relative_to(readme_run.root)}; it is missing or empty:\n{readme_run.tail()}"
    results = (out / "results.md").read_text(encoding="utf-8")
    for nb in NOTEBOOKS:
        executed = list((out / "notebooks").rglob(nb.name))
        assert len(executed) == 1, f"expected one executed copy of {nb.name} under {out / 'notebooks'}, got {executed}"
        assert nb.stem in results, f"results.md does not list {nb.stem}"


def test_main_command_uses_the_offline_default(readme_run):
    out = _out_dir(readme_run)
    table = (out / "offtheshelf.md").read_text(encoding="utf-8")
    assert "offline_default" in table and "real171" not in table, table[:300]
    for metrics in (out / "notebooks").rglob("metrics.json"):
        doc = json.loads(metrics.read_text())
        assert str(doc.get("data")).startswith("offline_default"), f"{metrics}: data = {doc.get('data')!r}"


def test_main_command_writes_only_under_out(readme_run):
    """Nothing lands beside the notebooks (a relative --out must not be resolved from notebooks/)."""
    out = _out_dir(readme_run)
    new = sorted(str(p.relative_to(readme_run.root)) for p in readme_run.root.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts
                 and str(p.relative_to(readme_run.root)) not in readme_run.files_before)
    stray = [p for p in new if not (readme_run.root / p).is_relative_to(out)]
    assert new, "the run wrote nothing"
    assert not stray, f"the run wrote outside {out.name}/: {stray[:10]}"
