"""real171 from its public sources: fetch, verify, convert, and write the manifest.

The 171 photos of :func:`~retrieval_lib.data.datasets.real171` come from four public GitHub
repositories at pinned commits. The package carries their table, ``real171_sources.json``
(:func:`load_sources`), not the photos: for every file the source repository, commit, path
and raw URL, the source's sha256 and byte count, and the sha256 and size of the JPEG this
project measures on. Its ``recipe`` is the conversion (:func:`convert`)::

    PIL.Image.open(source).convert("RGB")
    -> if the longer side L > 640: resize to (round(w*640/L), round(h*640/L)), Image.BICUBIC
    -> save as JPEG, quality=90 (Pillow's defaults otherwise)

:func:`download_real171` builds ``<root>/real171/`` from the sources: each source is
downloaded with :func:`~retrieval_lib.data.download.download` (resumable) into
``real171/.sources/``, checked against its byte count and sha256 *before* it is decoded,
converted, and written atomically (a temporary file renamed into place); a file already
there and good is neither fetched nor converted again. ``manifest.json`` (subsets, groups,
source and licence per subset, the same bytes as the project's copy) is written last, so a
set without it is an unfinished one and :func:`~retrieval_lib.data.datasets.default_benchmark`
does not pick it.

With the Pillow the table was made with (13.0.0) the conversion gives the table's JPEGs byte
for byte. Another Pillow or libjpeg can differ by a few grey levels: such a file is kept, its
hash is recorded in ``real171/converted.json`` (so a rerun knows it is good) and the report
counts it; ``tests/test_real171_download.py`` shows the mAP table is unchanged at three
decimals on a set whose pixels differ that much.

A mirror (``mirror=`` or ``RETRIEVAL_MIRROR``) replaces ``https://raw.githubusercontent.com``
in every URL and keeps the rest, ``/<owner>/<repo>/<commit>/<path>``: a lab copy, a local
HTTP server in the tests, or ``file:///path/to/copy``.

Command line: ``python -m retrieval_lib download real171 --data DIR [--mirror URL]``
(:mod:`retrieval_lib.book.downloads`).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import PIL
from PIL import Image
from tqdm.auto import tqdm

from retrieval_lib.data.download import ChecksumError, DownloadError, download, file_hash
from retrieval_lib.data.roots import data_root
from retrieval_lib.errors import FetchError, MissingDataError
from retrieval_lib.files import write_atomic

__all__ = ["SOURCES_FILE", "HOST", "MAX_SIDE", "JPEG_QUALITY", "Real171Report", "load_sources", "source_url",
           "convert", "download_real171", "real171_status", "source_bytes_total"]

SOURCES_FILE = Path(__file__).with_name("real171_sources.json")
"""The packaged table of sources (metadata only; the photos are fetched by :func:`download_real171`)."""

HOST = "https://raw.githubusercontent.com"
"""The host every source URL starts with; a mirror replaces it."""

MAX_SIDE = 640
JPEG_QUALITY = 90
FOLDER = "real171"
RECORD = "converted.json"  # files whose conversion here differs from the table's bytes (kept)
STAGING = ".sources"
COMMAND = "python -m retrieval_lib download real171 --data {root}"


def load_sources(path=None) -> dict:
    """The table: ``{"host", "recipe", "manifest", "files": {"<subset>/<file>": entry}}``.

    Each entry holds ``url``, ``repo``, ``commit``, ``path``, ``source_sha256``,
    ``source_bytes``, ``sha256`` (of the converted JPEG) and ``size`` ``[w, h]``.
    ``path`` defaults to the packaged :data:`SOURCES_FILE`.
    """
    path = SOURCES_FILE if path is None else Path(path)
    return json.loads(Path(path).read_text(encoding="utf-8"))


def source_bytes_total(table: Optional[dict] = None) -> int:
    """Bytes of all the sources together (what a first :func:`download_real171` fetches)."""
    table = load_sources() if table is None else table
    return sum(int(e["source_bytes"]) for e in table["files"].values())


def source_url(entry: dict, mirror: Optional[str] = None, host: str = HOST) -> str:
    """The URL of one source: the table's ``url``, with ``host`` replaced by ``mirror`` when given."""
    url = entry["url"]
    if not mirror:
        return url
    if not url.startswith(host + "/"):
        raise ValueError(f"source URL {url!r} does not start with {host}/, so a mirror cannot stand for it")
    return mirror.rstrip("/") + url[len(host):]


