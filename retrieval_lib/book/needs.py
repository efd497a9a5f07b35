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
from retrieval_lib.data.datasets import data_root

__all__ = ["Need", "NEEDS", "MEASURES", "NeedsReport", "scale_needs", "check_needs"]


@dataclass(frozen=True)
class Need:
    """One data set a notebook uses: ``item`` is its name for ``python -m retrieval_lib download``."""

    item: str
    used_for: str
    required: bool = True  # False: the notebook goes on without it (``if_missing`` says how)
    if_missing: str = "skipped"


_FALLBACK = "the offline default is used instead"
_REAL171 = Need("real171", "the real photos of the honest split", required=False, if_missing=_FALLBACK)
_REAL171_BENCHMARK = Need("real171", "the benchmark every section measures", required=False, if_missing=_FALLBACK)
_SPLIT = ("the honest split: heads trained on real171's UKBench56 + landmarks23 (plus views, composites and the "
          "offline default), evaluated on WxBS + EVD (without real171: the offline default's split by photo)")
_NOT_OXFORD = (" at the scale's backbone and input size -- not revisited Oxford, which has no training side: these "
               "heads are trained on cached feature maps of a small training set")

NEEDS = {
    "05_wgem": {"full": (Need("rsfm120k", "section 7, the paper's recipe (GeM and wGeM fine-tuned end to end, then "
                                          "measured on revisited Oxford)", required=False),
                         Need("roxford5k", "section 7's evaluation", required=False))},
    "07_cgd": {"full": (Need("cub", "section 6, CGD's recipe end to end on CUB-200-2011", required=False),)},
}
"""Per notebook and scale, what it needs beyond the scale's own benchmark (see :func:`scale_needs`)."""

MEASURES = {
    "05_wgem": _SPLIT + _NOT_OXFORD + " (section 7 adds revisited Oxford when rSfM-120k is there)",
    "06_darac": _SPLIT + _NOT_OXFORD,
    "07_cgd": _SPLIT + _NOT_OXFORD + " (section 6 adds CUB-200-2011 when it is there)",
    "08_whitening": _SPLIT + _NOT_OXFORD + " (whitenings learned on the training side)",
    "09_reproductions": "nothing new: it reads what the other notebooks of the run measured",
}
"""What a notebook measures when it is not the scale's benchmark (the learned notebooks, 09)."""


def scale_needs(notebook: str, scale) -> tuple:
    """The :class:`Need` list of ``notebook`` (``"05_wgem"``) at ``scale``: the scale's benchmark
    (revisited Oxford at ``full``, required; real171 at ``smoke``/``cpu``, optional), real171 for the
    learned notebooks' split, then the notebook's own entries in :data:`NEEDS`."""
    cfg = scale_config(scale)
    needs = []
    if notebook != "09_reproductions":
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
        where = f" --data {self.root}" if self.root is not None else " --data DIR"
        return f"python -m retrieval_lib download {item}{where}"

    def _markdown(self) -> str:
        where = f"data root `{self.root}`" if self.root is not None else "no data root (RETRIEVAL_DATA unset)"
        lines = [f"**What this notebook needs at `{self.scale}` scale** ({where}):", ""]
        for n in self.needs:
            size = DATA_ITEMS[n.item].size if n.item in DATA_ITEMS else "unknown"
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
    present = {n.item: r is not None and n.item in DATA_ITEMS and DATA_ITEMS[n.item].present(r) == "yes"
               for n in needs}
    return NeedsReport(notebook, scale_config(scale).name, r, needs, present)
