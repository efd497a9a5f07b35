"""Explore your own photos: query by picture, every descriptor side by side, and why each result matched.

The widgets of ``notebooks/10_explorer.ipynb``, usable in JupyterLab, in Colab and as a
stand-alone app (``voila notebooks/10_explorer.ipynb``)::

    ex = Explorer.from_book(book)          # the run's benchmark first; the offline default, real171 when present
    ex.use_collection(ex.source_names()[0])
    display(ex.app())                      # thumbnails, sliders, uploads, the "why" overlays

What the page holds:

* **collections** -- the run's benchmark, the offline default, real171 when the data root has
  it, a folder of your photos (``root/<group>/<photo>`` as
  :meth:`~retrieval_lib.data.datasets.GroupDataset.from_folder` reads it, or a flat folder of
  photos with no groups) and the photos uploaded in the page (:func:`collection_from_folder`,
  :func:`read_photo`);
* **the query** -- click the button under a thumbnail, or upload a photo: it is searched in
  whatever collection is shown;
* **every descriptor side by side** -- MAC, SPoC, GeM at the ``p`` slider, R-MAC at the ``L``
  slider, and any learned head passed as ``heads={"wGeM (05)": module}``, one row of the top
  ``k`` each, with scores (:func:`retrieval_lib.search.topk.top_k_rows`); "compare two" shows
  two rows and where they differ (:func:`retrieval_lib.search.topk.compare_rows`);
* **why** -- under each result: MAC's shared top channels and the cells their maxima come
  from (:func:`retrieval_lib.book.explain.implicit_correspondences`, 01's figure), SPoC's and
  GeM's per-cell share of the pooled value (:func:`retrieval_lib.book.sweeps.gem_contributions`,
  03), R-MAC's region contributions, which add up to the score
  (:func:`retrieval_lib.layers.contributions.rmac_contributions`, 04), a wGeM head's learned mask
  (05) and a DARAC head's region-slot weights (06).

Speed: a collection's feature maps are extracted once (progress bar, on-disk cache keyed on
the files, :func:`~retrieval_lib.engine.extract.extract_fmaps`) and kept stacked by map size;
every slider move or click re-pools those maps (each pooling's descriptors are kept too), so
the backbone never runs again except for an uploaded query. :meth:`Explorer.timings` records
how long each redraw took; :func:`measure_redraws` drives the controls and reports them.

Bad input never shows a traceback: an unreadable or non-image upload, a huge photo, a folder
that does not exist, is empty or holds one photo, and duplicate files each give a message in
the page (:class:`ExplorerInputError`), and the controls keep working.
"""
from __future__ import annotations

import datetime
import hashlib
import html
import importlib
import io
import statistics
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from retrieval_lib.book.darac import show_region_weights
from retrieval_lib.book.explain import cell_centers, conv_chain, implicit_correspondences, receptive_field
from retrieval_lib.book.sweeps import gem_contributions
from retrieval_lib.book.viz import (draw_boxes, fmap_to_image_box, overlay, show_correspondences, show_two_rankings,
                                   to_numpy_image)
from retrieval_lib.data.datasets import IMAGE_EXTENSIONS, GroupDataset, cache_root, offline_default, real171
from retrieval_lib.data.datasets import data_root as default_data_root
from retrieval_lib.data.images import MAX_ASPECT, ImageError, ImageList, load_image
from retrieval_lib.engine.extract import extract_fmaps, resize_longer_side
from retrieval_lib.errors import UsageError
from retrieval_lib.layers.contributions import rmac_contributions
from retrieval_lib.layers.functional import l2n, mac, region_mac, rmac_regions
from retrieval_lib.layers.pooling import MAC, RMAC, GeM, SPoC
from retrieval_lib.search.topk import TopK, compare_rows, top_k_rows

__all__ = ["ExplorerInputError", "MAX_UPLOAD_BYTES", "MAX_PIXELS", "STORE_SIDE", "read_photo", "Collection",
           "collection_from_folder", "collection_from_benchmark", "Query", "Explorer", "measure_redraws",
           "show_rows", "show_why", "huge_png", "try_bad_inputs"]

MAX_UPLOAD_BYTES = 50_000_000
"""Largest uploaded file accepted, bytes."""
MAX_PIXELS = 80_000_000
"""Largest photo accepted, pixels (width x height): above this a photo is refused with a message."""
STORE_SIDE = 1024
"""Uploaded photos are stored with their longer side at most this many pixels."""
THUMB_SIDE = 128
L_MAX = 5  # the largest L of the page's slider
SMALL = 16  # collections up to this size are extracted in the kernel's process, unfolded
BASE_METHODS = ("MAC", "SPoC", "GeM", "R-MAC")


class ExplorerInputError(UsageError):
    """Input the explorer cannot use (a photo, a folder); the message says what was wrong and what to do."""


# ---------------------------------------------------------------------------------- photos
def read_photo(content: bytes, name: str, max_side: int = STORE_SIDE) -> Image.Image:
    """An uploaded file's bytes -> an upright RGB PIL image, longer side at most ``max_side`` px.

    Raises :class:`ExplorerInputError` naming the file for an empty file, one larger than
    :data:`MAX_UPLOAD_BYTES`, something that is not an image, a corrupt or truncated image,
    a photo of more than :data:`MAX_PIXELS` pixels, or one more elongated than 16:1.
    """
    if not content:
        raise ExplorerInputError(f"'{name}' is empty (0 bytes); choose a photo file (JPEG, PNG, ...)")
    if len(content) > MAX_UPLOAD_BYTES:
        raise ExplorerInputError(f"'{name}' is {len(content) / 1e6:.0f} MB, more than the explorer accepts "
                                 f"({MAX_UPLOAD_BYTES / 1e6:.0f} MB); save a smaller copy of the photo and upload that")
    huge = (f"'{name}' is too large a photo for the explorer (more than {MAX_PIXELS / 1e6:.0f} megapixels); "
            "downscale it (e.g. to 2000 px on its longer side) and upload it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ExplorerInputError(huge.replace("too large a photo", f"{w}x{h} px ({w * h / 1e6:.0f} "
                                                          "megapixels), too large a photo"))
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced size, much faster
                im.load()
                im = ImageOps.exif_transpose(im)
    except ExplorerInputError:
        raise
    except Image.DecompressionBombError as err:
        raise ExplorerInputError(huge) from err
    except UnidentifiedImageError as err:
        raise ExplorerInputError(f"'{name}' is not an image (no image format recognised it); choose a photo "
                                 "file: JPEG, PNG, WebP, BMP, GIF or TIFF") from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
        raise ExplorerInputError(f"'{name}' could not be read as an image ({type(err).__name__}: {err}); the file "
                                 "is corrupt or truncated: export or download it again") from err
    if im.mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if "transparency" in im.info else im.convert("RGB")
    w, h = im.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ExplorerInputError(f"'{name}' is {w}x{h} px, more elongated than {MAX_ASPECT:g}:1; crop it to a "
                                 "less extreme shape and upload it again")
    return resize_longer_side(im, max_side) if max(w, h) > max_side else im


