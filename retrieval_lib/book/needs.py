"""What each notebook needs at each scale, said in its first cells and checked before the expensive work.

A notebook calls :func:`check_needs` right after its parameters: the returned :class:`NeedsReport`
says, in one paragraph, which data sets this scale uses (with their download size), which are
present under the data root, what the notebook measures at this scale, and -- for an optional
data set that is missing -- which section is skipped and the ``download`` command that fetches
it. The notebook then tests ``needs.have("rsfm120k")`` before that section instead of failing in
it, so ``python -m retrieval_lib reproduce --scale full`` never stops on a download the user did
not ask for. Nothing here downloads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrieval_lib.book.config import scale_config
from retrieval_lib.book.downloads import DATA_ITEMS
from retrieval_lib.book.paper_networks import RELEASED_FOR
from retrieval_lib.data.datasets import data_root
from retrieval_lib.data.download import file_hash
from retrieval_lib.models.released import network_cache, released_networks

__all__ = ["Need", "NEEDS", "MEASURES", "NeedsReport", "scale_needs", "check_needs", "default_downloads",
           "item_present", "NOTEBOOKS"]

NOTEBOOKS = ("00_pipeline", "01_mac", "02_spoc", "03_gem", "04_rmac", "05_wgem", "06_darac", "07_cgd",
             "08_whitening", "09_reproductions", "10_explorer")
"""The numbered notebooks whose needs this module knows (``tests/test_needs.py`` checks it against the folder)."""


@dataclass(frozen=True)
class Need:
    """One data set a notebook uses: ``item`` is its name for ``python -m retrieval_lib download``."""

    item: str
    used_for: str
    required: bool = True  # False: the notebook goes on without it (``if_missing`` says how)
    if_missing: str = "skipped"
    on_request: bool = False  # True: never fetched unasked (too large); the notebook says how to fetch it
    size: str | None = None  # the download's size when the item is not a data set of DATA_ITEMS (a network)


_FALLBACK = "the offline default is used instead"
_REAL171 = Need("real171", "the real photos of the honest split", required=False, if_missing=_FALLBACK)
_REAL171_BENCHMARK = Need("real171", "the benchmark every section measures", required=False, if_missing=_FALLBACK)
_SPLIT = ("the honest split: heads trained on real171's UKBench56 + landmarks23 (plus views, composites and the "
          "offline default), evaluated on WxBS + EVD (without real171: the offline default's split by photo)")
_NOT_OXFORD = (" at the scale's backbone and input size -- not revisited Oxford, which has no training side: these "
               "heads are trained on cached feature maps of a small training set")

_RELEASED = "the authors' trained network, measured in their setting on revisited Oxford (and Paris when present)"
_RPARIS = Need("rparis6k", "the authors' trained network's second benchmark (its other numbers)", required=False)

NEEDS = {
    "05_wgem": {"full": (Need("rsfm120k", "section 7, the paper's recipe (GeM and wGeM fine-tuned end to end, then "
                                          "measured on revisited Oxford)", required=False, on_request=True),
                         Need("roxford5k", "section 7's evaluation", required=False),
                         Need(RELEASED_FOR["05_wgem"], _RELEASED, required=False,
                              size="about 0.19 GB: 46.7 M float32 weights"),
                         _RPARIS)},
    "07_cgd": {"full": (Need("cub", "section 6, CGD's recipe end to end on CUB-200-2011", required=False,
                             on_request=True),)},
    "08_whitening": {"full": (Need(RELEASED_FOR["08_whitening"], _RELEASED, required=False,
                                   size="about 0.17 GB: 42.5 M float32 weights"), _RPARIS)},
}
"""Per notebook and scale, what it needs beyond the scale's own benchmark (see :func:`scale_needs`)."""

MEASURES = {
    "05_wgem": _SPLIT + _NOT_OXFORD + " (section 7 adds revisited Oxford when rSfM-120k is there)",
    "06_darac": _SPLIT + _NOT_OXFORD,
    "07_cgd": _SPLIT + _NOT_OXFORD + " (section 6 adds CUB-200-2011 when it is there)",
    "08_whitening": _SPLIT + _NOT_OXFORD + " (whitenings learned on the training side)",
    "09_reproductions": "nothing new: it reads what the other notebooks of the run measured",
    "10_explorer": ("no benchmark: it searches a collection (your photos, else real171, else the offline default) "
                    "with the scale's backbone and input size, and times the redraws of its controls"),
}
"""What a notebook measures when it is not the scale's benchmark (the learned notebooks, 09)."""


