"""download() against a real HTTP server on 127.0.0.1, and extract_archive() on hostile archives."""
import hashlib
import io
import os
import stat
import tarfile
import zipfile

import pytest

from _http import Route, serve
from _http import tgz as _tgz
from retrieval_lib.data.download import (ArchiveError, ChecksumError, DownloadError, download,
                                    extract_archive, file_hash)




def _zip(files: dict, infos=()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in infos:
            zf.writestr(info, data)
    return buf.getvalue()


GOOD = _tgz({"pack/a.txt": b"alpha", "pack/sub/b.txt": b"beta" * 1000})
BLOB = bytes(range(256)) * 400  # 102 400 bytes


@pytest.fixture
def server():
    srv = serve({
        "/good.tgz": Route(GOOD),
        "/blob.bin": Route(BLOB),
        "/blob_noranges.bin": Route(BLOB, ranges=False),
        "/cut.bin": Route(BLOB, send_only=len(BLOB) // 3),
        "/cut_noranges.bin": Route(BLOB, ranges=False, send_only=len(BLOB) // 3),
    })
    yield srv
    srv.shutdown()
    srv.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_file_hash_matches_hashlib(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(BLOB)
    assert file_hash(p) == _sha(BLOB)
    assert file_hash(p, "md5") == hashlib.md5(BLOB).hexdigest()


def test_good_archive_download_verify_extract_and_no_second_request(server, tmp_path):
    dest = tmp_path / "dl" / "good.tgz"
    out = download(server.url("/good.tgz"), dest, sha256=_sha(GOOD), progress=False)
    assert out == dest and dest.read_bytes() == GOOD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["good.tgz"]  # no .part left
    n = len(server.log)
    assert download(server.url("/good.tgz"), dest, sha256=_sha(GOOD).upper(), progress=False) == dest
    assert download(server.url("/good.tgz"), dest, md5=hashlib.md5(GOOD).hexdigest(), progress=False) == dest
    assert len(server.log) == n  # complete + verified: the server was not asked again

    target = tmp_path / "data"
    assert extract_archive(dest, target) == target
    assert (target / "pack" / "a.txt").read_bytes() == b"alpha"
    assert (target / "pack" / "sub" / "b.txt").read_bytes() == b"beta" * 1000
    assert sorted(os.listdir(tmp_path)) == ["data", "dl"]  # no temporary folder left


def test_existing_file_with_wrong_hash_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"stale")
    download(server.url("/blob.bin"), dest, sha256=_sha(BLOB), progress=False)
    assert dest.read_bytes() == BLOB and len(server.log) == 1
    # without a checksum an existing file is trusted as is
    download(server.url("/blob.bin"), dest, progress=False)
    assert len(server.log) == 1


def test_checksum_mismatch_deletes_and_names_url_and_hashes(server, tmp_path):
    dest = tmp_path / "blob.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as e:
        download(server.url("/blob.bin"), dest, sha256=wrong, progress=False)
    msg = str(e.value)
    assert server.url("/blob.bin") in msg and wrong in msg and _sha(BLOB) in msg
    assert os.listdir(tmp_path) == []
    with pytest.raises(ChecksumError, match=hashlib.md5(BLOB).hexdigest()):
        download(server.url("/blob.bin"), dest, md5="f" * 32, progress=False)
    assert os.listdir(tmp_path) == []


def test_truncated_transfer_without_resume_leaves_nothing(server, tmp_path):
    for path, resume in (("/cut.bin", False), ("/cut_noranges.bin", True)):
        with pytest.raises(DownloadError, match=r"stopped after 34133 of 102400 bytes.*nothing was kept"):
            download(server.url(path), tmp_path / "f.bin", resume=resume, progress=False)
        assert os.listdir(tmp_path) == []


def test_truncated_transfer_keeps_part_then_resumes(server, tmp_path):
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match=r"kept: run again to resume"):
        download(server.url("/cut.bin"), dest, progress=False)
    assert os.listdir(tmp_path) == ["f.bin.part"]
    assert (tmp_path / "f.bin.part").read_bytes() == BLOB[: len(BLOB) // 3]
    server.routes["/cut.bin"] = Route(BLOB)  # the server recovers
    download(server.url("/cut.bin"), dest, sha256=_sha(BLOB), progress=False)
    assert server.log[-1] == ("/cut.bin", f"bytes={len(BLOB) // 3}-")
    assert dest.read_bytes() == BLOB and os.listdir(tmp_path) == ["f.bin"]


def test_resume_requests_only_the_rest(server, tmp_path):
    dest = tmp_path / "blob.bin"
    half = len(BLOB) // 2
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:half])
    download(server.url("/blob.bin"), dest, sha256=_sha(BLOB), progress=False)
    assert server.log == [("/blob.bin", f"bytes={half}-")]
    assert dest.read_bytes() == BLOB and os.listdir(tmp_path) == ["blob.bin"]


def test_resume_restarts_when_server_ignores_ranges(server, tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(b"garbage-not-a-prefix")
    download(server.url("/blob_noranges.bin"), dest, sha256=_sha(BLOB), progress=False)
    assert server.log[0][1] is not None  # it asked for a range, got 200, started over
    assert dest.read_bytes() == BLOB


def test_complete_part_gets_416_and_restarts(server, tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(BLOB)
    download(server.url("/blob.bin"), dest, sha256=_sha(BLOB), progress=False)
    assert [r for _, r in server.log] == [f"bytes={len(BLOB)}-", None]
    assert dest.read_bytes() == BLOB


def test_http_error_and_unreachable_server(server, tmp_path):
    with pytest.raises(DownloadError, match=r"HTTP 404.*save it as"):
        download(server.url("/missing.bin"), tmp_path / "m.bin", progress=False)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(DownloadError, match="failed"):
        download(f"http://127.0.0.1:{port}/blob.bin", tmp_path / "m.bin", progress=False, timeout=5)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- archives
def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _device(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


def _bad_archives(tmp_path):
    ok = {"pack/ok.txt": b"fine"}
    abs_target = str(tmp_path / "abs_evil.txt")
    zip_link = zipfile.ZipInfo("pack/link")
    zip_link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return {
        "traversal.tgz": _tgz({**ok, "../evil.txt": b"x"}),
        "nested_traversal.tar.gz": _tgz({**ok, "pack/../../evil.txt": b"x"}),
        "absolute.tgz": _tgz({**ok, abs_target: b"x"}),
        "symlink.tgz": _tgz(ok, [_link("pack/link", "../../evil_dir")]),
        "abs_symlink.tgz": _tgz(ok, [_link("pack/link", "/etc")]),
        "hardlink.tgz": _tgz(ok, [_link("pack/hard", "../evil.txt", tarfile.LNKTYPE)]),
        "device.tgz": _tgz(ok, [_device("pack/null")]),
        "traversal.zip": _zip({**ok, "../evil.txt": b"x"}),
        "absolute.zip": _zip({**ok, "/abs_evil.txt": b"x"}),
        "symlink.zip": _zip(ok, [(zip_link, "../../evil")]),
    }


@pytest.mark.parametrize("name", sorted(_bad_archives(__import__("pathlib").Path("/x"))))
def test_unsafe_archives_are_refused_and_nothing_is_extracted(tmp_path, name):
    src = tmp_path / "src"
    src.mkdir()
    arc = src / name
    arc.write_bytes(_bad_archives(tmp_path)[name])
    work = tmp_path / "work"
    target = work / "out"
    with pytest.raises(ArchiveError, match=r"refusing to extract.*unsafe member"):
        extract_archive(arc, target)
    assert os.listdir(work) == []  # no target, no temporary folder
    assert sorted(os.listdir(tmp_path)) == ["src", "work"]  # nothing escaped either
    assert os.listdir(src) == [name]


def test_safe_internal_links_are_allowed(tmp_path):
    arc = tmp_path / "links.tgz"
    arc.write_bytes(_tgz({"pack/a.txt": b"alpha"}, [_link("pack/sub/l", "../a.txt")]))
    out = extract_archive(arc, tmp_path / "out")
    assert (out / "pack" / "sub" / "l").read_bytes() == b"alpha"


def test_clash_with_existing_entries_and_overwrite(tmp_path):
    arc = tmp_path / "good.tgz"
    arc.write_bytes(GOOD)
    target = tmp_path / "data"
    (target / "pack").mkdir(parents=True)
    (target / "pack" / "old.txt").write_text("old")
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveError, match=r"already contains \['pack'\]"):
        extract_archive(arc, target)
    assert (target / "pack" / "old.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["data", "good.tgz"]
    extract_archive(arc, target, overwrite=True)
    assert sorted(os.listdir(target / "pack")) == ["a.txt", "sub"]
    assert (target / "keep.txt").read_text() == "mine"


def test_zip_extracts(tmp_path):
    arc = tmp_path / "a.zip"
    arc.write_bytes(_zip({"z/one.txt": b"1", "two.txt": b"2"}))
    out = extract_archive(arc, tmp_path / "out")
    assert (out / "z" / "one.txt").read_bytes() == b"1" and (out / "two.txt").read_bytes() == b"2"


def test_damaged_and_unknown_archives(tmp_path):
    arc = tmp_path / "cut.tgz"
    arc.write_bytes(GOOD[: len(GOOD) // 2])
    with pytest.raises(ArchiveError, match="damaged or truncated"):
        extract_archive(arc, tmp_path / "out")
    other = tmp_path / "file.rar"
    other.write_bytes(b"x")
    with pytest.raises(ArchiveError, match="not a supported archive"):
        extract_archive(other, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["cut.tgz", "file.rar"]
