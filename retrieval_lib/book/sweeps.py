"""Sweeps and comparisons over poolings: mAP against p, against image size, per query.

The notebooks ask the same questions of many descriptors at once ("how does mAP move
when p goes from 1 to 32?", "which queries does SPoC win against MAC?"). The functions
here answer them with one backbone pass where the scale allows it:

* :func:`describe_many` / :func:`evaluate_many` -- many poolings of the same images;
  at ``smoke``/``cpu`` scale they re-pool the cached feature maps, at ``full`` scale
  they run the backbone once for all of them (``extract_descriptors`` with a dict).
* :func:`sweep_p` -- mAP of GeM for a list of exponents p (``03_gem``).
* :func:`sweep_image_size` -- mAP of several poolings for a list of input sizes
  (``02_spoc``).
* :func:`query_aps` and :func:`compare_aps` -- per-query AP of two descriptors and the
  queries one wins or loses against the other (``02_spoc``).
* :func:`spoc_weights` and :func:`gem_contributions` -- the spatial weights the two
  poolings give each position of a feature map, for drawing (``02_spoc``, ``03_gem``).

A ``book`` argument is a :class:`retrieval_lib.book.Book` (``start(...)``); the sweeps
use only its ``descriptors``/``query_descriptors``/``evaluate``/``fmaps`` methods and
``benchmark``. Metric dicts are those of ``book.evaluate``; :func:`headline` picks the
one number a plot shows ("mAP" for group sets, "mAP/medium" for revisited Oxford/Paris).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lib.layers import functional

__all__ = [
    "HEADLINE_KEYS",
    "headline",
    "spoc_weights",
    "gem_contributions",
    "GeM64",
    "gem_poolings",
    "describe_many",
    "evaluate_many",
    "sweep_p",
    "sweep_image_size",
    "self_similarity",
    "query_aps",
    "compare_aps",
    "top_results",
    "pair_similarity_vs_p",
    "map_on_subset",
    "fmaps_of",
]

#: Metric keys tried in order by :func:`headline`.
HEADLINE_KEYS = ("mAP", "mAP/medium")


def headline(metrics: Mapping) -> float:
    """The one number a sweep plots: ``metrics["mAP"]``, else ``metrics["mAP/medium"]``.

    Group sets (real171, the offline default) report ``"mAP"``; revisited Oxford/Paris
    report Easy/Medium/Hard, of which Medium is the usual headline.
    """
    for key in HEADLINE_KEYS:
        if key in metrics:
            return float(metrics[key])
    raise KeyError(f"no headline metric in {sorted(metrics)}; expected one of {HEADLINE_KEYS}")


# ----------------------------------------------------------------------------------------
# spatial weights, for drawing
# ----------------------------------------------------------------------------------------
def spoc_weights(H: int, W: int, center_prior: bool = True, dtype=torch.float64) -> torch.Tensor:
    """The weight SPoC gives each position of an ``H x W`` map: ``(H, W)``, summing to 1.

    Read off :func:`retrieval_lib.layers.functional.spoc` itself by pooling a one-hot map (channel
    ``k`` is 1 at position ``k`` and 0 elsewhere), so the picture is exactly what the code
    computes -- the Gaussian centre prior of Babenko & Lempitsky (ICCV 2015) with
    ``center_prior=True``, ``1 / (H W)`` everywhere without. Taught in ``02_spoc``.
    """
    H = functional._check_int(H, "H", "spoc_weights")
    W = functional._check_int(W, "W", "spoc_weights")
    onehot = torch.eye(H * W, dtype=dtype).reshape(1, H * W, H, W)  # channel k = position k
    return functional.spoc(onehot, center_prior=center_prior).reshape(H, W)


def gem_contributions(fmap: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Where GeM "looks": the share of each position in the pooled power mean.

    For channel ``k`` the GeM descriptor is ``(mean_i x_ik^p)^(1/p)``; position ``i``
    contributes ``w_ik = x_ik^p / sum_j x_jk^p`` to the sum inside. This returns the
    mean over channels ``(1/C) sum_k w_ik``: shapes ``(C, h, w) -> (h, w)`` or
    ``(B, C, h, w) -> (B, h, w)``; each map sums to 1. ``p = 1`` weighs positions by their
    activation (SPoC); as ``p`` grows the weight of each channel moves onto its arg-max
    (MAC). Computed as a softmax over positions of ``p * log(max(x, eps))`` (the same
    clamp as :func:`functional.gem`), so it does not overflow for any ``p``.

    Source: GeM, Radenović, Tolias & Chum, TPAMI 2018. Taught in ``03_gem``.
    """
    single = fmap.dim() == 3
    x = fmap.unsqueeze(0) if single else fmap
    functional._check_fmap(x, "gem_contributions")
    functional._check_p(p, x.shape[1], "gem_contributions")
    B, C, h, w = x.shape
    logits = float(p) * x.clamp(min=eps).log().reshape(B, C, h * w)
    share = torch.softmax(logits, dim=-1).mean(dim=1).reshape(B, h, w)  # (B, h, w)
    return share[0] if single else share


