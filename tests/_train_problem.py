"""A tiny, seeded training problem shared by test_trainer.py and its child processes.

Groups of feature maps share one strong spot per channel on unrelated backgrounds, so a
head (wGeM + an FC whitening) can learn to match them. Maps come in two sizes, so batches
mix sizes. Everything is seeded: two builds give bit-identical runs.
"""
import numpy as np
import torch
from torch import nn

from retrieval_lib.engine.mining import TupleMiner
from retrieval_lib.engine.objectives import TupleLoss
from retrieval_lib.engine.sources import MapSource
from retrieval_lib.engine.trainer import Trainer
from retrieval_lib.models.retrieval_net import RetrievalNet
from retrieval_lib.layers.pooling import WGeM

C = 8


def problem(dtype=torch.float32, seed=0, groups=6, per=3):
    g = torch.Generator().manual_seed(seed)
    fmaps, labels = [], []
    for grp in range(groups):
        peak = torch.rand(C, generator=g, dtype=dtype) * 5 + 1
        for k in range(per):
            H, W = (4, 5) if k % 2 else (5, 4)
            x = torch.rand(C, H, W, generator=g, dtype=dtype) * 2  # unrelated background
            pos = torch.randint(0, H * W, (C,), generator=g)
            x.view(C, -1)[torch.arange(C), pos] = peak
            fmaps.append(x)
            labels.append(grp)
    return fmaps, np.array(labels)


def model(dtype=torch.float32):
    torch.manual_seed(0)  # the whitening layer's initial weights
    net = RetrievalNet(WGeM(C, p=2.0), whiten=nn.Linear(C, C)).to(dtype)
    # a softmax ignores a constant shift, so the attention conv's bias gets only rounding noise
    # as gradient, which Adam would blow up to full steps: freeze it to compare runs
    net.pooling.conv.bias.requires_grad_(False)
    return net


def build(fmaps, labels, checkpoint_dir=None, epochs=3, checkpoint_every=2, batch_size=2, n_queries=6,
          dtype=torch.float32, **kw):
    """3 batches of 2 tuples (q, p, n1, n2) per epoch, Adam, cirtorch's exponential schedule."""
    miner = TupleMiner(labels, n_neg=2, n_queries=n_queries, pool_size=len(labels), batch_size=batch_size)
    settings = dict(optimizer="adam", lr=0.01, weight_decay=1e-4, schedule="exponential", device="cpu", seed=0,
                    user_config={"problem": "tiny"}, progress=False)
    settings.update(kw)
    return Trainer(model(dtype), TupleLoss("contrastive", margin=0.7), miner, MapSource(fmaps, labels),
                   epochs=epochs, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, **settings)
