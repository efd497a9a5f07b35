"""retrieval_lib: the library behind the runnable textbook of deep image retrieval.

Notebooks in ``notebooks/`` teach; this package computes. Conventions used everywhere:
feature maps ``(B, C, H, W)``, descriptors ``(N, D)`` L2-normalised, similarity ``Q @ X.T``,
``ranks`` ``(n_queries, n_db)`` database indices best first.

The package is organised by concept; imports run one way, from the equations up:

* ``layers``  -- the equations: pooling functions and modules, losses, whitening;
* ``models``  -- backbones (EfficientNet-Lite with offline weights, ResNet);
* ``data``    -- the image opener, data sets, downloads;
* ``search``  -- k-NN, re-ranking (alpha-QE, DBA), evaluation protocols;
* ``engine``  -- devices, batched/cached extraction, training and mining;
* ``book``    -- what the notebooks use: the session (``start``), figures, sweeps, report.

The names a notebook or script needs most are re-exported here, one import away.
"""

from retrieval_lib.engine.device import get_device, seed_everything
from retrieval_lib.layers.functional import gem, l2n, mac, region_mac, rmac, rmac_regions, spoc, wgem
from retrieval_lib.layers.losses import (batch_hard_triplet_loss, contrastive_loss, nra_like_loss, smooth_ap_loss,
                                         smoothed_cross_entropy, triplet_loss)
from retrieval_lib.layers.pooling import MAC, POOLING, RMAC, GeM, SPoC, WGeM, make_pooling
from retrieval_lib.layers.aggregation import DARAC, TrainableRMAC, darac_regions, darac_vectors
from retrieval_lib.layers.cgd import CGD
from retrieval_lib.layers.whitening import covariance_spectrum, learned_whitening, pca_whitening, zca_whitening
from retrieval_lib.models.backbones import efficientnet_lite, load_backbone, resnet50_cgd
from retrieval_lib.models.released import fetch_network, load_network, released_networks
from retrieval_lib.data.images import ImageList
from retrieval_lib.search.evaluate import compute_map, evaluate_revisited
from retrieval_lib.search.nearest import knn, rank_database
from retrieval_lib.search.compress import Float16Codec, PCACodec, PQCodec, compressed_pair
from retrieval_lib.search.compare import holm, paired_comparison, sign_test
from retrieval_lib.engine.extract import extract_descriptors, extract_fmaps
from retrieval_lib.book.session import start
from retrieval_lib.book.verdict import multiplicity_note, verdict

__version__ = "0.1.0"

__all__ = [
    "get_device", "seed_everything",
    "l2n", "mac", "spoc", "gem", "rmac_regions", "region_mac", "rmac", "wgem",
    "MAC", "SPoC", "GeM", "RMAC", "WGeM", "POOLING", "make_pooling",
    "TrainableRMAC", "DARAC", "darac_regions", "darac_vectors", "CGD",
    "contrastive_loss", "triplet_loss", "batch_hard_triplet_loss", "smoothed_cross_entropy",
    "smooth_ap_loss", "nra_like_loss",
    "pca_whitening", "zca_whitening", "learned_whitening", "covariance_spectrum",
    "load_backbone", "efficientnet_lite", "resnet50_cgd", "load_network", "released_networks", "fetch_network",
    "ImageList",
    "compute_map", "evaluate_revisited", "knn", "rank_database",
    "Float16Codec", "PCACodec", "PQCodec", "compressed_pair",
    "paired_comparison", "sign_test", "holm", "verdict", "multiplicity_note",
    "extract_descriptors", "extract_fmaps", "start",
]
