"""Safe downloads and archive extraction (standard library only: ``urllib``, ``tarfile``, ``zipfile``).

``download`` streams a URL to ``dest + ".part"``, verifies its checksum, then renames it
into place, so ``dest`` only ever holds a complete, verified file. ``extract_archive``
checks every member of a tar or zip archive before extracting anything and refuses
members that would land outside the target folder. Used by the dataset downloaders in
:mod:`retrieval_lib.data.datasets`; taught in ``notebooks/00_pipeline.ipynb``.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from retrieval_lib.errors import ExpectedError, FetchError

__all__ = ["download", "extract_archive", "file_hash", "ChecksumError", "DownloadError",
           "ArchiveError"]

_CHUNK = 1 << 20
_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ChecksumError(ExpectedError, ValueError):
    """A downloaded (or existing) file whose hash differs from the expected one."""

    exit_code = FetchError.exit_code


class DownloadError(FetchError):
    """A transfer that failed or ended early (the partial file is never at ``dest``)."""


class ArchiveError(ValueError):
    """An archive that is unsafe (members escaping the target) or cannot be read."""


def file_hash(path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (``algorithm``: any ``hashlib`` name)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_hashes(sha256: Optional[str], md5: Optional[str]) -> dict:
    out = {}
    for name, value in (("sha256", sha256), ("md5", md5)):
        if value is not None:
            out[name] = value.strip().lower()
    return out


def _mismatch(path, hashes: dict) -> Optional[tuple]:
    """(algorithm, expected, actual) of the first hash that differs, else None."""
    for algorithm, expected in hashes.items():
        actual = file_hash(path, algorithm)
        if actual != expected:
            return algorithm, expected, actual
    return None


def _open(url: str, offset: int, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": "retrieval_lib"})
    if offset > 0:
        req.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(req, timeout=timeout)


def _resume_offset(resp, offset: int) -> int:
    """Bytes already on disk that this response continues, or 0 when it starts over."""
    if offset == 0 or resp.status != 206:
        return 0
    m = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
    return offset if m and int(m.group(1)) == offset else -1


def download(url: str, dest, sha256: Optional[str] = None, md5: Optional[str] = None,
             progress: bool = True, resume: bool = True, timeout: float = 30) -> Path:
    """Download ``url`` to ``dest`` safely; return ``Path(dest)``.

    1. If ``dest`` exists and matches the given checksum(s) nothing is downloaded. An
       existing ``dest`` is trusted as it is when no checksum is given.
    2. The body is streamed to ``dest + ".part"``. With ``resume=True`` and a ``.part``
       already there, only the missing bytes are asked for (HTTP ``Range``); a server that
       does not answer ``206 Partial Content`` for the right offset is read from the start.
    3. Fewer bytes than the server's ``Content-Length`` raises :class:`DownloadError`;
       the ``.part`` is kept for the next call when ``resume=True`` and the server
       accepts ranges, and deleted otherwise. ``dest`` is never written.
    4. The ``.part`` is hashed (``sha256`` and/or ``md5``); a mismatch deletes it and
       raises :class:`ChecksumError` naming the URL and both hashes.
    5. ``os.replace`` moves the ``.part`` to ``dest`` (atomic on one file system).

    Without a checksum and without a ``Content-Length`` a cut transfer cannot be told
    from a complete one: give a checksum whenever one is known.

    Raises:
        ChecksumError: the downloaded file's hash differs from ``sha256`` / ``md5``.
        DownloadError: HTTP error, no network, time-out or a transfer cut short.
    """
    dest = Path(dest)
    hashes = _expected_hashes(sha256, md5)
    if dest.is_file() and (not hashes or _mismatch(dest, hashes) is None):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if (resume and part.is_file()) else 0
    hint = f"check the URL and your network, or download it by hand and save it as {dest}"
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # our .part is not a prefix the server recognises
            part.unlink()
            return download(url, dest, sha256, md5, progress, resume, timeout)
        raise DownloadError(f"downloading {url} failed: HTTP {err.code} {err.reason}; {hint}") from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"downloading {url} failed ({err}); {hint}") from err

    received = 0
    with resp:
        start = _resume_offset(resp, offset)
        if start < 0:
            raise DownloadError(f"{url} answered a range request with "
                                f"'{resp.headers.get('Content-Range')}', not bytes {offset}-; "
                                f"delete {part} and try again")
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        ranges_ok = resp.status == 206 or resp.headers.get("Accept-Ranges", "").lower() == "bytes"
        total = None if expected is None else start + expected
        with open(part, "ab" if start else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=dest.name, disable=not progress) as bar:
            try:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, socket.timeout, ConnectionError) as err:
                cut = err
            else:
                cut = None
    if cut is not None or (expected is not None and received < expected):
        keep = resume and ranges_ok
        if not keep:
            part.unlink(missing_ok=True)
        what = f"{type(cut).__name__}: {cut}" if cut is not None else "the connection closed early"
        raise DownloadError(
            f"downloading {url} stopped after {start + received} of "
            f"{'?' if total is None else total} bytes ({what}); "
            + (f"the partial file {part} was kept: run again to resume" if keep
               else "nothing was kept: run again"))
    bad = _mismatch(part, hashes)
    if bad is not None:
        part.unlink()
        algorithm, want, got = bad
        raise ChecksumError(f"{url} downloaded with {algorithm} {got}, expected {want}; the file "
                            "was deleted. Run again; if it persists the file on the server "
                            "changed or the expected checksum is wrong")
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------- archives
def _inside(name: str) -> bool:
    """True if the relative archive path ``name`` stays inside the extraction folder."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return False
    norm = posixpath.normpath(name)
    return norm != ".." and not norm.startswith("../") and not posixpath.isabs(norm)


