"""``python -m retrieval_lib download``: one command for every data set and released network.

::

    python -m retrieval_lib download real171 --data DIR [--mirror URL]   # the 171 real photos, from their sources
    python -m retrieval_lib download roxford5k --data DIR                # also rparis6k, rsfm120k, cub
    python -m retrieval_lib download retrievalSfM120k-resnet101-gem      # a released network, into the cache
    python -m retrieval_lib download --list [--data DIR]                 # each item: size, licence, present?

Data sets go to the data root (``--data``, else ``RETRIEVAL_DATA``); networks to
:func:`~retrieval_lib.models.released.network_cache` (``$RETRIEVAL_CACHE/networks``).
Every item is fetched by the library's own downloader (:func:`~retrieval_lib.data.download.download`:
a ``.part`` file renamed into place once complete and verified, resumed with an HTTP range
when a transfer was cut), checked where a checksum exists, and skipped when already there.
A failure ends as one line naming what failed and what to do
(:class:`~retrieval_lib.errors.FetchError`, exit code 4).
"""
from __future__ import annotations

import argparse
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from retrieval_lib.data.datasets import (CUB_URL, GND_URL, IMAGE_URLS, REVISITED, data_root, download_cub,
                                         download_revisited, find_gnd, load_gnd)
from retrieval_lib.data.download import ArchiveError
from retrieval_lib.data.real171 import download_real171, real171_status, source_bytes_total
from retrieval_lib.data.sfm120k import SFM_BASE_URL, SFM_NAME, download_sfm120k
from retrieval_lib.errors import ExpectedError, FetchError, UsageError
from retrieval_lib.models.released import fetch_network, network_cache, released_networks

__all__ = ["DataItem", "DATA_ITEMS", "item_names", "list_rows", "format_list", "fetch_item",
           "add_download_parser", "main_download"]

REAL171_BUILT_MB = 13.0  # the project's copy of real171 (Pillow 13.0.0): 12 995 829 bytes


@dataclass(frozen=True)
class DataItem:
    """One data set the ``download`` command fetches into the data root."""

    name: str
    size: str       # what a first download costs, when known
    licence: str
    where: str      # the server it comes from
    fetch: Callable  # (root, mirror, progress) -> a line saying what is there now
    present: Callable  # (root) -> "yes" / "no" / "partial: ..."


def _real171_fetch(root, mirror, progress) -> str:
    report = download_real171(root, mirror=mirror, progress=progress)
    return report.summary()


def _real171_present(root: Path) -> str:
    have, total, manifest = real171_status(root)
    if have == total and manifest:
        return "yes"
    return "no" if have == 0 else f"partial: {have}/{total} files"


def _revisited_fetch(name):
    def fetch(root, mirror, progress) -> str:
        return f"{name} in {download_revisited(name, root, progress=progress)}"
    return fetch


def _revisited_present(name):
    def present(root: Path) -> str:
        try:
            doc = load_gnd(find_gnd(name, root))
        except FileNotFoundError:
            return "no"
        except ValueError:
            return "no (damaged ground truth)"
        needed = doc["imlist"] + doc["qimlist"]
        have = sum((root / name / "jpg" / f"{n}.jpg").is_file() for n in needed)
        if have == len(needed):
            return "yes"
        return "ground truth only" if have == 0 else f"partial: {have}/{len(needed)} images"
    return present


def _cub_fetch(root, mirror, progress) -> str:
    return f"CUB-200-2011 in {download_cub(root, progress=progress)}"


def _cub_present(root: Path) -> str:
    return "yes" if (root / "CUB_200_2011" / "images.txt").is_file() else "no"


def _sfm_fetch(root, mirror, progress) -> str:
    return f"rSfM-120k in {download_sfm120k(root, progress=progress)}"


def _sfm_present(root: Path) -> str:
    base = root / "train" / SFM_NAME
    if not (base / f"{SFM_NAME}.pkl").is_file():
        return "no"
    return "yes" if (base / "ims").is_dir() else "database only"


_RESEARCH = "research use; terms at "
# database images per revisited data set (Radenovic et al., CVPR 2018; the imlist of each gnd_*.pkl)
REVISITED_IMAGES = {"roxford5k": 4993, "rparis6k": 6322}
DATA_ITEMS = {
    "real171": DataItem(
        "real171", f"{source_bytes_total() / 1e6:.1f} MB of sources -> {REAL171_BUILT_MB} MB",
        "research use; per subset in its manifest (UKBench, WxBS, EVD: none stated; Sacre-Coeur: "
        "Creative Commons; phototourism samples: non-commercial academic)",
        "raw.githubusercontent.com (4 repositories at pinned commits) or --mirror",
        _real171_fetch, _real171_present),
    **{name: DataItem(name, f"{REVISITED_IMAGES[name]:,} database images + 70 query images in "
                      + " and ".join(u.rsplit("/", 1)[-1] for u in IMAGE_URLS[name]) + " (byte size: not recorded here)",
                      _RESEARCH + IMAGE_URLS[name][0].rsplit("/", 1)[0],
                      GND_URL.split("/")[2] + " + www.robots.ox.ac.uk",
                      _revisited_fetch(name), _revisited_present(name)) for name in REVISITED},
    "rsfm120k": DataItem("rsfm120k", "? (about 117k JPEGs in one archive)", _RESEARCH + SFM_BASE_URL.rsplit("/", 1)[0],
                         SFM_BASE_URL.split("/")[2], _sfm_fetch, _sfm_present),
    "cub": DataItem("cub", "1.1 GB (md5-checked)", _RESEARCH + "data.caltech.edu/records/65de6-vp158",
                    CUB_URL.split("/")[2], _cub_fetch, _cub_present),
}


