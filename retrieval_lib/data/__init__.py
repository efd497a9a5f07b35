"""Images and data sets: one image opener, group sets, real171, the offline default,
revisited Oxford/Paris, CUB-200-2011, and safe downloads.

``real171()`` is imported from :mod:`retrieval_lib.data.datasets` (here the name ``real171``
is the module that downloads it)."""
from retrieval_lib.data.images import ImageError, ImageList, load_image, resize_longer_side, to_tensor
from retrieval_lib.data.datasets import (CUB200, Benchmark, GroupDataset, RevisitedDataset, cache_root, data_root,
                                         default_benchmark, download_cub, download_revisited, find_gnd, load_gnd,
                                         offline_default)
