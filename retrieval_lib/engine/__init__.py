"""What runs models over data: device choice, batched and cached extraction, training, mining."""
from retrieval_lib.engine.device import get_device, seed_everything
from retrieval_lib.engine.extract import extract_descriptors, extract_fmaps, pool_fmaps
from retrieval_lib.engine.mining import PKMiner, TupleMiner, honest_split
from retrieval_lib.engine.objectives import (BatchHardLoss, BranchBatchHardLoss, ClassificationLoss, CombinedLoss,
                                             RankLoss, TupleLoss)
from retrieval_lib.engine.optim import SCHEDULES, StepSchedule, param_groups
from retrieval_lib.engine.recipes import RECIPES, cgd_trainer, paper_trainer, reduced_source
from retrieval_lib.engine.sources import CropSource, ImageSource, MapSource
from retrieval_lib.engine.trainer import Trainer, TrainerConfig
from retrieval_lib.engine.validation import train_with_validation
