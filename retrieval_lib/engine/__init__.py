"""What runs models over data: device choice, batched and cached extraction, training, mining."""
from retrieval_lib.engine.device import get_device, seed_everything
from retrieval_lib.engine.extract import extract_descriptors, extract_fmaps, pool_fmaps
from retrieval_lib.engine.mining import PKMiner, TupleMiner, honest_split
from retrieval_lib.engine.objectives import BatchHardLoss, ClassificationLoss, CombinedLoss, TupleLoss
from retrieval_lib.engine.trainer import (ImageSource, MapSource, RetrievalNet, Trainer, paper_trainer, param_groups,
                                          reduced_source)
