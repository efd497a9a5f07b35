"""Which last activation of EfficientNet-Lite serves retrieval better: ReLU6 (as trained) or ReLU.

EfficientNet-Lite ends with ReLU6, so its last feature map is clipped at 6 and on real
photos dozens of channels reach exactly 6: their MAC components tie. The same weights
with a plain ReLU there (``load_backbone(..., last_activation="relu")``) keep those
responses apart. This script measures both on real171 and applies a rule fixed before
measuring, so that the default of ``load_backbone`` is chosen by data and can be re-run:

* **Choice split (training groups):** the real171 subsets ``ukbench56`` and
  ``landmarks23``, as their own benchmark (their images are the database and each one
  queries all the others).
* **Held out, for information only:** ``wxbs`` and ``evd``, the same way. These numbers
  never enter the choice.
* **Measure:** mAP (``GroupDataset.evaluate``) of MAC, SPoC, GeM (p = 3) and R-MAC
  (L = 3), EfficientNet-Lite``variant`` at ``image_size`` px (longer side), one scale.
* **Rule:** the activation with the higher mean training-split mAP over the four
  poolings; on an exact tie ``"relu6"``, the network as trained.

One extraction per split with the ReLU model gives both maps: ReLU6's map is
``min(relu_map, 6)`` exactly (``tests/test_backbones.py`` checks that the two models'
maps agree that way). The feature maps are cached under ``--cache`` (default
``RETRIEVAL_CACHE``), so a re-run only pools and evaluates.

Command (about 5 minutes for the extraction on two busy CPU cores)::

    RETRIEVAL_DATA=/path/to/data python -m benchmarks.last_activation [--size 512] [--variant 0]
        [--device auto] [--cache DIR] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from retrieval_lib.book.explain import count_clipped
from retrieval_lib.data.datasets import GroupDataset, cache_root, data_root
from retrieval_lib.engine.device import get_device
from retrieval_lib.engine.extract import extract_fmaps, pool_fmaps
from retrieval_lib.layers.functional import gem, mac, rmac, spoc
from retrieval_lib.models.backbones import LAST_ACTIVATIONS, RELU6_CLIP, efficientnet_lite
from retrieval_lib.search.nearest import rank_database

TRAIN_SUBSETS = ("ukbench56", "landmarks23")
HELD_OUT_SUBSETS = ("wxbs", "evd")
POOLINGS = {
    "MAC": mac,
    "SPoC": spoc,
    "GeM (p=3)": partial(gem, p=3.0),
    "R-MAC (L=3)": partial(rmac, L=3),
}


def maps_by_activation(relu_maps: list) -> dict:
    """``{"relu": maps, "relu6": maps clipped at 6}`` from the ReLU model's maps ``(C, h, w)``."""
    return {"relu6": [f.clamp(max=RELU6_CLIP) for f in relu_maps], "relu": list(relu_maps)}


def score(fmaps: list, benchmark: GroupDataset, poolings: dict = POOLINGS) -> dict:
    """``{pooling label: mAP}``: every image queries all the others (itself ignored)."""
    out = {}
    for label, pool in poolings.items():
        X = pool_fmaps(fmaps, pool)  # (N, D), L2-normalised
        out[label] = float(benchmark.evaluate(rank_database(X, X))["mAP"])
    return out


def choose(train_scores: dict) -> str:
    """The rule: the activation with the higher mean mAP over the poolings; ties to "relu6".

    ``train_scores`` is ``{activation: {pooling: mAP}}`` on the training split.
    """
    means = {act: float(np.mean(list(train_scores[act].values()))) for act in LAST_ACTIVATIONS}
    return "relu" if means["relu"] > means["relu6"] else "relu6"