def _tar_problems(members) -> list:
    problems = []
    for m in members:
        if not _inside(m.name):
            problems.append(f"{m.name!r} (path outside the target folder)")
        elif m.issym() or m.islnk():
            # symlinks resolve from the member's folder, hard links from the archive root
            base = posixpath.dirname(m.name) if m.issym() else ""
            target = posixpath.join(base, m.linkname)
            if posixpath.isabs(m.linkname) or not _inside(target):
                problems.append(f"{m.name!r} (link to {m.linkname!r}, outside the target folder)")
        elif not (m.isfile() or m.isdir()):
            problems.append(f"{m.name!r} (device, FIFO or other special file)")
    return problems


def _zip_problems(infos) -> list:
    problems = []
    for info in infos:
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)  # 0 when the archiver stored no file type
        if not _inside(info.filename):
            problems.append(f"{info.filename!r} (path outside the target folder)")
        elif kind == stat.S_IFLNK:
            problems.append(f"{info.filename!r} (symbolic link; not supported in zip archives)")
        elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            problems.append(f"{info.filename!r} (device, FIFO or other special file)")
    return problems


def _archive_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    raise ArchiveError(f"'{path}' is not a supported archive; expected one of .zip, "
                       f"{', '.join(_TAR_SUFFIXES)}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def extract_archive(path, target_dir, overwrite: bool = False) -> Path:
    """Extract a ``.tar``/``.tgz``/``.tar.gz``/``.zip`` (and ``.tar.bz2``/``.tar.xz``) safely.

    Every member is checked before anything is written; one bad member refuses the
    whole archive (:class:`ArchiveError`, naming the members): absolute paths, ``..``
    components, backslashes or drive letters, symbolic or hard links pointing outside
    the target, device files and FIFOs. Tar archives are also extracted with
    ``filter="data"`` where this Python has it. Extraction goes to a temporary folder
    beside ``target_dir`` and its top-level entries are then moved in, so a failure leaves
    no stray files. An entry that already exists in ``target_dir`` is an error unless
    ``overwrite=True`` (then it is replaced). Returns ``Path(target_dir)``.
    """
    path, target = Path(path), Path(target_dir)
    kind = _archive_kind(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-extract-", dir=target.parent))
    try:
        try:
            if kind == "tar":
                with tarfile.open(path) as tf:
                    problems = _tar_problems(tf.getmembers())
                    if not problems:
                        if hasattr(tarfile, "data_filter"):
                            tf.extractall(tmp, filter="data")
                        else:  # older Python: the explicit check above is the guard
                            tf.extractall(tmp)
            else:
                with zipfile.ZipFile(path) as zf:
                    problems = _zip_problems(zf.infolist())
                    if not problems:
                        zf.extractall(tmp)
        except _FILTER_ERRORS as err:  # the "data" filter caught what the check did not
            raise ArchiveError(f"refusing to extract '{path}': {err}. Nothing was extracted; "
                               "get the archive from a trusted source") from err
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
            raise ArchiveError(f"cannot extract '{path}' ({type(err).__name__}: {err}); the "
                               "archive is damaged or truncated — download it again") from err
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ArchiveError(f"refusing to extract '{path}': {len(problems)} unsafe member(s): "
                               f"{shown}. Nothing was extracted; get the archive from a trusted source")
        entries = sorted(tmp.iterdir())
        if target.exists():
            clashes = [e.name for e in entries if (target / e.name).exists() or (target / e.name).is_symlink()]
            if clashes and not overwrite:
                raise ArchiveError(f"'{target}' already contains {clashes[:5]} from '{path}'; "
                                   "remove them, extract elsewhere, or pass overwrite=True")
            for e in entries:
                if (target / e.name).exists() or (target / e.name).is_symlink():
                    _remove(target / e.name)
                os.replace(e, target / e.name)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