def item_names() -> list:
    """Every name ``download`` accepts: the data sets, then the released networks."""
    return list(DATA_ITEMS) + list(released_networks())


def _network_licence(entry) -> str:
    repo = ("naver/deep-image-retrieval" if entry.source.startswith("dirtorch")
            else "filipradenovic/cnnimageretrieval-pytorch")
    return f"the authors' release; terms at github.com/{repo}"


def _network_present(entry) -> str:
    if (network_cache() / entry.file_name).is_file():
        return "yes"
    return "no (Google Drive: by hand)" if entry.drive_id is not None else "no"


def list_rows(root: Optional[Path]) -> list:
    """``[(name, kind, size, present, licence)]`` for every item (``present`` needs a data root for data sets)."""
    rows = []
    for item in DATA_ITEMS.values():
        present = item.present(root) if root is not None else "? (no data root)"
        rows.append((item.name, "data", item.size, present, item.licence))
    for name, entry in released_networks().items():
        rows.append((name, "network", "?", _network_present(entry), _network_licence(entry)))
    return rows


def format_list(root: Optional[Path]) -> str:
    """The text of ``download --list``: where things go, then one aligned row per item."""
    head = ("name", "kind", "download size", "present", "licence")
    rows = list_rows(root)
    widths = [max(len(str(r[k])) for r in rows + [head]) for k in range(4)]
    lines = [f"data root: {root if root is not None else 'not set (pass --data DIR or set RETRIEVAL_DATA)'}",
             f"networks:  {network_cache()}", ""]
    for r in [head] + rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r[:4], widths)) + "  " + r[4])
    lines.append("")
    lines.append("'?': size not known here. Fetch one with `python -m retrieval_lib download NAME --data DIR`")
    return "\n".join(lines)


def _data_root(data) -> Path:
    root = Path(data).expanduser() if data else data_root()
    if root is None:
        raise UsageError("where should the data go? pass --data DIR (or set RETRIEVAL_DATA); the notebooks "
                         "and `reproduce` then read it with --data DIR or RETRIEVAL_DATA=DIR")
    return root


def fetch_item(name: str, data=None, mirror: Optional[str] = None, progress: bool = True) -> str:
    """Fetch one item by name; return a line saying what is there now.

    Data sets go under the data root ``data`` (else ``RETRIEVAL_DATA``); networks into the
    network cache. ``mirror`` is used by ``real171`` (it stands for raw.githubusercontent.com).

    Raises:
        UsageError: an unknown name, or a data set without a data root.
        FetchError: the download failed or did not verify (the message names the file and
            what to do); also a damaged archive or a full disk.
    """
    networks = released_networks()
    if name not in DATA_ITEMS and name not in networks:
        raise UsageError(f"nothing called {name!r} to download; choose a data set ({', '.join(DATA_ITEMS)}) or a "
                         "released network (`python -m retrieval_lib download --list` shows them all)")
    what = f"{name} ({'the network' if name in networks else 'the data set'})"
    try:
        if name in networks:
            return f"{name} in {fetch_network(name, progress=progress)}"
        return DATA_ITEMS[name].fetch(_data_root(data), mirror, progress)
    except ExpectedError:
        raise
    except ArchiveError as err:
        raise FetchError(f"{what}: {err}") from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise FetchError(f"{what}: the disk is full ({err}); free space and run "
                             f"`python -m retrieval_lib download {name}` again: what is complete is kept") from err
        if isinstance(err, FileNotFoundError):
            raise FetchError(f"{what}: {err}") from err
        raise


def add_download_parser(sub) -> argparse.ArgumentParser:
    """Add the ``download`` subcommand to ``python -m retrieval_lib``'s subparsers; return it."""
    p = sub.add_parser(
        "download", help="fetch a data set or a released network (--list shows them all)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fetch one data set into the data root, or one released network into the cache. "
                    "Resumable, checked where a checksum exists; what is already there is not fetched again.",
        epilog="examples:\n  python -m retrieval_lib download real171 --data ~/retrieval_data\n"
               "  python -m retrieval_lib download roxford5k --data ~/retrieval_data\n"
               "  python -m retrieval_lib download --list --data ~/retrieval_data\n\n"
               "exit code 4: a download failed or did not verify (the message says which file and what to do)")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help=f"{', '.join(DATA_ITEMS)}, or a released network name (see --list)")
    p.add_argument("--list", action="store_true", help="show every item, its size, licence and whether it is here")
    p.add_argument("--data", default=None, help="the data root (default: $RETRIEVAL_DATA)")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="real171: a copy that stands for https://raw.githubusercontent.com (laid out as "
                        "/<owner>/<repo>/<commit>/<path>; also $RETRIEVAL_MIRROR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main_download(args) -> int:
    """Run ``download`` from parsed arguments: print the list, or fetch one item and say where it is."""
    if args.list:
        root = Path(args.data).expanduser() if args.data else data_root()
        print(format_list(root))
        return 0
    if not args.name:
        raise UsageError("name what to download (`python -m retrieval_lib download --list` shows every name), "
                         "e.g. `python -m retrieval_lib download real171 --data DIR`")
    line = fetch_item(args.name, args.data, mirror=args.mirror, progress=not args.quiet)
    print(line)
    if args.name in DATA_ITEMS:
        root = _data_root(args.data)
        if os.environ.get("RETRIEVAL_DATA", "") != str(root):
            print(f"use it with --data {root} or export RETRIEVAL_DATA={root}")
    return 0
