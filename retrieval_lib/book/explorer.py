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

import hashlib
import importlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from retrieval_lib.book.explorer_inputs import (L_MAX, MAX_PIXELS, MAX_UPLOAD_BYTES, STORE_SIDE, Collection,
                                                ExplorerInputError, collection_from_benchmark, collection_from_folder,
                                                read_photo, thumbnail_jpeg)
from retrieval_lib.book.explorer_page import ExplorerPage, huge_png, measure_redraws, try_bad_inputs
from retrieval_lib.book.explorer_why import BASE_METHODS, show_rows, show_why
from retrieval_lib.data.datasets import cache_root, offline_default, real171
from retrieval_lib.data.datasets import data_root as default_data_root
from retrieval_lib.data.images import ImageList, load_image, resize_longer_side
from retrieval_lib.engine.extract import extract_fmaps
from retrieval_lib.layers.functional import l2n, mac, region_mac, rmac_regions
from retrieval_lib.layers.pooling import MAC, RMAC, GeM, SPoC
from retrieval_lib.search.topk import TopK, top_k_rows

__all__ = ["ExplorerInputError", "MAX_UPLOAD_BYTES", "MAX_PIXELS", "STORE_SIDE", "read_photo", "Collection",
           "collection_from_folder", "collection_from_benchmark", "Query", "Explorer", "measure_redraws",
           "show_rows", "show_why", "huge_png", "try_bad_inputs"]

SMALL = 16  # collections up to this size are extracted in the kernel's process, unfolded


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
        self.page = None

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
            self._thumbs[path] = thumbnail_jpeg(path)
        return self._thumbs[path]

    def query_thumbnail(self, side: int = 240) -> bytes:
        """JPEG bytes of the query photo with its longer side ``side`` px (made once per photo and size)."""
        key = (self.query.path, side)
        if key not in self._thumbs:
            self._thumbs[key] = thumbnail_jpeg(self.query.path, side)
        return self._thumbs[key]

    def kept_p_values(self) -> list:
        """The GeM exponents whose descriptors of the collection are kept (a slider move to one costs no pooling)."""
        return [key[1] for key in self._desc if key[0] == "GeM"]

    def close_page(self) -> None:
        """Close every widget of the page (:meth:`app`); a page on screen then stops answering."""
        def close(w):
            for child in getattr(w, "children", ()):
                close(child)
            w.close()

        if self.page is not None:
            close(self.page.root)
            self.page = None

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
        self.page = ExplorerPage(self)
        return self.page.root