def convert(data: bytes, max_side: int = MAX_SIDE, quality: int = JPEG_QUALITY) -> bytes:
    """The table's recipe on the bytes of one source image; returns the JPEG's bytes.

    RGB; if the longer side ``L`` exceeds ``max_side``, a bicubic resize to
    ``(round(w * max_side / L), round(h * max_side / L))``; JPEG at ``quality``.
    """
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    longer = max(w, h)
    if longer > max_side:
        rgb = rgb.resize((round(w * max_side / longer), round(h * max_side / longer)), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Real171Report:
    """What :func:`download_real171` did.

    Attributes:
        folder: ``<root>/real171``.
        n_files: files in the set (171 for the packaged table).
        fetched: files made in this run (their source downloaded, or found verified in
            ``.sources/`` after an interrupted run, and converted).
        kept: files already there and good (nothing fetched for them).
        differ: files of the finished set whose bytes differ from the table's ``sha256``
            (converted by another Pillow/libjpeg; kept, listed in ``converted.json``).
        downloaded_bytes: source bytes fetched in this run.
    """

    folder: Path
    n_files: int
    fetched: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    differ: list = field(default_factory=list)
    downloaded_bytes: int = 0

    @property
    def identical(self) -> int:
        """Files byte-identical to the table's JPEGs."""
        return self.n_files - len(self.differ)

    def summary(self) -> str:
        """One line: where the set is, what was fetched, how many files match the table byte for byte."""
        line = (f"real171 in {self.folder}: {self.n_files} files, {len(self.fetched)} fetched "
                f"({self.downloaded_bytes / 1e6:.1f} MB of sources), {len(self.kept)} already there; "
                f"{self.identical} of {self.n_files} byte-identical to the table")
        if self.differ:
            line += (f", {len(self.differ)} differ (another Pillow/libjpeg: a few grey levels; kept, "
                     f"listed in {RECORD})")
        return line


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_record(folder: Path) -> dict:
    try:
        doc = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        return dict(doc.get("files", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _write_record(folder: Path, record: dict) -> None:
    path = folder / RECORD
    if not record:
        path.unlink(missing_ok=True)
        return
    doc = {"about": "files of this real171 whose bytes differ from the table's sha256 (converted by "
                    "another Pillow/libjpeg than the table's); each was made from a verified source",
           "pillow": PIL.__version__, "files": dict(sorted(record.items()))}
    text = (json.dumps(doc, indent=1) + "\n").encode()
    write_atomic(path, lambda f: f.write(text))


def _good(path: Path, entry: dict, record: dict, name: str) -> bool:
    if not path.is_file():
        return False
    digest = file_hash(path)
    return digest == entry["sha256"] or record.get(name, {}).get("sha256") == digest


def _root(root) -> Path:
    r = Path(root).expanduser() if root is not None else data_root()
    if r is None:
        raise MissingDataError("no data root for real171: pass --data DIR (root= in Python) or set "
                               "RETRIEVAL_DATA to the folder that should hold real171/")
    return r


def _what(err: DownloadError) -> str:
    """What went wrong with one transfer, without :func:`download`'s generic advice."""
    cause = err.__cause__
    if isinstance(cause, urllib.error.HTTPError):
        return f"HTTP {cause.code} {cause.reason}"
    if isinstance(cause, urllib.error.URLError):
        return str(cause.reason)
    return str(cause) if cause is not None else str(err)


def _advice(cause, url: str, root: Path, n_done: int) -> str:
    again = (f"run `{COMMAND.format(root=root)}` again (the {n_done} files already built are kept "
             "and not fetched again)")
    if isinstance(cause, urllib.error.HTTPError):
        if cause.code == 404:
            return ("the source is not at that address (moved, or not on the mirror): point --mirror "
                    "(RETRIEVAL_MIRROR) at a copy laid out as /<owner>/<repo>/<commit>/<path>, then " + again)
        return "the server refused it: try later or use --mirror URL, then " + again
    if url.startswith("file:"):
        return "the mirror folder lacks this file (laid out as /<owner>/<repo>/<commit>/<path>?): fix it and " + again
    if isinstance(cause, (urllib.error.URLError, OSError)):
        return ("no connection to the host (offline?): connect, or use --mirror URL for a copy you can "
                "reach, and " + again)
    return again


def _disk_full(err: OSError, path: Path, root: Path) -> FetchError:
    return FetchError(f"real171: the disk is full while writing {path} ({err.strerror}); free some space "
                      f"(the finished set takes about 13 MB, plus one source at a time) and run "
                      f"`{COMMAND.format(root=root)}` again")


def _fetch_source(name: str, entry: dict, url: str, staging: Path, timeout: float) -> tuple:
    """``(bytes, downloaded)``: one source, from ``staging`` when a verified copy is there (an
    interrupted run), else downloaded into it; returned once its size and sha256 are right."""
    src = staging / (name.replace("/", "__") + Path(entry["path"]).suffix + ".src")
    want_bytes, want_sha = int(entry["source_bytes"]), entry["source_sha256"]
    if src.is_file() and (src.stat().st_size != want_bytes or file_hash(src) != want_sha):
        src.unlink()  # a stale or damaged source from an earlier run
    fetched = not src.is_file()
    download(url, src, progress=False, timeout=timeout)
    data = src.read_bytes()
    problem = None
    if len(data) != want_bytes:
        problem = (f"{len(data)} bytes, expected {want_bytes} ("
                   f"{'truncated' if len(data) < want_bytes else 'too long'})")
    elif _sha(data) != want_sha:
        problem = f"sha256 {_sha(data)}, expected {want_sha}"
    if problem is not None:
        src.unlink()
        raise ChecksumError(f"real171: the source of {name} from {url} has {problem}; it was deleted and "
                            "nothing was converted. Run again; if it persists the source (or the "
                            "mirror's copy) is not the pinned file")
    return data, fetched


def download_real171(root=None, mirror: Optional[str] = None, progress: bool = True,
                     sources=None, keep_sources: bool = False, timeout: float = 30) -> Real171Report:
    """Build ``<root>/real171/`` from the original public files; return a :class:`Real171Report`.

    Args:
        root: the data root (default ``RETRIEVAL_DATA``); the set goes to ``<root>/real171``.
        mirror: stands for ``https://raw.githubusercontent.com`` in every source URL (default
            ``RETRIEVAL_MIRROR``; unset: GitHub itself).
        progress: one progress bar in bytes over the sources to fetch.
        sources: another table (a path or a dict in the format of :func:`load_sources`);
            default the packaged one.
        keep_sources: keep the downloaded sources in ``real171/.sources/`` (default: each is
            deleted once converted, and the folder at the end).
        timeout: seconds a connection may stay silent.

    Files already there whose sha256 is the table's (or the one recorded in
    ``converted.json`` when this machine's Pillow made them) are kept; the others are fetched,
    verified (byte count and sha256, before decoding) and converted. ``manifest.json`` is
    written last. Progress bars: ``tqdm.auto``.

    Raises:
        MissingDataError: no root and ``RETRIEVAL_DATA`` unset.
        DownloadError: a source could not be fetched (HTTP error such as 404, no network,
            a transfer cut short); the message names the file and what to do.
        ChecksumError: a source with the wrong byte count or sha256 (deleted).
        FetchError: the disk filled up, or a verified source that Pillow cannot read.
    """
    table = sources if isinstance(sources, dict) else load_sources(sources)
    host = table.get("host", HOST)
    mirror = mirror or os.environ.get("RETRIEVAL_MIRROR", "").strip() or None
    root = _root(root)
    folder = root / FOLDER
    files = table["files"]
    report = Real171Report(folder=folder, n_files=len(files))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full(err, folder, root) from err
        raise
    record = _read_record(folder)
    todo = []
    for name, entry in files.items():
        if _good(folder / name, entry, record, name):
            report.kept.append(name)
        else:
            todo.append(name)
            record.pop(name, None)
    staging = folder / STAGING
    bar = tqdm(total=sum(int(files[n]["source_bytes"]) for n in todo), unit="B", unit_scale=True,
               unit_divisor=1024, desc="real171 sources", disable=not progress or not todo)
    try:
        for name in todo:
            entry = files[name]
            url = source_url(entry, mirror, host)
            dest = folder / name
            try:
                staging.mkdir(parents=True, exist_ok=True)
                dest.parent.mkdir(parents=True, exist_ok=True)
                data, fetched = _fetch_source(name, entry, url, staging, timeout)
                try:
                    jpeg = convert(data)
                except Exception as err:  # a verified source Pillow cannot read: this Pillow lacks a codec
                    raise FetchError(f"real171: the verified source of {name} ({url}) could not be converted "
                                     f"({type(err).__name__}: {err}); install a Pillow that reads "
                                     f"{Path(entry['path']).suffix} files and run again") from err
                write_atomic(dest, lambda f: f.write(jpeg))
            except DownloadError as err:
                cause = err.__cause__
                raise DownloadError(f"real171: could not fetch {name} from {url} ({_what(err)}); "
                                    f"{_advice(cause, url, root, len(report.kept) + len(report.fetched))}") \
                    from cause
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise _disk_full(err, dest, root) from err
                raise
            if _sha(jpeg) != entry["sha256"]:
                record[name] = {"sha256": _sha(jpeg), "source_sha256": entry["source_sha256"]}
            if not keep_sources:
                for p in staging.glob(name.replace("/", "__") + ".*"):
                    p.unlink()
            report.fetched.append(name)
            report.downloaded_bytes += int(entry["source_bytes"]) if fetched else 0
            bar.update(int(entry["source_bytes"]))
    finally:
        bar.close()
        try:
            _write_record(folder, record)
        except OSError:
            pass  # the record only saves a rerun from fetching the files this Pillow made again
    if not keep_sources and staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
    manifest = (json.dumps(table["manifest"], indent=1, ensure_ascii=False)).encode("utf-8")
    path = folder / "manifest.json"
    if not (path.is_file() and path.read_bytes() == manifest):
        try:
            write_atomic(path, lambda f: f.write(manifest))
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise _disk_full(err, path, root) from err
            raise
    report.differ = sorted(n for n in record if n in files)
    return report


def real171_status(root=None, sources=None) -> tuple:
    """``(files present, files in the table, manifest present)`` under ``<root>/real171`` (no hashing)."""
    table = sources if isinstance(sources, dict) else load_sources(sources)
    folder = _root(root) / FOLDER
    present = sum((folder / name).is_file() for name in table["files"])
    return present, len(table["files"]), (folder / "manifest.json").is_file()
