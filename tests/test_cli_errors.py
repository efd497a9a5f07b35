"""The command line answers bad input: every explicit argument honoured or refused in one line.

Each case runs the real command (``python -m retrieval_lib ...`` in a subprocess) and checks the
exit code (:data:`retrieval_lib.errors.EXIT_CODES`), that stderr holds one ``error:`` line and no
traceback, and that a refused run wrote nothing to ``--out``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval_lib.__main__ import main
from retrieval_lib.errors import EXIT_CODES, MissingDataError, UsageError

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd, env=None, timeout=300):
    full_env = dict(os.environ, RETRIEVAL_PROGRESS="0")
    full_env.pop("RETRIEVAL_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "retrieval_lib", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(res, code, *needles):
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_unknown_notebook_is_refused_and_the_notebooks_are_listed(tmp_path):
    res = _cli("reproduce", "--scale", "smoke", "--notebooks", "99,0x", "--out", "r", cwd=tmp_path)
    line = _one_line_error(res, 2, "'99'", "'0x'", "00_pipeline", "09_reproductions")
    assert "03_gem" in line and not (tmp_path / "r").exists()


@pytest.mark.parametrize("scale, data, needles", [
    ("cpu", "/nonexistent", ["/nonexistent", "download real171 --data /nonexistent"]),  # no such folder
    ("smoke", "empty", ["real171/manifest.json", "download real171 --data empty"]),     # not what smoke measures
    ("full", "empty", ["roxford5k", "download roxford5k"]),                             # not what full measures
])
def test_a_data_folder_without_what_the_scale_needs_is_refused(tmp_path, scale, data, needles):
    (tmp_path / "empty").mkdir()
    res = _cli("reproduce", "--scale", scale, "--notebooks", "none", "--data", data, "--out", "r", cwd=tmp_path)
    _one_line_error(res, 3, *needles)
    assert not (tmp_path / "r").exists()


def test_full_scale_from_the_environment_without_data_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    res = _cli("reproduce", "--scale", "full", "--notebooks", "none", "--out", "r", cwd=tmp_path,
               env={"RETRIEVAL_DATA": str(tmp_path / "empty")})
    _one_line_error(res, 3, "full scale runs on roxford5k", "download roxford5k")
    assert not (tmp_path / "r").exists()


def test_site_from_a_missing_run_is_one_line(tmp_path):
    res = _cli("site", "--from", "/nonexistent", "--out", "s", cwd=tmp_path)
    _one_line_error(res, 3, "no reproduce run at /nonexistent")
    assert not (tmp_path / "s").exists()
    (tmp_path / "run").mkdir()  # a folder, but not a reproduce run
    res = _cli("site", "--from", "run", "--out", "s", cwd=tmp_path)
    _one_line_error(res, 3, "holds no executed notebook")
    assert not (tmp_path / "s").exists()


def test_debug_shows_the_traceback(tmp_path):
    res = _cli("--debug", "site", "--from", "/nonexistent", "--out", "s", cwd=tmp_path)
    assert res.returncode == 3 and "Traceback" in res.stderr and "MissingDataError" in res.stderr
    res = _cli("site", "--from", "/nonexistent", "--out", "s", cwd=tmp_path, env={"RETRIEVAL_DEBUG": "1"})
    assert res.returncode == 3 and "Traceback" in res.stderr


def test_help_lists_exit_codes_and_examples(tmp_path):
    for args in ([], ["reproduce"], ["site"]):
        res = _cli(*args, "--help", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert "exit codes:" in res.stdout and "examples:" in res.stdout and "--debug" in res.stdout
        for code, what in EXIT_CODES.items():
            assert f"  {code}  {what}" in res.stdout


def test_argparse_errors_keep_exit_code_2(tmp_path):
    res = _cli("reproduce", "--scale", "huge", cwd=tmp_path)
    assert res.returncode == 2 and "invalid choice" in res.stderr and "Traceback" not in res.stderr


def test_notebook_selection_accepts_numbers_and_names():
    from retrieval_lib.book.reproduce import select_notebooks

    nb_dir = REPO / "notebooks"
    assert select_notebooks("none", nb_dir) == []
    assert select_notebooks("3,00", nb_dir) == ["00", "03"]
    assert select_notebooks("03_gem, 04", nb_dir) == ["03", "04"]
    assert select_notebooks("all", nb_dir)[:2] == ["00", "01"]
    with pytest.raises(UsageError, match="'gem'"):
        select_notebooks("gem", nb_dir)
    with pytest.raises(UsageError, match="names no notebook"):
        select_notebooks(",", nb_dir)


def test_unexpected_exceptions_keep_their_traceback(monkeypatch):
    import retrieval_lib.__main__ as cli

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "main_reproduce", boom)
    with pytest.raises(RuntimeError, match="a bug"):  # not turned into a one-line error
        main(["reproduce", "--scale", "smoke", "--notebooks", "none"])


def test_missing_data_error_is_still_a_file_not_found_error():
    assert issubclass(MissingDataError, FileNotFoundError) and MissingDataError.exit_code == 3


def test_a_cached_run_says_so_instead_of_a_throughput(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    cache = tmp_path / "cache"
    args = ["reproduce", "--scale", "smoke", "--notebooks", "none", "--cache", str(cache), "--quiet"]
    assert main(args + ["--out", str(tmp_path / "r1")]) == 0  # cold: measured
    first = capsys.readouterr().out
    assert "extraction: " in first and "images/s" in first
    env = {k: v for k, v in os.environ.items() if k != "RETRIEVAL_DATA"}
    res = subprocess.run([sys.executable, "-m", "retrieval_lib", *args, "--out", "r2"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "descriptors from the cache (0 images extracted)" in res.stdout and "images/s" not in res.stdout


def test_an_unsafe_checkpoint_is_refused_in_one_line(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Evil(), "meta": {}}, f)
    (tmp_path / "data").mkdir()
    res = _cli("reproduce", "--scale", "full", "--network", "evil.pth", "--data", "data", "--out", "r", cwd=tmp_path)
    _one_line_error(res, 5, "evil.pth")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "r").exists()
