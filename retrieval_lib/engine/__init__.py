"""What runs models over data: device choice, batched and cached extraction, training, mining."""
from retrieval_lib.engine.device import get_device, seed_everything
from retrieval_lib.engine.extract import extract_descriptors, extract_fmaps, pool_fmaps