# ----------------------------------------------------------------------------------------
# many poolings at once
# ----------------------------------------------------------------------------------------
class GeM64:
    """GeM with a fixed ``p`` evaluated in float64: ``(B, C, H, W) -> (B, C)``, input dtype.

    :func:`functional.gem` in float32 overflows once ``x^p`` passes ~3e38 (e.g. ``x = 6``,
    the ReLU6 ceiling of EfficientNet-Lite, at ``p > 49``); float64 holds ``6^p`` up to
    ``p ~ 396``. (At large ``p`` the powers of very small activations underflow to 0: a
    channel whose activations are all tiny, e.g. below 1e-3 at ``p = 200``, comes out as 0
    instead of a tiny value.) Used by the sweeps;
    the result is cast back to the input's dtype.
    """

    def __init__(self, p: float, eps: float = 1e-6):
        functional._check_p(p, 1, "GeM64")
        functional._check_eps(eps, "GeM64")
        self.p = float(p)
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional.gem(x.double(), self.p, self.eps).to(x.dtype)

    def __repr__(self) -> str:
        return f"GeM64(p={self.p:g}, eps={self.eps:g})"


def gem_poolings(ps: Sequence[float], eps: float = 1e-6) -> dict:
    """``{p: GeM64(p)}`` for every exponent in ``ps`` (each a positive finite number)."""
    ps = [float(p) for p in ps]
    if not ps:
        raise ValueError("gem_poolings: give at least one exponent p, e.g. [1, 2, 3, 4, 8]")
    return {p: GeM64(p, eps) for p in ps}


def _single_scale_cached(book) -> bool:
    return bool(book.keeps_fmaps) and tuple(book.cfg.scales) == (1.0,)


def describe_many(book, poolings: Mapping, which: str = "database",
                  image_size: int | None = None) -> dict:
    """L2-normalised descriptors ``{label: (N, D)}`` of ``book``'s images for many poolings.

    At ``smoke``/``cpu`` scale (feature maps kept, one scale) every pooling re-pools the
    cached maps; otherwise the backbone runs once for all poolings
    (:func:`retrieval_lib.engine.extract.extract_descriptors` with a dict), multi-scale as the
    scale asks. ``which`` is ``"database"`` or ``"queries"`` (the database for group sets).
    """
    from retrieval_lib.engine.extract import extract_descriptors, pool_fmaps

    if not poolings:
        raise ValueError("describe_many: `poolings` is empty; give {label: pooling}")
    if which == "queries" and book.benchmark.queries is None:
        which = "database"
    if _single_scale_cached(book):
        fmaps = book.fmaps(which, image_size)
        return {label: pool_fmaps(fmaps, pool) for label, pool in poolings.items()}
    return extract_descriptors(book.model, book._images(which), dict(poolings), scales=book.cfg.scales,
                               image_size=image_size or book.cfg.image_size, device=book.device,
                               batch_size=book.cfg.batch_size, progress=book.progress)


def evaluate_many(book, poolings: Mapping, image_size: int | None = None,
                  return_descriptors: bool = False):
    """``{label: metrics}`` of ``book.evaluate`` for many poolings (see :func:`describe_many`).

    With ``return_descriptors=True`` returns ``(metrics, X, Q)`` where ``X`` and ``Q`` are
    the dicts of database and query descriptors (``Q is X`` for group sets).
    """
    X = describe_many(book, poolings, "database", image_size)
    has_queries = book.benchmark.queries is not None
    Q = describe_many(book, poolings, "queries", image_size) if has_queries else X
    metrics = {label: book.evaluate(X[label], Q[label] if has_queries else None) for label in poolings}
    return (metrics, X, Q) if return_descriptors else metrics


def sweep_p(book, ps: Sequence[float], eps: float = 1e-6) -> dict:
    """mAP of GeM for every exponent in ``ps``; one backbone pass (or none, with cached maps).

    Returns ``{"p": (n,) array, "mAP": (n,) array of :func:`headline`, "metrics": [dict]}``
    in the order of ``ps``. GeM is evaluated in float64 (:class:`GeM64`), so large ``p``
    is safe. Taught in ``03_gem`` (mAP as a function of p).
    """
    pools = gem_poolings(ps, eps)
    metrics = evaluate_many(book, pools)
    ms = [metrics[p] for p in pools]
    return {"p": np.array(list(pools)), "mAP": np.array([headline(m) for m in ms]), "metrics": ms}


