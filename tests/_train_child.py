"""Child process of test_trainer.py: train the tiny problem; at step KILL_AT signal the parent
through a file and wait to be killed (SIGKILL, not a polite stop).

usage: python tests/_train_child.py CHECKPOINT_DIR KILL_AT SIGNAL_FILE
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

from _train_problem import build, problem  # noqa: E402

ckpt, kill_at, signal_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


def on_step(trainer, step, loss):
    if step == kill_at:
        signal_file.write_text(str(step))
        time.sleep(600)  # the parent kills us here


fmaps, labels = problem()
build(fmaps, labels, checkpoint_dir=ckpt, on_step=on_step).fit()
sys.exit(3)  # never reached when the parent kills us
