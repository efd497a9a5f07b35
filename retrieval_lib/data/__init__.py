"""Images and data sets: one image opener, group sets, real171, the offline default,
revisited Oxford/Paris, CUB-200-2011, and safe downloads."""
from retrieval_lib.data.images import ImageError, ImageList, load_image