def sweep_image_size(book, sizes: Sequence[int], poolings: Mapping, progress: bool = True) -> dict:
    """mAP of several poolings for every input size (longer side, px) in ``sizes``.

    Returns ``{"size": (n,) array, "mAP": {label: (n,) array}, "metrics": {label: [dict]},
    "X": {label: {size: (N, D)}}}``; the database descriptors ``X`` are kept so that a
    notebook can compare the same image described at two sizes (:func:`self_similarity`).
    Each size costs one backbone pass over the images (cached at smoke/cpu scale).
    Taught in ``02_spoc`` (the sensitivity of average pooling to input size).
    """
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 32:
        raise ValueError(f"sweep_image_size: sizes must be input sizes of at least 32 px, got {sizes}")
    if not poolings:
        raise ValueError("sweep_image_size: `poolings` is empty; give {label: pooling}")
    out = {"size": np.array(sizes), "mAP": {k: [] for k in poolings}, "metrics": {k: [] for k in poolings},
           "X": {k: {} for k in poolings}}
    for s in tqdm(sizes, desc="image sizes", unit="size", disable=not progress):
        metrics, X, _ = evaluate_many(book, poolings, image_size=s, return_descriptors=True)
        for label in poolings:
            out["metrics"][label].append(metrics[label])
            out["mAP"][label].append(headline(metrics[label]))
            out["X"][label][s] = X[label]
    out["mAP"] = {k: np.array(v) for k, v in out["mAP"].items()}
    return out


