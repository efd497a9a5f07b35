"""The equations: pooling functions and modules, losses, whitening (no I/O, no training loops)."""
from retrieval_lib.layers.functional import gem, l2n, mac, region_mac, rmac, rmac_regions, spoc, wgem
from retrieval_lib.layers.grads import gem_grads, wgem_backward, wgem_grads
from retrieval_lib.layers.losses import (batch_hard_triplet_loss, contrastive_loss, nra_like_loss, smooth_ap_loss,
                                         smoothed_cross_entropy, triplet_loss)
from retrieval_lib.layers.pooling import MAC, POOLING, RMAC, GeM, SPoC, WGeM, make_pooling
from retrieval_lib.layers.whitening import (Spectrum, Whitening, covariance_spectrum, learned_whitening, pca_whitening,
                                            zca_whitening)
from retrieval_lib.layers.aggregation import DARAC, TrainableRMAC, darac_regions, darac_vectors
from retrieval_lib.layers.cgd import CGD, CGD_CONFIGS