def _thumbnail(path: str, side: int = THUMB_SIDE) -> bytes:
    """JPEG bytes of a small copy of ``path`` (longer side ``side`` px); a grey square if unreadable."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (side, side))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((side, side))
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError):
        im = Image.new("RGB", (side, side), (128, 128, 128))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _jpeg(fig, dpi: int = 72) -> bytes:
    """A matplotlib figure as JPEG bytes (photos: smaller and faster than PNG); the figure is closed,
    so the inline backend never shows it later."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="jpeg", dpi=dpi, pil_kwargs={"quality": 88})
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- collections
@dataclass
class Collection:
    """Photos to search: ``paths``, a group per photo (``labels`` into ``group_names``) or ``None``
    for a flat folder, and ``notes`` (what was left out while building it, said in the page)."""

    name: str
    paths: list
    labels: Optional[np.ndarray] = None
    group_names: Optional[list] = None
    notes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def names(self) -> list:
        return [Path(p).name for p in self.paths]

    def group(self, i: int) -> Optional[str]:
        return None if self.labels is None else self.group_names[int(self.labels[i])]

    def summary(self) -> str:
        groups = "" if self.labels is None else f" in {len(self.group_names)} groups"
        return f"{self.name}: {len(self)} photos{groups}"


def collection_from_benchmark(benchmark, name: Optional[str] = None) -> Collection:
    """The database images of a benchmark (e.g. ``book.benchmark``) as a :class:`Collection`."""
    labels = getattr(benchmark, "labels", None)
    return Collection(name or benchmark.name, list(benchmark.database.paths),
                      None if labels is None else np.asarray(labels),
                      None if labels is None else list(benchmark.group_names))


def _image_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def collection_from_folder(folder, progress: bool = False) -> Collection:
    """A folder of your photos as a :class:`Collection`.

    ``folder/<group>/<photo>`` (every sub-folder a group, as
    :meth:`~retrieval_lib.data.datasets.GroupDataset.from_folder` reads it) gives photos with
    groups, so results are marked right or wrong; a flat folder of photos (or a mix of photos
    and sub-folders) gives photos without groups. Duplicate files (the same bytes) are kept
    once and files that cannot be read as images are left out; both are listed in ``notes``.

    Raises:
        ExplorerInputError: no such folder; no photos in it; fewer than two readable, distinct photos.
    """
    root = Path(str(folder)).expanduser()
    if not str(folder).strip() or not root.is_dir():
        raise ExplorerInputError(f"no folder '{folder}'; type the path of a folder that holds your photos "
                                 "(or one sub-folder of photos per object or place)")
    loose = _image_files(root)
    subs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and _image_files(d)]
    notes = []
    if subs and not loose:
        ds = GroupDataset.from_folder(root)
        paths, groups = list(ds.database.paths), [ds.group_names[i] for i in ds.labels]
    else:
        paths = [str(p) for p in loose] + [str(p) for d in subs for p in _image_files(d)]
        groups = None
        if subs:
            notes.append("photos lie both in the folder and in sub-folders: the sub-folders are not used as groups")
    if not paths:
        raise ExplorerInputError(f"no photos in '{root}': no file ending in {', '.join(IMAGE_EXTENSIONS)} there "
                                 "(nor in its sub-folders); put your photos in it or choose another folder")
    seen, keep, dupes = {}, [], []
    for i, p in enumerate(paths):
        digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        if digest in seen:
            dupes.append(f"{Path(p).name} (= {Path(paths[seen[digest]]).name})")
        else:
            seen[digest] = i
            keep.append(i)
    if dupes:
        notes.append(f"{len(dupes)} duplicate file{'s' if len(dupes) > 1 else ''} kept once: {', '.join(dupes[:5])}"
                     + (" ..." if len(dupes) > 5 else ""))
    bad = ImageList([paths[i] for i in keep]).validate(progress=progress)
    if bad:
        names = [Path(paths[keep[b]]).name for b in bad]
        notes.append(f"{len(bad)} file{'s' if len(bad) > 1 else ''} could not be read as images and "
                     f"{'are' if len(bad) > 1 else 'is'} left out: {', '.join(names[:5])}" + (" ..." if len(bad) > 5 else ""))
        keep = [k for j, k in enumerate(keep) if j not in set(bad)]
    if len(keep) < 2:
        what = "no readable photo" if not keep else f"only one photo ({Path(paths[keep[0]]).name})"
        extra = f" ({'; '.join(notes)})" if notes else ""
        raise ExplorerInputError(f"'{root}' holds {what}{extra}; the explorer needs at least two: one to query and "
                                 "one to find. Add photos, or upload one as the query against another collection")
    paths = [paths[i] for i in keep]
    if groups is None:
        return Collection(root.name, paths, notes=notes)
    groups = [groups[i] for i in keep]
    names = list(dict.fromkeys(groups))
    return Collection(root.name, paths, np.array([names.index(g) for g in groups]), names, notes)


# ---------------------------------------------------------------------------------- the explorer
@dataclass
class Query:
    """The photo being searched: its name, feature map ``(C, h, w)``, its index in the collection
    (``None`` for an upload) and its file."""

    name: str
    fmap: torch.Tensor
    index: Optional[int]
    path: str


