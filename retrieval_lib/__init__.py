"""retrieval_lib: the library behind the runnable textbook of deep image retrieval.

Notebooks in ``notebooks/`` teach; this package computes. Conventions used everywhere:
feature maps ``(B, C, H, W)``, descriptors ``(N, D)`` L2-normalised, similarity ``Q @ X.T``,
``ranks`` ``(n_queries, n_db)`` database indices best first.

The pooling functions and modules are re-exported here; everything else lives in its
module (``retrieval_lib.whitening``, ``.evaluate``, ``.search``, ``.backbones``,
``.extract``, ``.datasets``, ...), see the README's map of the library.
"""

from .device import get_device, seed_everything
from .functional import gem, l2n, mac, region_mac, rmac, rmac_regions, spoc, wgem
from .pooling import MAC, POOLING, RMAC, GeM, SPoC, WGeM, make_pooling

__version__ = "0.1.0"

__all__ = [
    "get_device", "seed_everything",
    "l2n", "mac", "spoc", "gem", "rmac_regions", "region_mac", "rmac", "wgem",
    "MAC", "SPoC", "GeM", "RMAC", "WGeM", "POOLING", "make_pooling",
]
