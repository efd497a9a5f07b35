"""``python -m retrieval_lib download``: every name dispatched, --list, and one-line errors.

real171 is built from a local HTTP server on 127.0.0.1 (the sources and table of
``test_real171_download.py``); the other data sets and the networks are checked to reach
their downloader, which has its own tests.
"""
import json
import re
import shlex
from pathlib import Path

import pytest

from retrieval_lib import __main__ as cli
from retrieval_lib.book import downloads
from retrieval_lib.data import real171 as r171
from retrieval_lib.data.download import ArchiveError
from retrieval_lib.data.revisited import load_gnd
from retrieval_lib.models.released import released_networks
from test_real171_download import SOURCES, _route, _table, server  # noqa: F401 (the local mirror fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def test_table(tmp_path, monkeypatch):
    """The packaged table replaced by the test's (5 made-up sources)."""
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(_table()))
    monkeypatch.setattr(r171, "SOURCES_FILE", path)
    return path


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_download_real171_builds_the_set_and_says_how_to_use_it(server, test_table, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    root = tmp_path / "data"
    rc, out, err = _run(["download", "real171", "--data", str(root), "--mirror", server.mirror, "--quiet"], capsys)
    assert rc == 0, err
    assert "5 fetched" in out and "5 of 5 byte-identical" in out and f"RETRIEVAL_DATA={root}" in out
    assert (root / "real171" / "manifest.json").is_file()
    rc, out, _ = _run(["download", "real171", "--data", str(root), "--mirror", server.mirror, "--quiet"], capsys)
    assert rc == 0 and "0 fetched" in out and "5 already there" in out
    assert len(server.log) == 5


def test_the_readme_command_builds_real171(server, test_table, tmp_path, capsys):
    """The README's real-photo command, run as written but for its data folder and a mirror."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.findall(r"^python -m retrieval_lib download real171[^\n#]*", readme, re.M)
    assert found, "the README shows no `python -m retrieval_lib download real171 ...` command"
    argv = shlex.split(found[0])[3:]
    assert argv[:2] == ["download", "real171"] and "--data" in argv
    argv[argv.index("--data") + 1] = str(tmp_path / "data")
    rc, out, err = _run(argv + ["--mirror", server.mirror, "--quiet"], capsys)
    assert rc == 0, err
    assert (tmp_path / "data" / "real171" / "manifest.json").is_file()


def test_list_shows_every_item_its_licence_and_whether_it_is_here(server, test_table, tmp_path, capsys):
    root = tmp_path / "data"
    rc, out, _ = _run(["download", "--list", "--data", str(root)], capsys)
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines()[4:] if line.strip() and not line.startswith("'?'")}
    assert list(rows) == list(downloads.DATA_ITEMS) + list(released_networks())
    assert re.search(r"real171\s+data\s+0\.0 MB of sources|real171\s+data\s+\d+\.\d MB of sources", rows["real171"])
    assert " no " in rows["real171"] and "research use" in rows["real171"]
    assert "1.1 GB" in rows["cub"] and "terms at" in rows["roxford5k"]
    _run(["download", "real171", "--data", str(root), "--mirror", server.mirror, "--quiet"], capsys)
    _, out, _ = _run(["download", "--list", "--data", str(root)], capsys)
    assert re.search(r"^real171\s.*\syes\s", out, re.M)
    (root / "real171" / "alpha" / "big_1.jpg").unlink()
    _, out, _ = _run(["download", "--list", "--data", str(root)], capsys)
    assert re.search(r"^real171\s.*partial: 4/5 files", out, re.M)


def test_list_without_a_data_root(capsys, monkeypatch):
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    rc, out, _ = _run(["download", "--list"], capsys)
    assert rc == 0 and "not set (pass --data DIR" in out and "? (no data root)" in out


def test_the_packaged_real171_size_is_the_sum_of_its_sources():
    assert downloads.DATA_ITEMS["real171"].size.startswith("87.2 MB of sources")  # 87 221 177 bytes


@pytest.mark.parametrize("argv, pattern", [
    (["download", "imagenet"], r"nothing called 'imagenet'.*--list"),
    (["download"], r"name what to download"),
    (["download", "real171"], r"pass --data DIR"),
])
def test_usage_errors_are_one_line_with_exit_code_2(argv, pattern, capsys, monkeypatch):
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and re.search(pattern, err) and len(err.strip().splitlines()) == 1, err


def test_offline_is_one_line_with_exit_code_4_and_nothing_half_written(test_table, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "data"
    rc, out, err = _run(["download", "real171", "--data", str(root), "--mirror", f"http://127.0.0.1:{port}",
                         "--quiet"], capsys)
    assert rc == 4 and len(err.strip().splitlines()) == 1, err
    assert "alpha/big_1.jpg" in err and "offline?" in err and "download real171 --data" in err
    assert not [p for p in (root / "real171").rglob("*") if p.is_file()]


def test_a_404_is_one_line_naming_the_file(server, test_table, tmp_path, capsys):
    del server.routes[_route(SOURCES["beta/grey_1.jpg"][0])]
    rc, _, err = _run(["download", "real171", "--data", str(tmp_path), "--mirror", server.mirror, "--quiet"], capsys)
    assert rc == 4 and "beta/grey_1.jpg" in err and "HTTP 404" in err and len(err.strip().splitlines()) == 1


def test_every_other_name_reaches_its_downloader(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(downloads, "download_revisited", lambda name, root, progress=True: calls.append(name) or root)
    monkeypatch.setattr(downloads, "download_cub", lambda root, progress=True: calls.append("cub") or root)
    monkeypatch.setattr(downloads, "download_sfm120k", lambda root, progress=True: calls.append("rsfm120k") or root)
    monkeypatch.setattr(downloads, "fetch_network", lambda name, progress=True: calls.append(name) or tmp_path / name)
    net = next(iter(released_networks()))
    for name in ("roxford5k", "rparis6k", "rsfm120k", "cub", net):
        rc, out, err = _run(["download", name, "--data", str(tmp_path), "--quiet"], capsys)
        assert rc == 0 and str(tmp_path) in out, err
    assert calls == ["roxford5k", "rparis6k", "rsfm120k", "cub", net]


def test_a_damaged_archive_or_a_full_disk_is_a_fetch_error(tmp_path, monkeypatch, capsys):
    import errno

    def bad_archive(root, progress=True):
        raise ArchiveError("cannot extract 'CUB_200_2011.tgz' (EOFError); download it again")

    def full(name, root, progress=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(downloads, "download_cub", bad_archive)
    monkeypatch.setattr(downloads, "download_revisited", full)
    rc, _, err = _run(["download", "cub", "--data", str(tmp_path), "--quiet"], capsys)
    assert rc == 4 and "cub (the data set): cannot extract" in err
    rc, _, err = _run(["download", "roxford5k", "--data", str(tmp_path), "--quiet"], capsys)
    assert rc == 4 and "disk is full" in err and "download roxford5k" in err


def test_the_command_shows_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["download", "--help"])
    out = capsys.readouterr().out
    assert "--list" in out and "--mirror" in out and "real171, roxford5k, rparis6k, rsfm120k, cub" in out


def test_the_catalogue_counts_the_revisited_images_as_their_ground_truth_does(data_root):
    """``download --list`` gives revisited Oxford/Paris as image counts (no byte size is recorded here);
    the counts are those of the ground-truth files beside the checkout."""
    rows = {r[0]: r for r in downloads.list_rows(None)}
    for name, n in downloads.REVISITED_IMAGES.items():
        assert rows[name][2].startswith(f"{n:,} database images + 70 query images in ")
    gnd_dir = data_root / "revisited_gnd" if data_root is not None else None
    if gnd_dir is None or not gnd_dir.is_dir():
        pytest.skip("../shared/data/revisited_gnd is absent: the counts cannot be compared with the ground truth")
    for name, n in downloads.REVISITED_IMAGES.items():
        gnd = load_gnd(gnd_dir / f"gnd_{name}.pkl")
        assert (len(gnd["imlist"]), len(gnd["qimlist"])) == (n, 70)