def scale_needs(notebook: str, scale) -> tuple:
    """The :class:`Need` list of ``notebook`` (``"05_wgem"``) at ``scale``: the scale's benchmark
    (revisited Oxford at ``full``, required; real171 at ``smoke``/``cpu``, optional), real171 for the
    learned notebooks' split and the explorer's collection, then the notebook's own entries in :data:`NEEDS`."""
    cfg = scale_config(scale)
    needs = []
    if notebook == "10_explorer":
        needs.append(Need("real171", "the collection searched (when MY_PHOTOS names no folder)", required=False,
                          if_missing=_FALLBACK))
    elif notebook != "09_reproductions":
        if cfg.data == "default":
            needs.append(_REAL171 if notebook in MEASURES else _REAL171_BENCHMARK)
        elif notebook not in MEASURES:
            needs.append(Need(cfg.data, "the benchmark every section measures"))
        else:
            needs.append(_REAL171)
    needs += NEEDS.get(notebook, {}).get(cfg.name, ())
    return tuple(needs)


@dataclass
class NeedsReport:
    """What :func:`check_needs` found: ``present`` per item, and the paragraph that says it."""

    notebook: str
    scale: str
    root: Path | None
    needs: tuple
    present: dict = field(default_factory=dict)

    def have(self, item: str) -> bool:
        """Whether ``item`` is complete under the data root."""
        return bool(self.present.get(item))

    def missing_required(self) -> list:
        return [n.item for n in self.needs if n.required and not self.have(n.item)]

    def command(self, item: str) -> str:
        """The ``download`` command that fetches ``item`` (a network goes to the cache: no ``--data``)."""
        if item not in DATA_ITEMS:
            return f"python -m retrieval_lib download {item}"
        where = f" --data {self.root}" if self.root is not None else " --data DIR"
        return f"python -m retrieval_lib download {item}{where}"

    def _markdown(self) -> str:
        where = f"data root `{self.root}`" if self.root is not None else "no data root (RETRIEVAL_DATA unset)"
        lines = [f"**What this notebook needs at `{self.scale}` scale** ({where}):", ""]
        for n in self.needs:
            size = DATA_ITEMS[n.item].size if n.item in DATA_ITEMS else (n.size or "unknown")
            if self.have(n.item):
                state = "present"
            elif n.required:
                state = f"**missing**, required: fetch it with `{self.command(n.item)}`"
            else:
                state = f"missing, so {n.if_missing}; to have it: `{self.command(n.item)}`"
            lines.append(f"- **{n.item}** -- {n.used_for}; {state} (download: {size}).")
        if not self.needs:
            lines.append("- no data set of its own.")
        if self.notebook in MEASURES:
            lines += ["", f"At this scale it measures {MEASURES[self.notebook]}."]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self._markdown()

    def __str__(self) -> str:
        return self._markdown()


def check_needs(notebook: str, scale, root=None) -> NeedsReport:
    """Check what ``notebook`` needs at ``scale`` under the data root (``root``, else ``RETRIEVAL_DATA``).

    Returns a :class:`NeedsReport` (display it in the notebook: it renders as markdown). Nothing
    is downloaded and nothing raises for a missing optional data set; a missing required one is
    reported by :meth:`NeedsReport.missing_required` (the scale's benchmark raises its own
    :class:`~retrieval_lib.errors.MissingDataError` when the notebook loads it).
    """
    r = Path(root).expanduser() if root else data_root()
    needs = scale_needs(notebook, scale)
    present = {n.item: item_present(n.item, r) for n in needs}
    return NeedsReport(notebook, scale_config(scale).name, r, needs, present)


def item_present(item: str, root) -> bool:
    """Whether ``item`` is complete: a data set under the data root ``root``, or a released network in
    the network cache (:func:`~retrieval_lib.models.released.network_cache`) whose sha256 starts with
    the hash in its name (a file without a published hash counts when it is there)."""
    if item in DATA_ITEMS:
        return root is not None and DATA_ITEMS[item].present(Path(root)) == "yes"
    entry = released_networks().get(item)
    if entry is None:
        return False
    path = network_cache() / entry.file_name
    return path.is_file() and (entry.sha256_prefix is None or file_hash(path).startswith(entry.sha256_prefix))


def default_downloads(scale) -> list:
    """What ``scale`` fetches unasked (``colab_setup``): every item a notebook uses at that scale, in
    the notebooks' order, except those fetched on request only (``Need.on_request``)."""
    out = []
    for notebook in NOTEBOOKS:
        for n in scale_needs(notebook, scale):
            if not n.on_request and n.item not in out:
                out.append(n.item)
    return out
