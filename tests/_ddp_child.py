"""One process of the 2-process DistributedDataParallel test (run by torchrun, gloo on CPU).

usage: torchrun --standalone --nproc_per_node=2 tests/_ddp_child.py OUT_DIR
Each rank trains the tiny problem (float64, a global batch of 4 tuples: 2 per process) and
saves its weights and loss history to OUT_DIR/rank<r>.pt.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

from _train_problem import build, problem  # noqa: E402

out = Path(sys.argv[1])
fmaps, labels = problem(dtype=torch.float64)
trainer = build(fmaps, labels, checkpoint_dir=out / "ckpt", epochs=2, batch_size=4, n_queries=8,
                checkpoint_every=1, dtype=torch.float64)
seen = []  # the tuples this process computed its loss on, per step
objective = trainer.objective


def counting(outputs, batch):
    seen.append(batch["images"].tolist())
    return objective(outputs, batch)


trainer.objective = counting
history = trainer.fit()
torch.save({"state": trainer.model.state_dict(), "loss": history["loss"], "world": trainer.world_size,
            "tuples": seen}, out / f"rank{os.environ['RANK']}.pt")
