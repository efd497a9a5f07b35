"""The equations: pooling functions and modules, losses, whitening (no I/O, no training loops)."""
from retrieval_lib.layers.functional import gem, gem_grads, l2n, mac, region_mac, rmac, rmac_regions, spoc, wgem
from retrieval_lib.layers.losses import batch_hard_triplet_loss, contrastive_loss, smoothed_cross_entropy, triplet_loss
from retrieval_lib.layers.pooling import MAC, POOLING, RMAC, GeM, SPoC, WGeM, make_pooling
from retrieval_lib.layers.whitening import Whitening, learned_whitening, pca_whitening, zca_whitening
