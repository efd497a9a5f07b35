"""engine.validation.train_with_validation: the kept head is the best epoch's (a tie keeps the earlier),
its record reproduces each epoch, keep="last", measures, and its errors."""
import copy

import numpy as np
import pytest
import torch

from retrieval_lib.book.sweeps import map_on_subset
from retrieval_lib.engine.extract import pool_fmaps
from retrieval_lib.engine.mining import TupleMiner
from retrieval_lib.engine.objectives import TupleLoss
from retrieval_lib.engine.sources import MapSource
from retrieval_lib.engine.validation import train_with_validation
from retrieval_lib.layers.pooling import GeM, WGeM


def _maps(n_groups=4, per=3, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps, labels = [], []
    for k in range(n_groups):
        base = torch.rand(C, 3, 4, generator=g)
        for _ in range(per):
            maps.append((base + 0.5 * torch.rand(C, 3, 4, generator=g)).float())
            labels.append(k)
    return maps, np.array(labels)


def test_train_with_validation_keeps_the_best_epoch():
    maps, labels = _maps()
    val_maps, val_labels = _maps(n_groups=3, seed=1)
    layer = WGeM(6, p=3.0)
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    layer, rec = train_with_validation(layer, MapSource(maps, labels), miner, TupleLoss("contrastive", 0.7),
                                       val_maps, val_labels, epochs=4, lr=0.05, p_lr_mult=10.0, seed=0)
    assert rec["epoch"] == [0, 1, 2, 3, 4] and len(rec["val_mAP"]) == len(rec["p"]) == len(rec["loss"]) == 5
    assert rec["steps_per_epoch"] == 2 and len(rec["history"]["loss"]) == 8
    best = rec["kept_epoch"]
    assert rec["val_mAP"][best] == max(rec["val_mAP"]) and rec["val_mAP"].index(max(rec["val_mAP"])) == best
    # the returned head is the best epoch's: its validation mAP and p are the recorded ones
    X = pool_fmaps(val_maps, layer)
    assert map_on_subset(X, val_labels, np.ones(len(val_labels), bool)) == pytest.approx(rec["val_mAP"][best], abs=1e-12)
    assert float(layer.p.detach()) == pytest.approx(rec["p"][best], abs=1e-12)
    assert np.isnan(rec["loss"][0]) and all(np.isfinite(rec["loss"][1:]))
    assert np.mean(rec["history"]["loss"][:2]) == pytest.approx(rec["loss"][1])
    # every epoch's head is kept: the kept one is the returned head, and each gives its recorded validation mAP
    assert len(rec["states"]) == 5
    assert all(torch.equal(rec["states"][best][k], v) for k, v in layer.state_dict().items())
    for e, state in enumerate(rec["states"]):
        head = WGeM(6, p=3.0)
        head.load_state_dict(state)
        got = map_on_subset(pool_fmaps(val_maps, head), val_labels, np.ones(len(val_labels), bool))
        assert got == pytest.approx(rec["val_mAP"][e], abs=1e-12)
    assert not torch.equal(rec["states"][0]["conv.weight"], rec["states"][-1]["conv.weight"])  # the mask moved


def test_train_with_validation_keeps_the_untrained_head_when_nothing_beats_it():
    maps, labels = _maps()
    # two validation groups that any pooling separates perfectly: mAP 1 before training already
    val_maps = [torch.zeros(6, 3, 4) for _ in range(4)]
    for i, m in enumerate(val_maps):
        m[0 if i < 2 else 1] = 1.0 + 0.1 * i
    val_labels = np.array([0, 0, 1, 1])
    layer = GeM(p=3.0)
    start = copy.deepcopy(layer.state_dict())
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    layer, rec = train_with_validation(layer, MapSource(maps, labels), miner, TupleLoss("contrastive", 0.7),
                                       val_maps, val_labels, epochs=2, lr=0.1, seed=0)
    assert rec["val_mAP"][0] == 1.0 and rec["kept_epoch"] == 0
    assert rec["p"][-1] != rec["p"][0]  # training did move p ...
    assert torch.equal(layer.p, start["p"])  # ... but the untrained head is the one kept


def test_train_with_validation_keep_last_and_measure():
    maps, labels = _maps()
    val_maps, val_labels = _maps(n_groups=3, seed=1)
    layer = WGeM(6, p=3.0)
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    seen = []

    def measure(pool):
        seen.append(pool.conv.weight.detach().clone())
        return {"conv_norm": pool.conv.weight.norm()}

    layer, rec = train_with_validation(layer, MapSource(maps, labels), miner, TupleLoss("contrastive", 0.7),
                                       val_maps, val_labels, epochs=3, lr=0.05, keep="last", measure=measure)
    assert rec["kept_epoch"] == 3 and rec["conv_norm"][0] == 0.0 and len(rec["conv_norm"]) == 4
    assert torch.equal(layer.conv.weight.detach(), seen[-1])  # the last epoch's head is the one returned
    assert rec["conv_norm"][-1] == pytest.approx(float(seen[-1].norm()))


def test_train_with_validation_errors():
    maps, labels = _maps()
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    args = (MapSource(maps, labels), miner, TupleLoss())
    with pytest.raises(ValueError, match="one group label per map"):
        train_with_validation(GeM(), *args, maps[:3], [0, 0], epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="no validation group has two images"):
        train_with_validation(GeM(), *args, maps[:3], [0, 1, 2], epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="keep must be"):
        train_with_validation(GeM(), *args, maps[:3], [0, 0, 1], epochs=1, lr=0.1, keep="first")