def measure(root=None, image_size: int = 512, variant: int = 0, device="cpu", cache_dir=None,
            progress: bool = False, train_subsets=TRAIN_SUBSETS, held_out_subsets=HELD_OUT_SUBSETS) -> dict:
    """Run the measurement; returns the scores of both splits, the clip counts and the choice.

    ``root`` is the data root holding ``real171/manifest.json`` (default ``RETRIEVAL_DATA``).
    Result: ``{"train": {activation: {pooling: mAP}}, "held_out": {...}, "train_mean" /
    "held_out_mean": {activation: mean mAP}, "clipped_per_image": {split: mean number of
    channels whose ReLU6 MAC is 6}, "choice": activation, "settings": {...}}``.
    """
    root = Path(root).expanduser() if root is not None else data_root()
    manifest = Path(root or ".") / "real171" / "manifest.json"
    if root is None or not manifest.is_file():
        raise FileNotFoundError(f"this measurement needs the real171 photos: no '{manifest}'; set "
                                "RETRIEVAL_DATA (or pass --data) to the folder holding real171/")
    model = efficientnet_lite(variant, last_activation="relu").to(device).eval()
    cache_dir = cache_root() / "fmaps" if cache_dir is None else Path(cache_dir)
    result: dict = {"settings": {"manifest": str(manifest), "image_size": image_size, "variant": variant,
                                 "backbone": model.config, "train_subsets": list(train_subsets),
                                 "held_out_subsets": list(held_out_subsets), "poolings": list(POOLINGS)},
                    "clipped_per_image": {}}
    t0 = time.perf_counter()
    for split, subsets in (("train", train_subsets), ("held_out", held_out_subsets)):
        bench = GroupDataset.from_manifest(manifest, subsets=subsets, name=f"real171-{split}")
        relu_maps = extract_fmaps(model, bench.database, image_size=image_size, cache_dir=cache_dir,
                                  progress=progress)
        maps = maps_by_activation(relu_maps)
        result[split] = {act: score(maps[act], bench) for act in LAST_ACTIVATIONS}
        result[f"{split}_mean"] = {act: float(np.mean(list(result[split][act].values())))
                                   for act in LAST_ACTIVATIONS}
        result["clipped_per_image"][split] = float(np.mean([count_clipped(f) for f in maps["relu6"]]))
        result["settings"][f"n_images_{split}"] = len(bench.database)
    result["choice"] = choose(result["train"])
    result["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def table(result: dict) -> str:
    """A Markdown table of both splits, both activations, every pooling and the mean."""
    rows = ["| split | activation | " + " | ".join(POOLINGS) + " | mean |",
            "|---|---|" + "---:|" * (len(POOLINGS) + 1)]
    for split, name in (("train", "training groups (choice)"), ("held_out", "held out (information)")):
        for act in LAST_ACTIVATIONS:
            vals = [result[split][act][p] for p in POOLINGS] + [result[f"{split}_mean"][act]]
            rows.append(f"| {name} | {act} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.last_activation", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="data root holding real171/ (default RETRIEVAL_DATA)")
    parser.add_argument("--size", type=int, default=512, help="longer side of the network input, px")
    parser.add_argument("--variant", type=int, default=0, help="EfficientNet-Lite variant (0, 1, 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--cache", default=None, help="feature-map cache folder (default <RETRIEVAL_CACHE>/fmaps)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    device = get_device(args.device)
    result = measure(args.data, args.size, args.variant, device, args.cache, progress=sys.stderr.isatty())
    s = result["settings"]
    print(f"EfficientNet-Lite{args.variant}, {args.size} px, mAP on real171: training groups "
          f"{'+'.join(s['train_subsets'])} ({s['n_images_train']} images), held out "
          f"{'+'.join(s['held_out_subsets'])} ({s['n_images_held_out']} images); {s['seconds']:.0f} s\n")
    print(table(result))
    print(f"\nchannels whose ReLU6 MAC is exactly 6, mean per image: training {result['clipped_per_image']['train']:.1f}, "
          f"held out {result['clipped_per_image']['held_out']:.1f} (of 1280)")
    tm = result["train_mean"]
    print(f"rule: higher training-group mean over the {len(POOLINGS)} poolings (ties: relu6): "
          f"relu6 {tm['relu6']:.4f}, relu {tm['relu']:.4f} -> {result['choice']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
