"""retrieval_lib: the library behind the runnable textbook of deep image retrieval.

Notebooks in ``notebooks/`` teach; this package computes. Conventions used everywhere:
feature maps ``(B, C, H, W)``, descriptors ``(N, D)`` L2-normalised, similarity ``Q @ X.T``,
``ranks`` ``(n_queries, n_db)`` database indices best first.

The package is organised by concept; imports run one way, from the equations up:

* ``layers``  -- the equations: pooling functions and modules, learned heads, whitening, losses;
* ``models``  -- backbones (EfficientNet-Lite with offline weights, ResNet) and whole networks;
* ``data``    -- the image opener, data sets, splits, downloads;
* ``search``  -- k-NN, re-ranking (alpha-QE, DBA), evaluation protocols, comparisons, codecs;
* ``engine``  -- devices, batched/cached extraction, training and mining;
* ``book``    -- what the notebooks use around the library: the session (``start``), figures,
  sweeps, explanations, the results report and the ``reproduce`` command
  (``from retrieval_lib.book import ...``).

This top level holds the library's names that the notebooks and the scripts of
``benchmarks/`` use (``tests/test_public_api.py`` keeps it so), each under one name, plus
``start``; everything else is one import deeper, in its module.
"""

from retrieval_lib.engine.device import get_device, seed_everything
from retrieval_lib.layers.functional import gem, l2n, mac, region_mac, rmac, rmac_regions, spoc, wgem
from retrieval_lib.layers.grads import gem_grads, wgem_backward, wgem_grads
from retrieval_lib.layers.pooling import MAC, RMAC, GeM, SPoC, WGeM
from retrieval_lib.layers.aggregation import DARAC, TrainableRMAC, darac_regions, darac_slots
from retrieval_lib.layers.cgd import CGD, CGD_CONFIGS
from retrieval_lib.layers.contributions import rmac_contributions
from retrieval_lib.layers.whitening import covariance_spectrum, pca_whitening, zca_whitening
from retrieval_lib.models.backbones import LAST_ACTIVATIONS, RELU6_CLIP, efficientnet_lite, load_backbone
from retrieval_lib.models.retrieval_net import RetrievalNet
from retrieval_lib.models.cgd_net import build_head
from retrieval_lib.models.released import load_network, released_networks
from retrieval_lib.data.images import ImageList, load_image, resize_longer_side, to_tensor
from retrieval_lib.data.datasets import (CUB200, GND_URL, IMAGE_URLS, REVISITED, GroupDataset, cache_root, data_root,
                                         default_benchmark, download_cub, find_gnd, load_gnd)
from retrieval_lib.data.sfm120k import SFM_BASE_URL, SFM_NAME, load_sfm120k
from retrieval_lib.data.splits import split_groups, take
from retrieval_lib.data.composites import mask_mass_in_box, object_task
from retrieval_lib.search.nearest import knn, rank_database
from retrieval_lib.search.evaluate import (compare_aps, compute_map, evaluate_revisited, headline, map_by_labels,
                                           query_aps)
from retrieval_lib.search.compare import mean_ap_excluding, paired_comparison
from retrieval_lib.search.verdict import multiplicity_note, signed, verdict
from retrieval_lib.search.rerank import dba, expanded_ranks
from retrieval_lib.search.topk import compare_rows
from retrieval_lib.search.compress import Float16Codec, Float32Codec, PCACodec, PQCodec, faiss_available
from retrieval_lib.engine.allocator import tune_allocator
from retrieval_lib.engine.fold import fold_batchnorm
from retrieval_lib.engine.extract import extract_descriptors, extract_fmaps, pool_fmaps
from retrieval_lib.engine.mining import TRAIN_SUBSETS, PKMiner, TupleMiner, honest_split, mine_pairs
from retrieval_lib.engine.objectives import BatchHardLoss, RankLoss, TupleLoss
from retrieval_lib.engine.sources import MapSource
from retrieval_lib.engine.recipes import (CGD_RECIPE, RECIPES, cgd_trainer, describe_images, paper_trainer,
                                          reduced_source, remap_labels)
from retrieval_lib.engine.train import fit_pooling
from retrieval_lib.engine.trainer import Trainer
from retrieval_lib.engine.validation import train_with_validation
from retrieval_lib.book.session import start

__version__ = "0.1.0"

__all__ = [
    # layers: the equations
    "l2n", "mac", "spoc", "gem", "wgem", "rmac", "rmac_regions", "region_mac", "gem_grads", "wgem_grads",
    "wgem_backward", "MAC", "SPoC", "GeM", "RMAC", "WGeM", "TrainableRMAC", "DARAC", "darac_regions",
    "darac_slots", "CGD", "CGD_CONFIGS", "rmac_contributions", "pca_whitening", "zca_whitening",
    "covariance_spectrum",
    # models
    "load_backbone", "efficientnet_lite", "LAST_ACTIVATIONS", "RELU6_CLIP", "RetrievalNet", "build_head",
    "load_network", "released_networks",
    # data
    "ImageList", "load_image", "resize_longer_side", "to_tensor", "GroupDataset", "default_benchmark",
    "data_root", "cache_root", "find_gnd", "load_gnd", "GND_URL", "IMAGE_URLS", "REVISITED", "CUB200",
    "download_cub", "load_sfm120k", "SFM_BASE_URL", "SFM_NAME", "split_groups", "take",
    "mask_mass_in_box", "object_task",
    # search
    "knn", "rank_database", "compute_map", "evaluate_revisited", "map_by_labels", "query_aps", "headline",
    "compare_aps", "paired_comparison", "verdict", "multiplicity_note", "signed", "mean_ap_excluding", "dba",
    "expanded_ranks", "compare_rows",
    "Float32Codec", "Float16Codec", "PCACodec", "PQCodec", "faiss_available",
    # engine
    "get_device", "seed_everything", "tune_allocator", "fold_batchnorm", "extract_descriptors", "extract_fmaps",
    "pool_fmaps", "honest_split", "mine_pairs", "TRAIN_SUBSETS", "PKMiner", "TupleMiner", "TupleLoss",
    "BatchHardLoss", "RankLoss", "MapSource", "Trainer", "RECIPES", "CGD_RECIPE", "paper_trainer", "cgd_trainer",
    "reduced_source", "describe_images", "remap_labels", "fit_pooling", "train_with_validation",
    # the book's entry point
    "start",
]
