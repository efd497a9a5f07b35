"""Reproduce the released networks' revisited Oxford/Paris numbers in the authors' setting.

``python -m retrieval_lib reproduce --scale full --network NAME[,NAME] --data DIR --out R``
calls :func:`main_paper_networks`: for each network (a name of
:func:`~retrieval_lib.models.released.released_networks` or a local file) it extracts
``roxford5k`` and ``rparis6k`` exactly as the authors' test script does, evaluates Easy /
Medium / Hard with the revisited protocol, and writes ``R/paper_networks.md`` and ``.json``:
per network, data set and protocol, the paper's number, ours, the difference, and whether
the setting is the same (every field of :func:`setting_differences` agrees).

The authors' test path, where it differs from the library's defaults (cited in
:mod:`retrieval_lib.models.released`):

* image: ``PIL.Image.open(...).convert("RGB")`` (no EXIF rotation, alpha dropped, not
  composited), a query cropped to its box with ``round`` (PIL's ``crop``), then for cirtorch
  ``thumbnail((S, S), ANTIALIAS)``: the longer side to ``S`` if it is longer, never enlarged.
  The thumbnail is written out with Pillow < 7's rule (sizes truncated with ``int``, one
  Lanczos resize; Pillow >= 7 rounds the size and pre-reduces the image), the Pillow of the
  authors' PyTorch 1.0 setup. dirtorch keeps the image at its own size.
* normalisation: the checkpoint's mean/std on RGB in ``[0, 1]`` (``ToTensor`` then
  ``Normalize``), not the library's per-backbone default.
* scales: :meth:`~retrieval_lib.models.released.ReleasedNet.multiscale` with the script's
  ``msp`` (:func:`~retrieval_lib.models.released.cirtorch_msp`); one image at a time.
* post-processing whitening: cirtorch's ``Lw`` (``'ms'`` when several scales) or dirtorch's
  PCA with power 0.25; the search is ``Q @ X.T``; the protocol is the library's
  :meth:`~retrieval_lib.data.datasets.RevisitedDataset.evaluate` (revisitop's, which is also
  cirtorch's ``compute_map``: trapezoidal AP, ``cirtorch/utils/evaluate.py``).
* dirtorch's numbers use another AP: ``eval_query_AP`` in ``dirtorch/datasets/generic.py``
  calls ``compute_AP`` = scikit-learn's ``average_precision_score`` (``dirtorch/utils/evaluation.py``),
  the non-interpolated AP, on the same Easy/Medium/Hard ok/junk sets; its queries are cropped to
  their box (``ImageListROIs.get_image``). :func:`map_noninterpolated` computes it, and dirtorch
  rows are compared in it.

Taught in ``notebooks/09_reproductions.ipynb``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from retrieval_lib.book.downloads import DATA_ITEMS, fetch_item
from retrieval_lib.book.report import markdown_table
from retrieval_lib.data.datasets import GND_SHA256, RevisitedDataset, find_gnd
from retrieval_lib.data.datasets import data_root as default_data_root
from retrieval_lib.data.download import file_hash
from retrieval_lib.engine.device import get_device
from retrieval_lib.errors import MissingDataError, UsageError
from retrieval_lib.models.released import ReleasedNetwork, cirtorch_msp, hash_prefix, load_network, released_networks
from retrieval_lib.search.evaluate import revisited_protocol
from retrieval_lib.search.nearest import rank_database

__all__ = ["authors_image", "old_thumbnail_size", "map_noninterpolated", "evaluate_network", "setting_differences", "paper_rows",
           "paper_table", "reproduce_networks", "main_paper_networks", "DATASETS", "PROTOCOLS"]

DATASETS = ("roxford5k", "rparis6k")
PROTOCOLS = ("easy", "medium", "hard")


def old_thumbnail_size(w: int, h: int, size: int) -> tuple[int, int]:
    """The size Pillow < 7's ``thumbnail((size, size))`` gives a ``w x h`` image (never larger).

    ``if x > S: y = int(max(y S / x, 1)); x = S``, then the same for ``y`` (Pillow 5/6,
    ``Image.thumbnail``). Pillow >= 7 rounds instead of truncating, so sizes can differ by 1 px.
    """
    x, y = w, h
    if x > size:
        y, x = int(max(y * size / x, 1)), int(size)
    if y > size:
        x, y = int(max(x * size / y, 1)), int(size)
    return x, y


def authors_image(path, box=None, image_size: Optional[int] = None, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """One image as the authors' loaders give it to the network: ``(1, 3, H, W)`` float32.

    RGB without EXIF rotation (cirtorch's ``pil_loader``), cropped to ``box`` rounded to
    pixels, thumbnail to ``image_size`` (``None``: own size), ``/ 255``, then
    ``(x - mean) / std``. See the module docstring for the sources.
    """
    with open(path, "rb") as f:
        im = Image.open(f).convert("RGB")
    if box is not None:
        im = im.crop(tuple(int(round(float(v))) for v in box))
    if image_size is not None:
        size = old_thumbnail_size(*im.size, int(image_size))
        if size != im.size:
            im = im.resize(size, Image.Resampling.LANCZOS)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.size[1], im.size[0], 3)
    x = x.permute(2, 0, 1).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s)[None]


def map_noninterpolated(ranks, gnd, protocol: str = "medium") -> float:
    """Mean non-interpolated AP (scikit-learn's ``average_precision_score``) on a revisited protocol.

    For each query with positives, the junk images are removed from its ranking and
    ``AP = (1 / n_pos) sum_i i / r_i`` over its positives, ``r_i`` the 1-based rank of the
    ``i``-th positive (ties are broken by the ranking). Queries without positives are left out
    of the mean, as dirtorch does. The library's :func:`~retrieval_lib.search.evaluate.compute_map`
    (revisitop, cirtorch) uses the trapezoidal rule instead, which is never larger on a hit
    after a miss. ``ranks`` ``(n_queries, n_db)``; returns a fraction (NaN if no query has a positive).
    """
    R = np.asarray(ranks)
    g = revisited_protocol(gnd, protocol)
    nq, n = R.shape
    ok, junk = np.zeros((nq, n), bool), np.zeros((nq, n), bool)
    for q, gq in enumerate(g):  # (n_queries, n_db) masks from the index lists
        ok[q, gq["ok"]], junk[q, gq["junk"]] = True, True
    hit, kept = np.take_along_axis(ok, R, 1), ~np.take_along_axis(junk, R, 1)  # in rank order
    rank = np.cumsum(kept, 1)  # 1-based rank among kept images
    hit &= kept
    prec = np.where(hit, np.cumsum(hit, 1) / np.maximum(rank, 1), 0.0).sum(1)  # rank 0 only before the first kept image
    npos = hit.sum(1)
    if not npos.any():
        return float("nan")
    return float(np.mean(prec[npos > 0] / npos[npos > 0]))


def _descriptors(net, paths, boxes, image_size, scales, msp, device, progress, desc) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i, p in enumerate(tqdm(paths, desc=desc, disable=not progress, leave=False)):
            x = authors_image(p, None if boxes is None else boxes[i], image_size, net.mean, net.std).to(device)
            out.append(net.multiscale(x, scales, msp).float().cpu())
    return torch.cat(out)  # (N, D)


def _gnd_is_real(name: str, root: Path) -> bool:
    """Whether the ground truth the library reads (:func:`find_gnd`) is the released file (its sha256)."""
    try:
        return file_hash(find_gnd(name, root)) == GND_SHA256[name]
    except FileNotFoundError:
        return False


def _entry_for(name_or_path) -> tuple[Optional[ReleasedNetwork], Optional[bool]]:
    """The registry entry of a name, or of a local file named like a released file, and whether
    the file is the released one (its sha256 starts with the hash in its name; ``None``: no hash)."""
    nets = released_networks()
    if str(name_or_path) in nets:
        entry = nets[str(name_or_path)]
        return entry, (True if entry.sha256_prefix else None)
    path = Path(name_or_path)
    entry = next((n for n in nets.values() if n.file_name == path.name), None)
    if entry is None or not path.is_file():
        return entry, None
    if entry.sha256_prefix is None:
        return entry, None
    return entry, file_hash(path).startswith(entry.sha256_prefix)


def evaluate_network(name_or_path, data_root=None, datasets: Sequence[str] = DATASETS, device="auto",
                     image_size: Optional[int] = None, scales: Optional[Sequence[float]] = None,
                     network_root=None, progress: bool = True) -> dict:
    """Measure one released network on revisited Oxford/Paris in the authors' setting.

    ``image_size`` / ``scales`` default to the registry's setting of the network (for a local
    file not named like a released one: 1024 px and one scale); passing others is allowed and
    recorded as a different setting. Returns ``{"network", "file", "registry" (entry dict or
    None), "released_file" (True: hash checked, False: differs, None: no hash), "setting" (what
    ran), "datasets": {name: {"n_database", "n_queries", "real_ground_truth", "metrics",
    "metrics_whitened" (None without post-whitening), "seconds"}}}``; metrics are fractions.

    Raises ``MissingDataError`` naming the download command when a data set is missing.
    """
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if root is None:
        raise MissingDataError("no data root: pass --data DIR (holding roxford5k/ and rparis6k/) or set "
                               "RETRIEVAL_DATA; get the data with `python -m retrieval_lib download roxford5k "
                               "--data DIR` (and rparis6k)")
    entry, released_file = _entry_for(name_or_path)
    net = load_network(name_or_path, root=network_root, progress=progress)
    dev = get_device(device)
    net = net.to(dev)
    st = entry.setting if entry is not None else {}
    fmt = net.info["format"]
    if image_size is None:
        image_size = st.get("image_size", 1024) if entry is not None else (None if fmt == "dirtorch" else 1024)
    scales = [float(s) for s in (scales if scales is not None else st.get("scales", [1.0]))]
    script = st.get("script", "cirtorch/examples/test.py" if fmt != "dirtorch" else "dirtorch/test_dir.py")
    msp = cirtorch_msp(net.info, scales, script) if fmt != "dirtorch" else 1.0
    post = bool(net.lw) or net.pca is not None
    setting = {"script": script, "image_size": image_size, "scales": scales, "msp": msp,
               "post_whitening": ("Lw " + ("ms" if len(scales) > 1 else "ss") if net.lw else
                                  "PCA power 0.25" if net.pca is not None else None),
               "resize": "authors' thumbnail" if image_size else "none", "device": str(dev),
               "ap": st.get("ap", "trapezoidal")}
    result = {"network": str(name_or_path), "file": net.info.get("file"), "registry": entry.as_dict() if entry else None,
              "released_file": released_file, "info": {k: v for k, v in net.info.items() if k != "registry"},
              "setting": setting, "datasets": {}}
    for name in datasets:
        try:
            bench = RevisitedDataset(name, root, min_size=0, max_aspect=float("inf"))
        except FileNotFoundError as err:
            raise MissingDataError(f"{err}; get it with `python -m retrieval_lib download {name} --data {root}`") from None
        t0 = time.perf_counter()
        X = _descriptors(net, bench.database.paths, None, image_size, scales, msp, dev, progress, f"{name} database")
        Q = _descriptors(net, bench.queries.paths, bench.queries.boxes, image_size, scales, msp, dev, progress,
                         f"{name} queries")
        final = rank_database(Q, X)
        metrics, whitened = bench.evaluate(final), None
        if post:
            Xw, Qw = net.post_whiten(X, multiscale=len(scales) > 1), net.post_whiten(Q, multiscale=len(scales) > 1)
            final = rank_database(Qw, Xw)
            whitened = bench.evaluate(final)
        nonint = {f"mAP/{p}": map_noninterpolated(final, bench.gnd, p) for p in PROTOCOLS}
        result["datasets"][name] = {"n_database": len(bench.database), "n_queries": len(bench.queries),
                                    "real_ground_truth": _gnd_is_real(name, root), "metrics": metrics,
                                    "metrics_whitened": whitened, "metrics_noninterpolated": nonint,
                                    "seconds": time.perf_counter() - t0}
    return result


def setting_differences(result: dict, dataset: str) -> list[str]:
    """Every way the run differs from the setting the paper's number was measured in (``[]``: same).

    Compared: the file is the released one (hash checked), the numbers are tied to it,
    architecture, image size, scales, ``msp``, post-processing whitening, the real ground truth
    (sha256 of ``gnd_<name>.pkl``). dirtorch's files carry no hash and the README's query
    cropping was not read from its source, so their rows are never called "same setting".
    """
    entry = result.get("registry")
    if entry is None:
        return ["not a released network (no paper number)"]
    diffs, st, run = [], entry["setting"], result["setting"]
    if result.get("released_file") is False:
        diffs.append("file differs from the released one (sha256 prefix)")
    elif result.get("released_file") is None:
        diffs.append("file not verifiable (no published hash)")
    if result["info"].get("architecture") != entry["architecture"]:
        diffs.append(f"architecture {result['info'].get('architecture')} != {entry['architecture']}")
    if run["image_size"] != st.get("image_size"):
        diffs.append(f"image size {run['image_size']} != {st.get('image_size')}")
    if [round(s, 6) for s in run["scales"]] != [round(s, 6) for s in st.get("scales", [1.0])]:
        diffs.append(f"scales {run['scales']} != {st.get('scales')}")
    expected_msp = cirtorch_msp(result["info"], st.get("scales", [1.0]), st.get("script", "")) \
        if result["info"].get("format") != "dirtorch" else 1.0
    if abs(run["msp"] - expected_msp) > 1e-9:
        diffs.append(f"msp {run['msp']:.4g} != {expected_msp:.4g}")
    if bool(run["post_whitening"]) != bool(st.get("post_whitening")):
        diffs.append(f"post-whitening {run['post_whitening']} != {st.get('post_whitening')}")
    d = result["datasets"].get(dataset, {})
    if not d.get("real_ground_truth"):
        diffs.append(f"stand-in data ({d.get('n_database')} images; the ground truth is not the released gnd_{dataset}.pkl)")
    return diffs


def paper_rows(result: dict) -> list[dict]:
    """One row per data set and protocol: paper (where published), ours, difference, same setting."""
    entry = result.get("registry") or {}
    paper = {(n["dataset"], n["protocol"]): n for n in entry.get("numbers", [])}
    rows = []
    for ds, d in result["datasets"].items():
        m = d["metrics_noninterpolated"] if result["setting"].get("ap") == "non-interpolated" else \
            (d["metrics_whitened"] or d["metrics"])
        diffs = setting_differences(result, ds)
        for prot in PROTOCOLS:
            ours = 100 * m[f"mAP/{prot}"]
            ours = None if ours != ours else round(ours, 2)  # NaN: no query has a positive in this protocol
            num = paper.get((ds, prot))
            rows.append({"network": Path(str(result["network"])).name, "dataset": ds, "protocol": prot,
                         "paper": None if num is None else num["value"], "ours": ours,
                         "difference": None if num is None or ours is None else round(ours - num["value"], 2),
                         "number_file": None if num is None else num["file"],
                         "same_setting": not diffs and num is not None, "differences": diffs,
                         "whitened": d["metrics_whitened"] is not None})
    return rows


def paper_table(results: Sequence[dict]) -> str:
    """Markdown: network, data set, protocol, paper, ours, difference, same setting."""
    rows = []
    for res in results:
        for r in paper_rows(res):
            same = "yes" if r["same_setting"] else ("no: " + "; ".join(r["differences"]) if r["differences"]
                                                    else "no paper number")
            if r["same_setting"] and r["number_file"] == "implied":
                same += " (the README does not name the file behind the number)"
            rows.append([r["network"], r["dataset"], r["protocol"].capitalize(),
                         "—" if r["paper"] is None else f"{r['paper']:.1f}", "n/a" if r["ours"] is None else f"{r['ours']:.1f}",
                         "—" if r["difference"] is None else f"{r['difference']:+.1f}", same])
    head = ("Released networks in the authors' setting: mAP (%) on the revisited protocol; 'ours' is after "
            "the post-processing whitening where the network has one (the published numbers are), with the "
            "authors' AP (trapezoidal for cirtorch, non-interpolated for dirtorch).")
    return head + "\n\n" + markdown_table(["network", "data set", "protocol", "paper", "ours", "difference",
                                           "same setting"], rows)


RELEASED_FOR = {
    "05_wgem": "rSfM120k-tl-resnet101-gem-w",
    "08_whitening": "retrievalSfM120k-resnet101-gem",
}
"""The released network a learned notebook shows at ``full`` scale, so a GPU user sees the trained result
without training it: 05 (learned pooling heads) the GeM network fine-tuned end to end on rSfM-120k with
its learned FC whitening -- wGeM itself was not released; 08 (whitening) the GeM network whose
post-processing whitening ``Lw`` was learned on rSfM-120k's matching pairs, measured with and without it."""


def released_section(notebook: str, data_root=None, device="auto", network=None, network_root=None,
                     progress: bool = True) -> tuple[str, Optional[dict]]:
    """Markdown (and the :func:`evaluate_network` result, or ``None``) for a learned notebook's
    "the authors' trained network" section at ``full`` scale.

    ``network`` defaults to :data:`RELEASED_FOR` of the notebook. The data sets present under the
    data root (roxford5k, rparis6k) are measured in the authors' setting; when neither is there the
    markdown says what to download and nothing runs. The network is downloaded once into the cache
    (checked against the hash in its file name).
    """
    name = network or RELEASED_FOR[notebook]
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    present = [ds for ds in DATASETS if root is not None and DATA_ITEMS[ds].present(root) == "yes"]
    where = f" --data {root}" if root is not None else " --data DIR"
    if not present:
        return (f"The authors' trained network `{name}` is measured on revisited Oxford and Paris; neither is under "
                f"the data root. Fetch them with `python -m retrieval_lib download roxford5k{where}` (and rparis6k), "
                "then rerun this cell.", None)
    result = evaluate_network(name, root, datasets=present, device=device, network_root=network_root,
                              progress=progress)
    text = [f"**The authors' trained network** `{Path(str(name)).name}`, measured here in their setting on "
            f"{', '.join(present)}:", "", paper_table([result])]
    if any(d["metrics_whitened"] is not None for d in result["datasets"].values()):
        rows = [[ds, prot.capitalize(), f"{100 * d['metrics'][f'mAP/{prot}']:.1f}",
                 f"{100 * d['metrics_whitened'][f'mAP/{prot}']:.1f}"]
                for ds, d in result["datasets"].items() for prot in PROTOCOLS if d["metrics_whitened"] is not None]
        text += ["", "The same descriptors before and after the network's post-processing whitening (mAP, %):", "",
                 markdown_table(["data set", "protocol", "without", "with the whitening"], rows)]
    missing = [ds for ds in DATASETS if ds not in present]
    if missing:
        text += ["", f"Not measured: {', '.join(missing)} (`python -m retrieval_lib download {missing[0]}{where}`)."]
    return "\n".join(text), result


def reproduce_networks(networks: Sequence[str], out, data_root=None, device="auto", network_root=None,
                       progress: bool = True) -> list[dict]:
    """:func:`evaluate_network` for each network, then ``out/paper_networks.md`` and ``.json``."""
    results = [evaluate_network(n, data_root, device=device, network_root=network_root, progress=progress)
               for n in networks]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused network or missing data writes nothing
    (out / "paper_networks.md").write_text(paper_table(results) + "\n")
    doc = [{**r, "rows": paper_rows(r)} for r in results]
    (out / "paper_networks.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return results


def reproduce_in_notebook(network: str, data_root, out, device="auto", network_root=None,
                          progress: bool = True) -> list[dict]:
    """A notebook's (Colab's) one-call reproduction: fetch revisited Oxford and Paris under ``data_root``
    when they are not there yet (``python -m retrieval_lib download``'s code, checked), then
    :func:`reproduce_networks` for ``network`` into ``out`` (``paper_networks.md`` / ``.json``)."""
    if data_root is None:
        raise UsageError("reproduce_in_notebook needs a data root to download revisited Oxford/Paris into "
                         "(DATA_ROOT, e.g. /content/data in Colab)")
    root = Path(data_root).expanduser()
    for ds in DATASETS:
        if DATA_ITEMS[ds].present(root) != "yes":
            fetch_item(ds, root, progress=progress)
    return reproduce_networks([network], out, data_root=root, device=device, network_root=network_root,
                              progress=progress)


def main_paper_networks(args, out: Path, data, cache: Path) -> int:
    """``reproduce --network A,B``: measure the named released networks; print and write the table."""
    names = [n.strip() for n in str(args.network).split(",") if n.strip()]
    if not names:
        raise UsageError("--network needs at least one name, e.g. --network rSfM120k-tl-resnet101-gem-w "
                         f"(choose from {sorted(released_networks())}) or a checkpoint path")
    results = reproduce_networks(names, out, data_root=data, device=args.device,
                                 network_root=Path(cache) / "networks",
                                 progress=not args.quiet)
    print(paper_table(results))
    print(f"\nwrote {Path(out) / 'paper_networks.md'}")
    return 0