def self_similarity(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``(X * Y).sum(-1)``: ``(N, D), (N, D) -> (N,)``.

    For L2-normalised descriptors of the same N images computed two ways (e.g. at two
    input sizes) this is each image's cosine similarity to itself: 1 means the
    descriptor did not change. Taught in ``02_spoc``.
    """
    if X.shape != Y.shape or X.dim() != 2:
        raise ValueError(f"self_similarity: X and Y must both be (N, D) of the same shape, got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    return (X * Y).sum(dim=-1)


# ----------------------------------------------------------------------------------------
# per query
# ----------------------------------------------------------------------------------------
def query_aps(benchmark, ranks) -> np.ndarray:
    """Average precision of every query: ``(n_queries,)`` float64, NaN where it has no positive.

    * Group sets (``benchmark.labels``, every image a query): the AP of
      :func:`retrieval_lib.search.evaluate.map_by_labels` (the query itself is junk).
    * Revisited Oxford/Paris (``benchmark.gnd``): the Medium protocol (``easy + hard``
      positive, ``junk`` ignored) of :func:`retrieval_lib.search.evaluate.compute_map`.

    Their mean over the non-NaN entries equals the benchmark's ``"mAP"`` (resp.
    ``"mAP/medium"``). Taught in ``02_spoc``.
    """
    from retrieval_lib.search.evaluate import compute_map, map_by_labels

    if getattr(benchmark, "labels", None) is not None and benchmark.queries is None:
        return np.asarray(map_by_labels(ranks, benchmark.labels, kappas=(1,))["aps"], dtype=np.float64)
    gnd = getattr(benchmark, "gnd", None)
    if gnd is not None:
        medium = [{"ok": np.concatenate([np.asarray(g["easy"], np.int64), np.asarray(g["hard"], np.int64)]),
                   "junk": np.asarray(g["junk"], np.int64)} for g in gnd]
        return compute_map(ranks, medium, kappas=(1,))[1]
    raise TypeError(f"query_aps: {type(benchmark).__name__} has neither group labels (with every image a "
                    "query) nor revisited ground truth `gnd`; cannot tell which results are right")


def compare_aps(ap_a, ap_b, tol: float = 1e-9) -> dict:
    """Which queries descriptor A wins or loses against descriptor B, by per-query AP.

    ``ap_a``, ``ap_b``: ``(n,)`` per-query APs (e.g. from :func:`query_aps`); queries
    where either is NaN are left out. Returns

    * ``"delta"``: ``(n,)`` ``ap_a - ap_b`` (NaN where left out);
    * ``"wins"``: indices with ``delta > tol``, biggest win first;
    * ``"losses"``: indices with ``delta < -tol``, biggest loss first;
    * ``"ties"``: indices with ``|delta| <= tol``, in index order.

    Taught in ``02_spoc`` (SPoC against MAC).
    """
    a = np.asarray(ap_a, dtype=np.float64)
    b = np.asarray(ap_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"compare_aps: ap_a and ap_b must be 1-D of equal length, got {a.shape} and {b.shape}")
    delta = a - b
    ok = np.isfinite(delta)
    idx = np.flatnonzero(ok)
    d = delta[idx]
    wins = idx[d > tol]
    losses = idx[d < -tol]
    return {
        "delta": delta,
        "wins": wins[np.argsort(-delta[wins], kind="stable")],
        "losses": losses[np.argsort(delta[losses], kind="stable")],
        "ties": idx[np.abs(d) <= tol],
    }


def top_results(benchmark, ranks, q: int, k: int = 5):
    """Query ``q``'s first ``k`` results and whether each is right: ``(indices, correct)``.

    Group sets: the query itself (ranked first) is skipped and a result is right when it
    shares the query's label. Revisited Oxford/Paris: right = ``easy`` or ``hard``, ``None``
    for ``junk`` (neither right nor wrong), wrong otherwise. ``ranks`` is ``(n_q, n_db)``.
    """
    row = np.asarray(ranks)[int(q)]
    labels = getattr(benchmark, "labels", None)
    if labels is not None and benchmark.queries is None:
        row = row[row != int(q)][:k]
        return row.tolist(), [bool(labels[r] == labels[int(q)]) for r in row]
    gnd = getattr(benchmark, "gnd", None)
    if gnd is None:
        raise TypeError(f"top_results: {type(benchmark).__name__} has neither group labels nor `gnd`")
    g = gnd[int(q)]
    ok = set(np.asarray(g["easy"]).tolist()) | set(np.asarray(g["hard"]).tolist())
    junk = set(np.asarray(g["junk"]).tolist())
    row = row[:k]
    return row.tolist(), [True if r in ok else (None if r in junk else False) for r in row.tolist()]


def pair_similarity_vs_p(fmap_a: torch.Tensor, fmap_b: torch.Tensor, ps: Sequence[float],
                         eps: float = 1e-6) -> np.ndarray:
    """Cosine similarity of the GeM descriptors of two maps, for every ``p`` in ``ps``: ``(n,)``.

    ``fmap_a``, ``fmap_b``: ``(C, h, w)`` (sizes may differ). GeM in float64
    (:class:`GeM64`), each descriptor L2-normalised. Taught in ``03_gem`` (how the
    similarity to a matching and to a non-matching image moves with ``p``).
    """
    if fmap_a.dim() != 3 or fmap_b.dim() != 3 or fmap_a.shape[0] != fmap_b.shape[0]:
        raise ValueError(f"pair_similarity_vs_p: expected two (C, h, w) maps with the same C, got "
                         f"{tuple(fmap_a.shape)} and {tuple(fmap_b.shape)}")
    out = []
    for pool in gem_poolings(ps, eps).values():
        a = functional.l2n(pool(fmap_a[None].double()))
        b = functional.l2n(pool(fmap_b[None].double()))
        out.append(float((a * b).sum()))
    return np.array(out)


def map_on_subset(X: torch.Tensor, labels, mask) -> float:
    """mAP of the images with ``mask`` True, each querying only the others of the subset.

    For a held-out evaluation: descriptors ``X (N, D)``, group ``labels (N,)``, ``mask (N,)``
    bool. Same protocol as a group set's ``"mAP"`` (the query itself is junk; a query
    without a positive in the subset is left out). Taught in ``03_gem`` (learnable p).
    """
    from retrieval_lib.search.evaluate import map_by_labels
    from retrieval_lib.search.nearest import rank_database

    m = np.asarray(mask, dtype=bool)
    lab = np.asarray(labels)
    if m.shape != (X.shape[0],) or lab.shape != (X.shape[0],):
        raise ValueError(f"map_on_subset: labels and mask must have shape ({X.shape[0]},), got "
                         f"{lab.shape} and {m.shape}")
    if not m.any():
        raise ValueError("map_on_subset: the mask selects no image")
    idx = torch.as_tensor(np.flatnonzero(m), device=X.device)
    Xs = X[idx]
    return float(map_by_labels(rank_database(Xs, Xs), lab[m], kappas=(1,))["mAP"])


def fmaps_of(book, indices: Sequence[int], which: str = "database") -> list:
    """Feature maps ``(C, h, w)`` of a few images, at any scale.

    At ``smoke``/``cpu`` scale they come from the cached maps of all images; at ``full``
    scale, where the maps of thousands of 1024 px images are not kept, only the listed
    images go through the backbone. For the per-image pictures of the notebooks.
    """
    from retrieval_lib.engine.extract import extract_fmaps
    from retrieval_lib.data.images import ImageList

    indices = [int(i) for i in indices]
    images = book._images(which)
    bad = [i for i in indices if not 0 <= i < len(images)]
    if bad:
        raise IndexError(f"fmaps_of: indices {bad} are outside the {len(images)} {which} images")
    if book.keeps_fmaps:
        fmaps = book.fmaps(which)
        return [fmaps[i] for i in indices]
    boxes = getattr(images, "boxes", None)
    sub = ImageList([images.paths[i] for i in indices],
                    boxes=None if boxes is None else [boxes[i] for i in indices],
                    min_size=images.min_size, max_aspect=images.max_aspect, on_error=images.on_error)
    return extract_fmaps(book.model, sub, image_size=book.cfg.image_size, device=book.device,
                         batch_size=1, progress=False)
