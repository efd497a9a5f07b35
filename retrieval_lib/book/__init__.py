"""What the notebooks use around the library: the session (``start``), the scales, figures,
sweeps, explanations, the results report and the ``reproduce`` command.

A notebook imports the library's names from ``retrieval_lib`` and these from here, one
import each (``tests/test_public_api.py`` checks that every name a notebook takes from the
book is here). Each name lives in the module named after what it serves:

* ``session``, ``config``, ``needs`` -- ``start``, the scales, what a notebook needs;
* ``explain``, ``receptive_fields``, ``viz``, ``viz_mac``, ``viz_regions``, ``region_maps`` -- where
  a descriptor looks, and the figures (01-04);
* ``sweeps``, ``regional`` -- mAP against a setting, R-MAC's regions (the sentence that ends a
  comparison, ``verdict``, is the library's: ``from retrieval_lib import verdict``);
* ``wgem``, ``darac``, ``cgd``, ``whitening_study``, ``whitening_indomain`` -- the learned notebooks (05-08);
* ``report``, ``reproduce``, ``paper_networks`` -- ``metrics.json``, the paper catalogue and the
  reproductions (09); ``explorer`` -- the explorer of 10.
"""
from retrieval_lib.book.session import Book, start
from retrieval_lib.book.config import SCALES, capped_sizes, default_progress, default_scale, dry_run_recipe
from retrieval_lib.book.needs import check_needs
from retrieval_lib.book.explain import (argmax_locations, clipped_channels, count_clipped, fmap_of,
                                        implicit_correspondences, rank_channels, top_channels)
from retrieval_lib.book.receptive_fields import (cell_boxes, cell_centers, conv_chain, input_gradients, mass_box,
                                                receptive_field)
from retrieval_lib.book.viz import (live_figure, overlay, show_ap_trapezoids, show_gem_view, show_images, show_ranked,
                                    show_two_rankings)
from retrieval_lib.book.viz_mac import overlay_cells, show_argmax, show_correspondences, show_receptive_field
from retrieval_lib.book.viz_regions import show_region_levels, show_region_macs
from retrieval_lib.book.region_maps import show_region_map
from retrieval_lib.book.sweeps import (evaluate_many, gem_contributions, gem_poolings, map_on_subset,
                                       pair_similarity_vs_p, self_similarity, spoc_weights, sweep_image_size)
from retrieval_lib.book.regional import aspect_crop, fmap_size, map_vs_L, region_count_table, region_levels
from retrieval_lib.book.wgem import show_composite_masks, show_mask_pair
from retrieval_lib.book.darac import (SIZE_STUDY, choose_by_validation, fixed_poolings, frozen_vectors, layout_checks,
                                      mean_contributions, not_beaten_note, paired_rows, rank_correlation,
                                      show_contributions, show_heldout, show_region_weights, show_size_study,
                                      slot_coverage)
from retrieval_lib.book.cgd import (compare, comparison_table, describe, heldout_scores, loss_change, pool_branches,
                                    summarize, take_branches, train_and_score)
from retrieval_lib.book.whitening_study import (WHITENING_NAMES, comparison_rows, evaluate_descriptors, image_patches,
                                                learn_whitenings, mahalanobis_sq, plot_map_vs_bytes, plot_map_vs_dim,
                                                show_whitened_patches, show_whitening_2d, sweep_codecs, sweep_dims,
                                                training_descriptors)
from retrieval_lib.book.whitening_indomain import (group_folds, indomain_sweep, plot_indomain_sweep, region_vectors,
                                                   where_it_helps)
from retrieval_lib.book.report import (OFF_THE_SHELF, REPRODUCTION_HEADER, markdown_table, measured, paper_catalogue,
                                       paper_result, paper_vs_ours, reproduction_rows, uncatalogued, write_metrics)
from retrieval_lib.book.reproduce import gather_results, offtheshelf, offtheshelf_measured, offtheshelf_table
from retrieval_lib.book.paper_networks import RELEASED_FOR, released_section, reproduce_in_notebook
from retrieval_lib.book.explorer import (Explorer, ExplorerInputError, collection_from_folder, measure_redraws, show_rows,
                                         show_why, try_bad_inputs)

__all__ = [
    "start", "Book", "SCALES", "default_scale", "default_progress", "capped_sizes", "dry_run_recipe", "check_needs",
    "argmax_locations", "clipped_channels", "count_clipped", "rank_channels", "fmap_of", "top_channels",
    "implicit_correspondences", "conv_chain", "receptive_field", "cell_centers", "cell_boxes", "input_gradients",
    "mass_box",
    "live_figure", "overlay", "show_images", "show_ranked", "show_two_rankings", "show_ap_trapezoids",
    "show_gem_view", "overlay_cells", "show_argmax", "show_correspondences", "show_receptive_field",
    "show_region_levels", "show_region_macs", "show_region_map",
    "evaluate_many", "sweep_image_size", "self_similarity", "spoc_weights", "gem_poolings", "gem_contributions",
    "map_on_subset", "pair_similarity_vs_p", "aspect_crop", "fmap_size", "map_vs_L", "region_count_table",
    "region_levels",
    "show_composite_masks", "show_mask_pair", "SIZE_STUDY", "fixed_poolings", "layout_checks", "mean_contributions",
    "show_contributions", "show_heldout", "show_region_weights", "show_size_study", "choose_by_validation",
    "frozen_vectors", "paired_rows", "slot_coverage", "not_beaten_note", "rank_correlation",
    "compare", "comparison_table", "describe", "heldout_scores", "loss_change", "pool_branches", "summarize",
    "take_branches", "train_and_score",
    "WHITENING_NAMES", "comparison_rows", "evaluate_descriptors", "image_patches", "learn_whitenings",
    "mahalanobis_sq", "plot_map_vs_bytes", "plot_map_vs_dim", "show_whitened_patches", "show_whitening_2d",
    "sweep_codecs", "sweep_dims", "training_descriptors", "group_folds", "indomain_sweep", "plot_indomain_sweep",
    "region_vectors", "where_it_helps",
    "OFF_THE_SHELF", "markdown_table", "measured", "paper_result", "paper_vs_ours", "write_metrics",
    "paper_catalogue", "reproduction_rows", "REPRODUCTION_HEADER", "uncatalogued",
    "offtheshelf", "offtheshelf_table", "offtheshelf_measured", "gather_results",
    "RELEASED_FOR", "released_section", "reproduce_in_notebook",
    "Explorer", "ExplorerInputError", "collection_from_folder", "measure_redraws", "show_rows", "show_why",
    "try_bad_inputs",
]