class Explorer:
    """A collection, its cached feature maps and descriptors, a query, and the page's widgets.

    Args:
        model: the backbone (``book.model``); it runs once per collection and per uploaded query.
        image_size: longer side of the network input, px (``book.cfg.image_size``).
        sources: ``{name: builder}`` of the collections offered (a builder returns a
            :class:`Collection`; it runs when the collection is first chosen).
        cache_dir: on-disk cache of the feature maps (default ``<RETRIEVAL_CACHE>/features``).
        upload_dir: where uploaded photos are stored (default ``<RETRIEVAL_CACHE>/explorer_uploads``).
        heads: ``{label: pooling}`` more descriptors, e.g. a trained wGeM of 05 (a module or
            function ``(B, C, h, w) -> (B, D)``), one more row each.
        networks: ``{label: network}`` whole networks with their own backbone, e.g. a released one
            (``load_network("rSfM120k-tl-resnet101-gem-w")``): images ``(1, 3, H, W)`` normalised with
            the network's ``mean``/``std`` -> ``(1, D)`` descriptors; one more row each, its
            descriptors computed once per collection (no "why": its maps are not this backbone's).
        k, p, L: results per row, GeM exponent, R-MAC levels at the start.
    """

    def __init__(self, model, image_size: int = 512, sources: Optional[Mapping[str, Callable]] = None,
                 cache_dir=None, upload_dir=None, progress: bool = True, heads: Optional[Mapping] = None,
                 k: int = 5, p: float = 3.0, L: int = 3, networks: Optional[Mapping] = None):
        self.model = model
        self.image_size = int(image_size)
        self.sources = dict(sources or {})
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "features"
        self.upload_dir = Path(upload_dir) if upload_dir is not None else cache_root() / "explorer_uploads"
        self.progress = bool(progress)
        self.heads = dict(heads or {})
        self.networks = dict(networks or {})
        self.k, self.p, self.L = int(k), float(p), int(L)
        self.collection: Optional[Collection] = None
        self.collection_label: Optional[str] = None  # its name in the page's list
        self.query: Optional[Query] = None
        self.uploads: list = []  # paths of the photos uploaded in this session, in order
        self.timings: list = []  # (what, seconds) of every redraw
        self.messages: list = []  # (kind, text) said in the page, in order
        self._stacks: list = []  # (indices, (n, C, h, w) maps) per map size
        self._fmaps: list = []
        self._desc: dict = {}
        self._prep: dict = {}
        self._thumbs: dict = {}  # thumbnails by path, network-size images by ("net", path, size)
        self._net_order: list = []
        self._ui = None

    # -- building
    @classmethod
    def from_book(cls, book, data_root=None, **kw) -> "Explorer":
        """An explorer on a notebook's session: its backbone, input size, cache and progress setting.

        Offered collections: the run's benchmark, the offline default, and real171 when the
        data root (``data_root``, else ``RETRIEVAL_DATA``) holds it (a whole real171 even at
        smoke scale: it is extracted only when chosen).
        """
        sources = {f"this run's images ({book.benchmark.name})": lambda: collection_from_benchmark(book.benchmark)}
        if book.benchmark.name != "offline_default":
            sources["offline default (synthetic views)"] = lambda: collection_from_benchmark(offline_default())
        root = Path(data_root).expanduser() if data_root else default_data_root()
        if root is not None and (root / "real171" / "manifest.json").is_file() and book.benchmark.name != "real171":
            sources["real171 (171 real photos)"] = lambda: collection_from_benchmark(real171(root))
        kw.setdefault("progress", book.progress)
        return cls(book.model, book.cfg.image_size, sources, cache_dir=book.cache_dir, **kw)

    def clone(self) -> "Explorer":
        """Another explorer on the same collection, maps and thumbnails (shared, never copied), with its own
        query, settings, uploads, messages and page: for trying things (:func:`try_bad_inputs`,
        :func:`measure_redraws`) without touching the page a user has in front of them."""
        twin = Explorer(self.model, self.image_size, self.sources, self.cache_dir, self.upload_dir, self.progress,
                        self.heads, self.k, self.p, self.L, self.networks)
        twin.collection, twin.collection_label, twin.query = self.collection, self.collection_label, self.query
        twin.uploads = list(self.uploads)
        twin._stacks, twin._fmaps, twin._thumbs, twin._prep = self._stacks, self._fmaps, self._thumbs, self._prep
        twin._desc, twin._net_order = dict(self._desc), self._net_order
        return twin

    def source_names(self) -> list:
        return list(self.sources)

    # -- collections and their maps
    def use_collection(self, source) -> Collection:
        """Make ``source`` (a name of :meth:`source_names` or a :class:`Collection`) the collection searched.

        Extracts (or reads from the cache) its feature maps, clears the kept descriptors and
        makes its first photo the query. Raises :class:`ExplorerInputError` for an unknown name.
        """
        if isinstance(source, Collection):
            col, label = source, f"your folder: {source.name}" if source.name != "your uploads" else source.name
        elif source in self.sources:
            col, label = self.sources[source](), source
        else:
            raise ExplorerInputError(f"no collection called {source!r}; choose one of {self.source_names()}")
        if len(col) < 2:
            raise ExplorerInputError(f"{col.name} holds {len(col)} photo(s); the explorer needs at least two")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small = len(col) <= SMALL  # no worker processes, no BatchNorm folding: they cost more than they save
            maps = extract_fmaps(self.model, ImageList(col.paths, on_error="skip"), image_size=self.image_size,
                                 cache_dir=self.cache_dir, progress=self.progress and not small,
                                 num_workers=0 if small else None, fold_bn=False if small else None)
        bad = [i for i, f in enumerate(maps) if f is None]
        if bad:
            col.notes.append(f"{len(bad)} photo(s) could not be read and are left out: "
                             + ", ".join(Path(col.paths[i]).name for i in bad[:5]))
            good = [i for i in range(len(col)) if i not in set(bad)]
            col = Collection(col.name, [col.paths[i] for i in good],
                             None if col.labels is None else col.labels[good], col.group_names, col.notes)
            maps = [maps[i] for i in good]
        del caught
        self.collection, self.collection_label = col, label
        self._set_maps(maps)
        self.set_query(0)
        return col

    def _set_maps(self, maps: list) -> None:
        """Keep the maps stacked by size (one pooling call per size, no copy per redraw)."""
        groups: dict = {}
        for i, f in enumerate(maps):
            groups.setdefault(tuple(f.shape), []).append(i)
        self._stacks = [(torch.tensor(idx), torch.stack([maps[i] for i in idx])) for idx in groups.values()]
        self._fmaps = [None] * len(maps)
        for idx, X in self._stacks:
            for j, i in enumerate(idx.tolist()):
                self._fmaps[i] = X[j]  # a view into the stack
        self._desc = {}
        self._prep = {}  # per stack: what makes a new p or L fast (see descriptors)

    def fmap(self, i: int) -> torch.Tensor:
        """Feature map ``(C, h, w)`` of collection photo ``i`` (kept, never extracted again)."""
        return self._fmaps[i]

    # -- descriptors
    def methods(self) -> list:
        """The row labels: MAC, SPoC, GeM, R-MAC, then the heads, then the whole networks."""
        return list(BASE_METHODS) + list(self.heads) + list(self.networks)

    def label(self, method: str) -> str:
        """A row's label with its setting: ``"GeM (p=3.00)"``, ``"R-MAC (L=3)"``."""
        return {"GeM": f"GeM (p={self.p:.2f})", "R-MAC": f"R-MAC (L={self.L})"}.get(method, method)

    def pooling(self, method: str):
        if method == "MAC":
            return MAC()
        if method == "SPoC":
            return SPoC()
        if method == "GeM":
            return GeM(p=self.p, learn_p=False, p_min=min(1.0, self.p))
        if method == "R-MAC":
            return RMAC(L=self.L)
        if method in self.heads:
            return self.heads[method]
        raise ExplorerInputError(f"no descriptor called {method!r}; choose one of {self.methods()}")

    def _key(self, method: str):
        return (method, self.p) if method == "GeM" else (method, self.L) if method == "R-MAC" else (method,)

    @torch.no_grad()
    def descriptors(self, method: str) -> torch.Tensor:
        """``(N, D)`` L2-normalised descriptors of the collection under ``method`` at the current
        ``p`` / ``L``, pooled from the kept maps once and then kept.

        Two shortcuts keep a slider move fast, both exact: GeM sums ``x^p`` over the cells at or
        above ``eps`` only (after a ReLU most of the map is 0, which adds ``eps^p`` per cell),
        and R-MAC keeps the unit region MACs of ``L = 5``, whose first regions are those of every
        smaller ``L`` (:func:`~retrieval_lib.book.regional.region_levels`), so a new ``L`` only sums.
        """
        key = self._key(method)
        if key not in self._desc and method in self.networks:
            paths = self.collection.paths
            it = tqdm(paths, desc=method, disable=not self.progress, leave=False)
            self._desc[key] = torch.cat([self.network_descriptor(method, path) for path in it])
        if key not in self._desc:
            out = None
            for k, (idx, X) in enumerate(self._stacks):
                d = l2n(self._pool_stack(method, k, X).float())
                if out is None:
                    out = d.new_zeros(len(self._fmaps), d.shape[1])
                out[idx] = d
            self._desc[key] = out
        return self._desc[key]

    def _pool_stack(self, method: str, k: int, X: torch.Tensor) -> torch.Tensor:
        """Descriptors ``(n, D)`` (not normalised) of stack ``k`` of the kept maps."""
        if method == "GeM":
            if ("gem", k) not in self._prep:
                eps = 1e-6  # GeM's
                flat = X.reshape(-1, X.shape[-2] * X.shape[-1])  # (n C, h w)
                big = flat >= eps
                rows = big.nonzero()[:, 0]
                self._prep[("gem", k)] = (flat[big].double(), rows, (~big).sum(1).double(), flat.shape[1], eps)
            vals, rows, n_small, cells, eps = self._prep[("gem", k)]
            total = torch.zeros(len(n_small), dtype=torch.float64).index_add_(0, rows, vals.pow(self.p))
            total += n_small * eps ** self.p  # the cells below eps, clamped to eps as GeM does
            return (total / cells).pow(1.0 / self.p).reshape(X.shape[0], X.shape[1])
        if method == "R-MAC" and self.L <= L_MAX:
            h, w = X.shape[-2:]
            if ("rmac", k) not in self._prep:
                self._prep[("rmac", k)] = (l2n(region_mac(X, rmac_regions(h, w, L_MAX))), l2n(mac(X)))
            units, whole = self._prep[("rmac", k)]  # (n, R, C), (n, C)
            n_regions = rmac_regions(h, w, self.L).shape[0]  # the first regions of L_MAX's
            return l2n(units[:, :n_regions].sum(dim=1) + whole)
        return self.pooling(method)(X).float()

    @torch.no_grad()
    def query_descriptor(self, method: str) -> torch.Tensor:
        """``(D,)`` the query's descriptor under ``method`` (the kept row for a collection photo)."""
        if self.query.index is not None:
            return self.descriptors(method)[self.query.index]
        if method in self.networks:
            return self.network_descriptor(method, self.query.path)[0]
        return l2n(self.pooling(method)(self.query.fmap[None]).float())[0]

    @torch.no_grad()
    def network_descriptor(self, method: str, path) -> torch.Tensor:
        """``(1, D)`` the descriptor of the photo at ``path`` by the whole network ``method``: the photo
        resized to the explorer's input size (longer side), normalised with the network's mean/std."""
        net = self.networks[method]
        x = torch.from_numpy(np.asarray(resize_longer_side(load_image(path), self.image_size), dtype=np.float32))
        x = x.permute(2, 0, 1)[None] / 255.0  # (1, 3, H, W) in [0, 1]
        mean = torch.tensor(net.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(net.std, dtype=torch.float32).view(1, 3, 1, 1)
        device = next(net.parameters()).device
        return l2n(net(((x - mean) / std).to(device)).float()).cpu()

    # -- the query
    def set_query(self, index: int) -> Query:
        """Make collection photo ``index`` the query (its own row is left out of the results)."""
        n = len(self.collection)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise ExplorerInputError(f"no photo #{index} in {self.collection.name} (it holds #0 to #{n - 1})")
        path = self.collection.paths[int(index)]
        self.query = Query(Path(path).name, self._fmaps[int(index)], int(index), path)
        return self.query

    def add_upload(self, name: str, content: bytes) -> Query:
        """Store an uploaded photo, add it to "your uploads", and make it the query.

        The photo is checked and shrunk by :func:`read_photo`, stored once per content (a
        second upload of the same bytes is said to be a duplicate) and its feature map is
        extracted. Raises :class:`ExplorerInputError` for a file that cannot be used.
        """
        im = read_photo(bytes(content), name)
        digest = hashlib.sha256(bytes(content)).hexdigest()[:12]
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        same = [u for u in self.uploads if u.endswith(f"-{digest}.png")]
        duplicate = bool(same)
        path = Path(same[0]) if same else self.upload_dir / f"{Path(name).stem[:40]}-{digest}.png"
        if not path.is_file():
            im.save(path, format="PNG")
        if not duplicate:
            self.uploads.append(str(path))
        maps = extract_fmaps(self.model, ImageList([str(path)]), image_size=self.image_size,
                             cache_dir=self.cache_dir, progress=False, num_workers=0, fold_bn=False)
        self.query = Query(name, maps[0], None, str(path))
        if duplicate:
            first = Path(same[0]).name.rsplit("-", 1)[0]
            self.messages.append(("info", f"'{name}' is the same file as '{first}', uploaded before: it is the query "
                                          "again and is kept once in your uploads"))
        return self.query

    def uploads_collection(self) -> Collection:
        if len(self.uploads) < 2:
            raise ExplorerInputError(f"your uploads hold {len(self.uploads)} photo(s); upload at least two to "
                                     "search among them (one upload alone can query any other collection)")
        return Collection("your uploads", list(self.uploads))

    # -- what the page shows
    def rows(self, methods=None) -> list:
        """One :class:`~retrieval_lib.search.topk.TopK` per descriptor for the current query, labels with settings."""
        methods = self.methods() if methods is None else list(methods)
        Q = {m: self.query_descriptor(m) for m in methods}
        X = {m: self.descriptors(m) for m in methods}
        rows = top_k_rows(Q, X, self.k, exclude=self.query.index)
        return [TopK(self.label(m), r.indices, r.scores) for m, r in zip(methods, rows)]

    def correct(self, i: int) -> Optional[bool]:
        """Whether collection photo ``i`` is of the query's group (``None``: no groups, or an uploaded query)."""
        col = self.collection
        if col.labels is None or self.query.index is None:
            return None
        return bool(col.labels[i] == col.labels[self.query.index])

    def network_image(self, path: str) -> Image.Image:
        """The photo as the network sees it (longer side ``image_size``); the last few are kept."""
        key = ("net", path, self.image_size)
        if key not in self._thumbs:
            if len(self._net_order) >= 16:
                self._thumbs.pop(self._net_order.pop(0), None)
            self._thumbs[key] = resize_longer_side(load_image(path), self.image_size)
            self._net_order.append(key)
        return self._thumbs[key]

    def explains(self, method: str) -> bool:
        """Whether :func:`show_why` draws something for ``method`` (the four base descriptors, a wGeM or a DARAC head)."""
        head = self.heads.get(method)
        return method in BASE_METHODS or any(callable(getattr(head, a, None)) for a in ("attention", "vector_weights"))

    def why(self, method: str, rank: int):
        """Why result ``rank`` (0 = first) of ``method`` matched: ``(figure, readout)``. See :func:`show_why`."""
        row = self.rows([method])[0]
        if not 0 <= rank < len(row.indices):
            raise ExplorerInputError(f"no result #{rank + 1} in the {method} row (it has {len(row.indices)})")
        j = row.indices[rank]
        return show_why(self, method, j, row.scores[rank])

    def thumbnail(self, i: int) -> bytes:
        """JPEG bytes of a small copy of collection photo ``i`` (made once per file)."""
        path = self.collection.paths[i]
        if path not in self._thumbs:
            self._thumbs[path] = _thumbnail(path)
        return self._thumbs[path]

    def close_page(self) -> None:
        """Close every widget of the page (:meth:`app`); a page on screen then stops answering."""
        def close(w):
            for child in getattr(w, "children", ()):
                close(child)
            w.close()

        if self._ui is not None:
            close(self._ui.root)
            self._ui = None

    def record(self, what: str, seconds: float) -> None:
        self.timings.append((what, float(seconds)))

    # -- the page
    def app(self):
        """The page: a widget to ``display`` (JupyterLab, Colab, Voilà). Every control redraws from the kept maps.

        Chooses the first collection of :meth:`source_names` when none is in use yet.
        """
        if "google.colab" in sys.modules:  # Colab draws third-party widgets only with its custom manager
            try:  # by name: google.colab exists only inside Colab
                importlib.import_module("google.colab.output").enable_custom_widget_manager()
            except (ImportError, AttributeError):
                pass
        if self.collection is None:
            self.use_collection(self.source_names()[0])
        self._ui = _Page(self)
        return self._ui.root

# ---------------------------------------------------------------------------------- figures
def _rf(model, image_hw, fmap_hw):
    """Pixel centres of the map's cells: receptive-field centres when the backbone is known, else stretched."""
    try:
        chain = conv_chain(model)
        ry, rx = receptive_field(chain, image_hw[0]), receptive_field(chain, image_hw[1])
        if (ry.n_cells, rx.n_cells) == tuple(fmap_hw):
            return lambda locs: cell_centers(locs, ry, rx)
    except (TypeError, ValueError):
        pass
    sy, sx = image_hw[0] / fmap_hw[0], image_hw[1] / fmap_hw[1]
    return lambda locs: np.stack([(np.asarray(locs)[:, 1] + 0.5) * sx, (np.asarray(locs)[:, 0] + 0.5) * sy], 1)


def show_rows(ex: Explorer, rows=None, title: Optional[str] = None):
    """The query, then one row of its top-k per descriptor, frames green/red when the collection has groups."""
    rows = ex.rows() if rows is None else rows
    q = ex.network_image(ex.query.path)
    spec = []
    for r in rows:
        imgs = [Image.open(io.BytesIO(ex.thumbnail(i))) for i in r.indices]
        spec.append((r.label, imgs, [ex.correct(i) for i in r.indices], list(r.scores)))
    where = f"#{ex.query.index} of {ex.collection.name}" if ex.query.index is not None else "an upload"
    fig = show_two_rankings(q, spec, title=title or f"Query '{ex.query.name}' ({where}): top {ex.k} per descriptor")
    k = max(len(r.indices) for r in rows)
    fig.set_size_inches(1.7 * (k + 1), 1.9 * len(rows) + 0.4)  # thumbnails: a smaller figure shows all there is
    fig.tight_layout()
    return fig


def show_why(ex: Explorer, method: str, j: int, score: float):
    """Why collection photo ``j`` matched the query under ``method``: ``(figure, readout text)``.

    * MAC: the 5 channels with the largest terms ``x_c y_c`` of the similarity, each a line
      from the cell of its maximum in the query to the cell of its maximum in the result;
    * SPoC / GeM: each cell's share of the pooled value (``p = 1`` for SPoC, the slider's
      ``p`` for GeM) over both photos;
    * R-MAC: the result's regions coloured by their contribution to the score, which add up
      to it exactly, and the contributions as bars.
    """
    import matplotlib.pyplot as plt

    q_img, x_img = ex.network_image(ex.query.path), ex.network_image(ex.collection.paths[j])
    fq, fx = ex.query.fmap, ex.fmap(j)
    qname, xname = ex.query.name, Path(ex.collection.paths[j]).name
    if method == "MAC":
        corr = implicit_correspondences(fq, fx, k=5)
        ca = _rf(ex.model, q_img.size[::-1], fq.shape[-2:])(corr.loc_a.numpy())
        cb = _rf(ex.model, x_img.size[::-1], fx.shape[-2:])(corr.loc_b.numpy())
        labels = [f"channel {int(c)}: {float(s):.0%} of s" for c, s in zip(corr.channels, corr.share)]
        fig = show_correspondences(q_img, x_img, ca, cb, labels=labels, names=(f"query {qname}", f"result {xname}"),
                                   title=f"MAC, s = {corr.similarity:.3f}: the 5 channels that give most of it")
        text = (f"MAC: s = {corr.similarity:.3f}; its 5 largest channel terms give {float(corr.share.sum()):.0%} of "
                f"it, each pairing the cell of the channel's maximum in the query with the one in the result")
        return fig, text
    if method in ("SPoC", "GeM"):
        p = 1.0 if method == "SPoC" else ex.p
        mq, mx = gem_contributions(fq, p), gem_contributions(fx, p)
        top_q = float(mq.flatten().topk(min(5, mq.numel())).values.sum())
        top_x = float(mx.flatten().topk(min(5, mx.numel())).values.sum())
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        for ax, img, m, who in ((axes[0], q_img, mq, f"query {qname}"), (axes[1], x_img, mx, f"result {xname}")):
            h = overlay(ax, img, m, alpha=0.55, title=f"{who}: the 5 top cells hold "
                                                      f"{float(m.flatten().topk(min(5, m.numel())).values.sum()):.0%}")
            fig.colorbar(h, ax=ax, fraction=0.035, pad=0.02, label="share of the pooled value")
        fig.suptitle(f"{ex.label(method) if method == 'GeM' else 'SPoC (GeM at p = 1)'}, s = {score:.3f}: "
                     "each cell's share of the pooled value")
        fig.tight_layout()
        text = (f"{method} at p = {p:.2f}: s = {score:.3f}; the 5 cells with the largest share hold {top_q:.0%} of "
                f"the query's pooled value and {top_x:.0%} of the result's (a uniform map would give "
                f"{5 / mq.numel():.0%})")
        return fig, text
    if method == "R-MAC":
        q = ex.query_descriptor("R-MAC")
        c, regions = rmac_contributions(q, fx, L=ex.L)
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
        im = to_numpy_image(x_img)
        H, W = im.shape[:2]
        a.imshow(im)
        order = torch.argsort(c, descending=True)[:5].tolist()
        cmap = plt.get_cmap("tab10")
        boxes = [fmap_to_image_box(regions[r].tolist(), fx.shape[-2:], (H, W)) for r in order]
        draw_boxes(a, boxes, colors=[cmap(n) for n in range(len(order))], linewidth=2.5)
        for n, r in enumerate(order):
            x, y, _, _ = boxes[n]
            a.text(x + 4, y + 14, f"{float(c[r]):.3f}", color="white", fontsize=8,
                   bbox=dict(fc=cmap(n), ec="none", alpha=0.85))
        a.set_title(f"result {xname}: its 5 regions that add most")
        a.set_xlabel("x (px)")
        a.set_ylabel("y (px)")
        colors = ["0.6"] * len(c)
        for n, r in enumerate(order):
            colors[r] = cmap(n)
        b.bar(range(len(c)), c.numpy(), color=colors)
        b.set_xlabel(f"region (levels 1..{ex.L} in order; the last is the whole map)")
        b.set_ylabel("contribution to s")
        b.set_title(f"{len(c)} contributions, sum {float(c.sum()):.4f}")
        fig.suptitle(f"{ex.label('R-MAC')}, s = {score:.4f}: what each region of the result adds")
        fig.tight_layout()
        text = (f"R-MAC (L = {ex.L}): the {len(c)} region contributions (the whole map included) sum to "
                f"{float(c.sum()):.4f} = the score {score:.4f}; the largest, region {order[0]}, gives {float(c[order[0]]):.4f}")
        return fig, text
    head = ex.heads.get(method)
    if callable(getattr(head, "attention", None)):  # a wGeM head (05): its learned mask on both photos
        with torch.no_grad():
            masks = [head.attention(f[None].to(next(head.parameters()).device))[0, 0].cpu() for f in (fq, fx)]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        tops = []
        for ax, img, m, who in ((axes[0], q_img, masks[0], f"query {qname}"), (axes[1], x_img, masks[1], f"result {xname}")):
            tops.append(float(m.flatten().topk(min(5, m.numel())).values.sum()))
            h = overlay(ax, img, m, alpha=0.55, title=f"{who}: the 5 top cells hold {tops[-1]:.0%}")
            fig.colorbar(h, ax=ax, fraction=0.035, pad=0.02, label="mask weight")
        fig.suptitle(f"{method}, s = {score:.3f}: its learned spatial mask on both photos")
        fig.tight_layout()
        text = (f"{method}: s = {score:.3f}; its learned mask gives the 5 heaviest cells {tops[0]:.0%} of the weight on the "
                f"query and {tops[1]:.0%} on the result (a uniform mask would give {5 / masks[0].numel():.0%})")
        return fig, text
    if callable(getattr(head, "vector_weights", None)):  # a DARAC head (06): the weight of each region slot
        weights = head.vector_weights().detach().cpu().numpy()
        fig = show_region_weights(weights, hw=tuple(fx.shape[-2:]),
                                  title=f"{method}, s = {score:.3f}: the learned weight of each region slot")
        top = int(weights.argmax())
        text = (f"{method}: s = {score:.3f}; its {len(weights)} region slots are weighted from {weights.min():.2f} to "
                f"{weights.max():.2f} (untrained: all 1), the heaviest is the {'average' if top < len(weights) // 2 else 'max'} "
                f"vector of slot {top % (len(weights) // 2)}")
        return fig, text
    raise ExplorerInputError(f"no explanation is drawn for {method!r}: the why overlays cover {list(BASE_METHODS)}, "
                             "wGeM heads (their mask) and DARAC heads (their slot weights)")


# ---------------------------------------------------------------------------------- the page
KMAX = 10
MAX_THUMBS = 400
_KIND_STYLE = {"error": "color:#a00000;background:#fff0f0;border:1px solid #e0a0a0",
               "info": "color:#1a4d1a;background:#f0fff0;border:1px solid #a0d0a0"}


def _upload_files(value) -> list:
    """``[(name, bytes)]`` from a FileUpload's value (ipywidgets 8: a tuple of dicts; 7: a dict by name)."""
    if isinstance(value, dict):
        return [(name, bytes(v.get("content", b""))) for name, v in value.items()]
    return [(v.get("name", "upload"), bytes(v.get("content", b""))) for v in (value or ())]


class _Page:
    """The widgets of :meth:`Explorer.app` and what each control does (the explorer computes)."""

    def __init__(self, ex: Explorer):
        import ipywidgets as W

        self.ex, self.W = ex, W
        wide = {"description_width": "initial"}
        self.collection = W.Dropdown(options=ex.source_names(), value=None, description="collection (photos searched)",
                                     style=wide, layout=W.Layout(width="460px"))
        self._extra: dict = {}  # dropdown label -> Collection (your folder, your uploads)
        self.folder = W.Text(placeholder="e.g. ~/Pictures/trip (sub-folders = groups)",
                             description="folder (your photos)", style=wide, layout=W.Layout(width="420px"))
        self.load = W.Button(description="load folder", tooltip="search the photos of this folder")
        self.upload = W.FileUpload(accept="image/*", multiple=True, description="upload (photos)")
        self.message = W.HTML()
        self.readout = W.HTML()
        self.query_img = W.Image(format="jpeg", layout=W.Layout(max_width="240px", max_height="240px"))
        self.query_caption = W.HTML()
        self.thumbs = W.GridBox(layout=W.Layout(grid_template_columns="repeat(auto-fill, 108px)", max_height="300px",
                                                overflow="auto", width="100%"))
        self.thumb_buttons: list = []
        self.k = W.IntSlider(value=min(ex.k, KMAX), min=1, max=KMAX, description="k (results per row)",
                             continuous_update=False, style=wide)
        self.p = W.FloatLogSlider(value=ex.p, base=2, min=0, max=4, step=0.25, description="p (GeM exponent)",
                                  continuous_update=False, readout_format=".2f", style=wide)
        self.L = W.IntSlider(value=ex.L, min=1, max=L_MAX, description="L (R-MAC scale levels)", continuous_update=False,
                             style=wide)
        self.view = W.ToggleButtons(options=["every descriptor", "compare two"], description="view (rows shown)",
                                    style=wide)
        methods = ex.methods()
        self.a = W.Dropdown(options=methods, value=methods[0], description="A (first descriptor)", style=wide)
        self.b = W.Dropdown(options=methods, value=methods[2], description="B (second descriptor)", style=wide)
        self.slots = []  # one row of results per descriptor: (box, label, [(image, caption, why button)])
        for s in range(len(methods)):
            label = W.HTML(layout=W.Layout(width="130px"))
            cells = []
            for pos in range(KMAX):
                img = W.Image(format="jpeg", layout=W.Layout(width="112px", height="96px", object_fit="contain"))
                cap = W.HTML()
                why = W.Button(description="why", tooltip="why this result matched", layout=W.Layout(width="112px"))
                why.add_class("explorer-why")
                why.on_click(lambda _b, s=s, pos=pos: self._act("why overlay", lambda: self.open_why(s, pos)))
                cells.append((img, cap, why))
            box = W.HBox([label] + [W.VBox([i, c, w], layout=W.Layout(width="118px")) for i, c, w in cells])
            box.add_class("explorer-row")
            self.slots.append((box, label, cells))
        self.shown: list = []  # (method, TopK) of the rows on the page
        self.why_title = W.HTML()
        self.why_img = W.Image(format="jpeg", layout=W.Layout(max_width="900px"))
        self.why_text = W.HTML()
        self.progress_out = W.Output()
        for w, cls in ((self.message, "explorer-message"), (self.readout, "explorer-readout"),
                       (self.query_img, "explorer-query"), (self.why_img, "explorer-why-image"),
                       (self.why_text, "explorer-why-readout"), (self.load, "explorer-load"),
                       (self.upload, "explorer-upload"), (self.folder, "explorer-folder")):
            w.add_class(cls)
        self.load.on_click(lambda _b: self._act("folder", self.load_folder))
        self.upload.observe(self._on_upload, names="value")
        self.collection.observe(self._on_collection, names="value")
        for w, what in ((self.k, "k slider"), (self.p, "p slider"), (self.L, "L slider"), (self.view, "view"),
                        (self.a, "compare A"), (self.b, "compare B")):
            w.observe(lambda ch, what=what: self._act(what, self._on_setting), names="value")
        self.root = W.VBox([
            W.HTML("<h3>Explore your photos</h3>"),
            W.HBox([self.collection, self.upload]), W.HBox([self.folder, self.load]),
            self.message, self.progress_out,
            W.HBox([W.VBox([W.HTML("<b>query</b>"), self.query_img, self.query_caption],
                           layout=W.Layout(width="260px")),
                    W.VBox([W.HTML("<b>the collection</b>: click the button under a photo to query with it"),
                            self.thumbs], layout=W.Layout(flex="1"))]),
            W.HBox([self.k, self.p, self.L]), W.HBox([self.view, self.a, self.b]),
            self.readout, W.VBox([s[0] for s in self.slots]),
            self.why_title, self.why_img, self.why_text])
        self.root.add_class("explorer")
        self._quiet = True
        self._add_option(ex.collection, ex.collection_label)
        self._quiet = False
        self.show_collection()
        self.redraw("page")

    # -- messages and timing
    def say(self, text: str, kind: str = "info") -> None:
        self.ex.messages.append((kind, text))
        self.message.value = (f"<div class='explorer-{kind}' style='{_KIND_STYLE[kind]};padding:4px 8px;"
                              f"border-radius:4px'>{html.escape(text)}</div>") if text else ""

    def _act(self, what: str, fn) -> Optional[float]:
        """Run one user action: time it, say what went wrong in the page instead of raising."""
        if self._quiet:
            return None
        self.message.value = ""
        n_msgs = len(self.ex.messages)
        t0 = time.perf_counter()
        failed = None
        with self.progress_out:  # progress bars of an extraction go here (an Output swallows exceptions: catch inside)
            try:
                fn()
            except (ExplorerInputError, ImageError) as err:
                failed = str(err)
            except Exception as err:  # a bug, but the page stays usable and says what happened
                failed = f"{what} failed: {type(err).__name__}: {err}"
        if failed is not None:
            if self.progress_out.outputs:
                self.progress_out.clear_output()
            self.say(failed, "error")
            return None
        dt = time.perf_counter() - t0
        self.ex.record(what, dt)
        if self.progress_out.outputs:  # (clear_output outside a kernel would print to the terminal)
            self.progress_out.clear_output()
        if len(self.ex.messages) > n_msgs and not self.message.value:
            kind, text = self.ex.messages[-1]
            self.say(text, kind)
            self.ex.messages.pop()  # said once, not twice
        self.readout.value = (f"<span class='explorer-timing'>{what}: redrawn in {dt:.3f} s</span> · query "
                              f"'{self.ex.query.name}' · {self.ex.collection.summary()}")
        return dt

    # -- collections
    def _add_option(self, col: Collection, label: Optional[str] = None) -> None:
        if label is not None and label not in self.ex.sources:
            self._extra[label] = col
        options = list(self.ex.source_names()) + list(self._extra)
        current = label or self._current_label
        self.collection.options = options
        self.collection.value = current if current in options else options[0]

    @property
    def _current_label(self) -> Optional[str]:
        label = self.collection.value
        if label is None:  # the first build: the explorer's collection came from its first source
            return self.ex.source_names()[0] if self.ex.source_names() else None
        return label

    def _on_collection(self, change) -> None:
        if self._quiet or change["new"] is None:
            return

        def switch():
            label = change["new"]
            self.ex.use_collection(self._extra.get(label, label))
            self.show_collection()
            self.redraw_rows()
            notes = self.ex.collection.notes
            if notes:
                self.say("; ".join(notes), "info")

        self._act("collection", switch)

    def load_folder(self) -> None:
        col = collection_from_folder(self.folder.value, progress=self.ex.progress)
        self.ex.use_collection(col)
        self._quiet = True
        try:
            self._add_option(col, f"your folder: {col.name}")
        finally:
            self._quiet = False
        self.show_collection()
        self.redraw_rows()
        if col.notes:
            self.say("; ".join(col.notes), "info")

    def _on_upload(self, change) -> None:
        files = _upload_files(change["new"])
        if not files or self._quiet:
            return

        def take():
            errors, done = [], []
            for name, content in files:
                try:
                    self.ex.add_upload(name, content)
                    done.append(name)
                except ExplorerInputError as err:
                    errors.append(str(err))
            if len(self.ex.uploads) >= 2:
                self._quiet = True
                try:
                    current = self.collection.value
                    self._extra = {k: v for k, v in self._extra.items() if not k.startswith("your uploads")}
                    self._add_option(self.ex.uploads_collection(), "your uploads")
                    self.collection.value = current if current in self.collection.options else self.collection.value
                finally:
                    self._quiet = False
            if done:
                self.show_query()
                self.redraw_rows()
            if errors:
                raise ExplorerInputError(" | ".join(errors) + (f" (used: {', '.join(done)})" if done else ""))

        self._act("upload", take)
        try:  # let the same file be chosen again
            self._quiet = True
            self.upload.value = ()
        except Exception:  # ipywidgets 7 keeps its value: harmless
            pass
        finally:
            self._quiet = False

    # -- drawing
    def show_collection(self) -> None:
        W, ex = self.W, self.ex
        n = len(ex.collection)
        self.thumb_buttons = []
        items = []
        for i in range(min(n, MAX_THUMBS)):
            b = W.Button(description=f"#{i}", tooltip=Path(ex.collection.paths[i]).name, layout=W.Layout(width="100px"))
            b.add_class("explorer-thumb")
            b.on_click(lambda _b, i=i: self._act("click thumbnail", lambda: self.pick(i)))
            self.thumb_buttons.append(b)
            items.append(W.VBox([W.Image(value=ex.thumbnail(i), format="jpeg",
                                         layout=W.Layout(width="100px", height="84px", object_fit="contain")), b]))
        for old in self.thumbs.children:
            old.close()
        self.thumbs.children = items
        if n > MAX_THUMBS:
            self.say(f"{n} photos: the first {MAX_THUMBS} are shown as thumbnails (all {n} are searched)", "info")
        self.show_query()

    def pick(self, i: int) -> None:
        self.ex.set_query(i)
        self.show_query()
        self.redraw_rows()

    def show_query(self) -> None:
        q = self.ex.query
        key = (q.path, 240)
        if key not in self.ex._thumbs:
            self.ex._thumbs[key] = _thumbnail(q.path, 240)
        self.query_img.value = self.ex._thumbs[key]
        where = f"#{q.index} of {self.ex.collection.name}" if q.index is not None else "uploaded"
        group = self.ex.collection.group(q.index) if q.index is not None else None
        self.query_caption.value = (f"<span class='explorer-query-name'>{q.name}</span><br><small>{where}"
                                    + (f", group {group}" if group else "") + "</small>")

    def _on_setting(self) -> None:
        ex = self.ex
        ex.k, ex.p, ex.L = int(self.k.value), float(self.p.value), int(self.L.value)
        compare = self.view.value == "compare two"
        self.a.layout.display = self.b.layout.display = "" if compare else "none"
        self.redraw_rows()

    def redraw(self, what: str) -> None:
        self._quiet = False
        self._act(what, self._on_setting)

    def redraw_rows(self) -> None:
        ex = self.ex
        compare = self.view.value == "compare two"
        methods = [self.a.value, self.b.value] if compare else ex.methods()
        rows = ex.rows(methods)
        cmp = compare_rows(rows[0].indices, rows[1].indices) if compare and len(rows) == 2 else None
        self.shown = list(zip(methods, rows))
        for s, (box, label, cells) in enumerate(self.slots):
            if s >= len(rows):
                box.layout.display = "none"
                continue
            box.layout.display = ""
            method, row = methods[s], rows[s]
            tag = ("A: " if s == 0 else "B: ") if compare else ""
            label.value = f"<b class='explorer-row-label'>{html.escape(tag + row.label)}</b>"
            for pos, (img, cap, why) in enumerate(cells):
                if pos >= len(row.indices):
                    img.layout.display = cap.layout.display = why.layout.display = "none"
                    continue
                img.layout.display = cap.layout.display = ""
                why.layout.display = "" if ex.explains(method) else "none"
                i = row.indices[pos]
                img.value = ex.thumbnail(i)
                ok = ex.correct(i)
                img.layout.border = {True: "4px solid #2ca02c", False: "4px solid #d62728"}.get(ok, "4px solid #bbbbbb")
                other = ""
                if cmp is not None:
                    r = (cmp.rank_in_b if s == 0 else cmp.rank_in_a)[pos]
                    other = (f" · {'B' if s == 0 else 'A'}: #{r + 1}" if r is not None
                             else f" · <b>only {'A' if s == 0 else 'B'}</b>")
                cap.value = (f"<span class='explorer-score'>#{pos + 1} s={row.scores[pos]:.3f}</span>{other}<br>"
                             f"<small>#{i} {html.escape(Path(ex.collection.paths[i]).name[:18])}</small>")
        if cmp is not None:
            self.why_title.value = ""
            summary = (f"A = {rows[0].label} and B = {rows[1].label} share {cmp.shared} of their top {len(rows[0].indices)}"
                       + (" in the same order" if cmp.same_order else "")
                       + (f"; only in A: {', '.join(f'#{i}' for i in cmp.only_a)}" if cmp.only_a else "")
                       + (f"; only in B: {', '.join(f'#{i}' for i in cmp.only_b)}" if cmp.only_b else ""))
            self.why_text.value = f"<span class='explorer-compare'>{html.escape(summary)}</span>"

    def open_why(self, slot: int, pos: int) -> None:
        method, row = self.shown[slot]
        fig, text = show_why(self.ex, method, row.indices[pos], row.scores[pos])
        self.why_img.value = _jpeg(fig)
        self.why_title.value = f"<h4>why result #{pos + 1} of {html.escape(row.label)} matched</h4>"
        self.why_text.value = f"<span class='explorer-why-text'>{html.escape(text)}</span>"


def measure_redraws(ex: Explorer, repeats: int = 3) -> dict:
    """Drive the page's controls as a user would and return the median seconds of each kind of redraw.

    Drives a page of its own (closed at the end); the explorer's query and settings change, so pass
    :meth:`Explorer.clone` to leave a page on screen as it is. Keys: ``click_thumbnail``, ``p_slider``,
    ``L_slider``, ``k_slider``, ``compare``, ``why_mac``, ``why_gem``, ``why_rmac`` (median of
    ``repeats`` redraws each; every slider move goes to a value not seen before, so it re-pools
    every kept map). A redraw that failed is missing from the dict.
    """
    on_screen = ex._ui
    ex.app()  # a page of its own, on the explorer's collection, closed at the end
    page = ex._ui
    n = len(ex.collection)
    times: dict = {}

    def timed(key, action):
        before = len(ex.timings)
        action()
        if len(ex.timings) > before:
            times.setdefault(key, []).append(ex.timings[-1][1])

    page.view.value = "every descriptor"
    for r in range(repeats):
        timed("click_thumbnail", page.thumb_buttons[(r + 1) % min(n, len(page.thumb_buttons))].click)
    ps = [v for v in (2.0 ** (e / 4) for e in range(0, 17)) if all(abs(v - key[1]) > 1e-9 for key in ex._desc
                                                                   if key[0] == "GeM")]
    for v in ps[1:repeats + 1]:
        timed("p_slider", lambda v=v: setattr(page.p, "value", v))
    for v in [L for L in (1, 2, 4, 5, 3) if L != page.L.value][:repeats]:
        timed("L_slider", lambda v=v: setattr(page.L, "value", v))
    for v in [k for k in (3, 8, 5, 6) if k != page.k.value][:repeats]:
        timed("k_slider", lambda v=v: setattr(page.k, "value", v))
    for slot, key in ((0, "why_mac"), (2, "why_gem"), (3, "why_rmac")):
        for r in range(repeats):
            timed(key, page.slots[slot][2][r % len(page.shown[slot][1].indices)][2].click)
    timed("compare", lambda: setattr(page.view, "value", "compare two"))
    for m in ex.methods()[1:repeats]:
        timed("compare", lambda m=m: setattr(page.b, "value", m))
    page.view.value = "every descriptor"
    ex.close_page()
    ex._ui = on_screen
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------- bad input, on purpose
def huge_png(width: int = 10_000, height: int = 9_000) -> bytes:
    """The bytes of a PNG that says it is ``width x height`` px, in a few dozen bytes (its header is
    rewritten, its pixels are not there): what a huge photo looks like to the explorer before decoding."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", int(width), int(height))  # IHDR: width, height (after the 8-byte signature,
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)  # length and type), then its CRC
    return bytes(b)


def try_bad_inputs(ex: Explorer, folder, photo: Optional[str] = None) -> list:
    """Feed the page every kind of bad input through its own controls; return ``[(case, kind, message)]``.

    Under ``folder`` (created) it writes: an empty folder, a folder of one photo, a folder with
    duplicate files, and it names a folder that does not exist (typed into the folder box, then
    "load folder"); it uploads a text file, a truncated JPEG and a huge photo (:func:`huge_png`)
    through the upload control of a page of its own (closed at the end; the explorer's collection
    and query change meanwhile, so pass :meth:`Explorer.clone` to leave a page on screen as it is).
    ``photo`` (default: the collection's first) is the photo copied
    into the folders. ``kind`` is ``"error"`` (refused) or ``"info"`` (used, with a note). The
    collection in use before is chosen again at the end.
    """
    on_screen = ex._ui
    ex.app()  # a page of its own, closed at the end
    page = ex._ui
    root = Path(folder)
    photo = Path(photo or ex.collection.paths[0])
    cases = {"empty": [], "one": [photo], "dupes": [photo, photo, Path(ex.collection.paths[-1])]}
    for name, files in cases.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for n, f in enumerate(files):
            (d / f"photo{n}{f.suffix}").write_bytes(f.read_bytes())
    jpeg = io.BytesIO()
    Image.open(photo).convert("RGB").save(jpeg, format="JPEG", quality=90)
    before_label = page.collection.value
    said = []

    def last_message(case, action):
        n = len(ex.messages)
        action()
        kind, text = ex.messages[-1] if len(ex.messages) > n else ("none", "")
        shown = bool(text) and html.escape(text) in page.message.value
        said.append((case, kind if shown else f"{kind}, not shown", text))

    for case, path in (("folder that does not exist", root / "nowhere"), ("empty folder", root / "empty"),
                       ("folder of one photo", root / "one"), ("duplicate files", root / "dupes")):
        page.folder.value = str(path)
        last_message(case, page.load.click)
    for case, name, content in (("not an image", "notes.txt", b"these are my holiday notes, not a photo"),
                                ("unreadable photo", "broken.jpg", jpeg.getvalue()[:400]),
                                ("huge photo", "huge.png", huge_png())):
        item = {"name": name, "type": "", "size": len(content), "content": memoryview(content),
                "last_modified": datetime.datetime.now(datetime.timezone.utc)}
        last_message(case, lambda item=item: setattr(page.upload, "value", (item,)))
    if page.collection.value != before_label:
        page.collection.value = before_label
    ex.close_page()
    ex._ui = on_screen
    return said
