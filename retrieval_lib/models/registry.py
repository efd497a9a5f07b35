"""The registry of the papers' released networks, and their download into the cache.

:func:`released_networks` lists every file the authors released for the revisited
Oxford/Paris numbers the book cites (:class:`ReleasedNetwork`: URL, the hash that checks it,
architecture, pooling, whitening, input normalisation, the authors' test setting and the
numbers they publish for it, each with the table it comes from). The list is data,
``models/released_networks.json`` (shipped with the package; its sources are named in
:mod:`retrieval_lib.models.released`). :func:`fetch_network` downloads one file into the
cache and checks it against the hash in its name. Taught in
``notebooks/09_reproductions.ipynb``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from retrieval_lib.data.download import ChecksumError, download, file_hash
from retrieval_lib.errors import FetchError, UsageError

__all__ = ["ReleasedNetwork", "released_networks", "registry_entry", "fetch_network", "hash_prefix",
           "network_cache", "REGISTRY_FILE"]

REGISTRY_FILE = Path(__file__).with_name("released_networks.json")
"""The registry as data: ``{"drive_files": {name: file name}, "networks": [ReleasedNetwork fields, ...]}``."""
# torch.hub's convention (torch/hub.py HASH_REGEX = r'-([a-f0-9]*)\.'), which cirtorch's load_url
# relied on: the hex run after the last '-' of the file name is a prefix of the file's sha256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.[A-Za-z]+$")


@dataclass(frozen=True)
class ReleasedNetwork:
    """One released file.

    ``format``: ``"cirtorch"`` (``{'state_dict', 'meta'}``), ``"cirtorch-features"`` (a state
    dict of cirtorch's ``features``: ImageNet weights converted from Caffe),
    ``"cirtorch-whiten"`` (a ``{'weight', 'bias'}`` FC whitening for off-the-shelf features) or
    ``"dirtorch"`` (``{'model_options', 'state_dict', 'preprocess', 'pca', ...}``).
    ``sha256_prefix``: the hash in the file name (``None``: the authors publish none).
    ``setting``: the authors' test setting (``script``, ``image_size``, ``scales``, ``msp``,
    ``post_whitening``, ``resize``). ``numbers``: ``{"dataset", "protocol", "value", "table",
    "row", "file"}`` where ``file`` says whether the source ties the number to this file
    (``"named"``: the row links this file; ``"implied"``: the README does not name the file).
    """

    name: str
    paper: str
    format: str
    url: str
    sha256_prefix: Optional[str]
    architecture: str
    pooling: str
    whitening: str
    normalisation: str
    setting: dict
    numbers: tuple = ()
    source: str = ""
    notes: str = ""
    drive_id: Optional[str] = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.drive_id is None else _DRIVE_FILES[self.name]

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["numbers"] = [dict(n) for n in self.numbers]
        out["file_name"] = self.file_name
        return out


def _read_registry() -> tuple[dict, dict]:
    """``({name: ReleasedNetwork}, {name: Drive file name})`` from :data:`REGISTRY_FILE`, in its order."""
    with open(REGISTRY_FILE, encoding="utf-8") as f:
        doc = json.load(f)
    nets = [ReleasedNetwork(**{**n, "numbers": tuple(n["numbers"])}) for n in doc["networks"]]
    return {n.name: n for n in nets}, dict(doc["drive_files"])


_REGISTRY, _DRIVE_FILES = _read_registry()


def released_networks() -> dict:
    """Every released file the book knows: ``{name: ReleasedNetwork}`` in a fixed order.

    Names are the authors' (cirtorch's ``PRETRAINED`` keys, ``imagenet-caffe-<arch>`` for its
    ``FEATURES``, the whitening files' stems without hash, dirtorch's README model names).
    Taught in ``notebooks/09_reproductions.ipynb``.
    """
    return dict(_REGISTRY)


def hash_prefix(file_name: str) -> Optional[str]:
    """The sha256 prefix a file name carries (``...-b80fb85.pth`` -> ``"b80fb85"``), or ``None``."""
    m = _HASH_IN_NAME.search(file_name)
    return m.group(1) if m else None


def network_cache(root=None) -> Path:
    """Where downloaded networks go: ``root``, else ``$RETRIEVAL_CACHE/networks``, else
    ``~/.cache/retrieval_lib/networks``."""
    if root is not None:
        return Path(root).expanduser()
    value = os.environ.get("RETRIEVAL_CACHE", "").strip()
    return (Path(value).expanduser() if value else Path.home() / ".cache" / "retrieval_lib") / "networks"



def registry_entry(name: str) -> ReleasedNetwork:
    """The :class:`ReleasedNetwork` called ``name``; ``UsageError`` naming the choices for any other name."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown released network {name!r}; choose one of {sorted(_REGISTRY)} "
                         "(retrieval_lib.released_networks() lists them), or pass a local file path")
    return _REGISTRY[name]


def _verify_prefix(path: Path, prefix: str, url: str) -> None:
    got = file_hash(path, "sha256")
    if not got.startswith(prefix):
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{url} downloaded with sha256 {got}, which does not start with {prefix} "
                            "(the hash in its file name); the file was deleted. Run again; if it "
                            "persists the file on the server changed")


def fetch_network(name: str, root=None, progress: bool = True) -> Path:
    """The released file ``name`` in the cache (downloaded once, checked); its path.

    The file goes to ``network_cache(root) / <file name>``. Its sha256 must start with the hash
    in its file name (torch.hub's convention, which cirtorch's ``load_url`` used): a cached or
    downloaded file that does not is deleted and :class:`ChecksumError` raised (exit code 4).
    A transfer cut short raises :class:`~retrieval_lib.data.download.DownloadError`.

    dirtorch's files are on Google Drive, which answers large files with a confirmation page
    rather than the file, and publish no hash: they are not downloaded here. When the file is
    already in the cache it is returned; otherwise :class:`~retrieval_lib.errors.FetchError`
    says how to get it (``pip install gdown; gdown <id> -O <cache>/<file>``, the route that
    works in Colab, or a browser download), after which ``load_network(name)`` finds it.
    """
    entry = registry_entry(name)
    dest = network_cache(root) / entry.file_name
    if entry.drive_id is not None:
        if dest.is_file():
            return dest
        raise FetchError(
            f"{name} is hosted on Google Drive (id {entry.drive_id}) without a published checksum, so it is "
            f"not downloaded automatically. Get it with `pip install gdown && gdown {entry.drive_id} -O {dest}` "
            f"(works in Colab), or open https://drive.google.com/file/d/{entry.drive_id} in a browser and save "
            f"the file as {dest}; then load_network({name!r}) finds it (or pass the file's path)")
    prefix = entry.sha256_prefix
    if dest.is_file():
        if file_hash(dest, "sha256").startswith(prefix):
            return dest
        dest.unlink()  # a damaged or foreign file: fetch it again
    tmp = dest.with_name(dest.name + ".unverified")
    download(entry.url, tmp, progress=progress, resume=False)
    _verify_prefix(tmp, prefix, entry.url)
    os.replace(tmp, dest)
    return dest
