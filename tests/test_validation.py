"""engine.validation.train_with_validation: the kept head is the best epoch's (a tie goes to the trained,
later head, so the untrained head is never kept while a trained epoch validates as well), the record says
which epoch and why, a saturated validation set warns, its record reproduces each epoch, keep="last",
measures, and its errors."""
import warnings

import numpy as np
import pytest
import torch

from retrieval_lib.book.sweeps import map_on_subset
from retrieval_lib.engine import validation
from retrieval_lib.engine.extract import pool_fmaps
from retrieval_lib.engine.mining import TupleMiner
from retrieval_lib.engine.objectives import TupleLoss
from retrieval_lib.engine.sources import MapSource
from retrieval_lib.engine.validation import SaturatedValidationWarning, train_with_validation
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
    top = max(rec["val_mAP"])
    assert rec["val_mAP"][best] == top and max(e for e, v in enumerate(rec["val_mAP"]) if v == top) == best
    assert rec["saturated"] is False and f"{top:.4f}" in rec["kept_why"]
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


def _problem():
    maps, labels = _maps()
    val_maps, val_labels = _maps(n_groups=3, seed=1)
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    return MapSource(maps, labels), miner, TupleLoss("contrastive", 0.7), val_maps, val_labels


def _scripted(monkeypatch, trajectory):
    """Replace the validation mAP by ``trajectory`` (one value per epoch, 0 = before training)."""
    values = iter(trajectory)
    monkeypatch.setattr(validation, "map_by_labels", lambda *a, **k: {"mAP": next(values)})


@pytest.mark.parametrize("trajectory, kept, why", [
    ([0.5, 0.5, 0.4], 1, "tie with epoch 0 at validation mAP 0.5000 resolved towards the trained head (epoch 1)"),
    ([0.5, 0.4, 0.5], 2, "tie with epoch 0 at validation mAP 0.5000 resolved towards the trained head (epoch 2)"),
    ([0.5, 0.6, 0.6], 2, "tie with epoch 1 at validation mAP 0.6000 resolved towards the trained head (epoch 2)"),
    ([0.5, 0.5, 0.5], 2, "tie with epochs 0, 1 at validation mAP 0.5000 resolved towards the trained head (epoch 2)"),
    ([0.5, 0.7, 0.6], 1, "best validation mAP 0.7000 at epoch 1"),
    ([0.5, 0.4, 0.3], 0, "best validation mAP 0.5000 at epoch 0 (the untrained head): no trained epoch reached it"),
])
def test_a_tie_goes_to_the_trained_head_and_a_better_epoch_wins(monkeypatch, trajectory, kept, why):
    _scripted(monkeypatch, trajectory)
    source, miner, objective, val_maps, val_labels = _problem()
    layer, rec = train_with_validation(WGeM(6, p=3.0), source, miner, objective, val_maps, val_labels,
                                       epochs=len(trajectory) - 1, lr=0.05, seed=0)
    assert rec["val_mAP"] == trajectory and rec["kept_epoch"] == kept and rec["kept_why"] == why
    assert rec["saturated"] is False
    # the returned head is the kept epoch's, and training did move it (so epoch 0 is a real alternative)
    assert all(torch.equal(rec["states"][kept][k], v) for k, v in layer.state_dict().items())
    assert not torch.equal(rec["states"][0]["conv.weight"], rec["states"][-1]["conv.weight"])


@pytest.mark.parametrize("seed", range(20))
def test_the_untrained_head_is_never_kept_while_a_trained_epoch_validates_as_well(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    trajectory = list(rng.choice([0.25, 0.5, 0.75], size=4))  # coarse values: ties are common
    _scripted(monkeypatch, trajectory)
    source, miner, objective, val_maps, val_labels = _problem()
    _, rec = train_with_validation(GeM(p=3.0), source, miner, objective, val_maps, val_labels, epochs=3, lr=0.05)
    kept = rec["kept_epoch"]
    assert trajectory[kept] == max(trajectory)                      # the best validation mAP ...
    assert kept == max(e for e, v in enumerate(trajectory) if v == max(trajectory))  # ... at its latest epoch
    if max(trajectory[1:]) >= trajectory[0]:
        assert kept >= 1, f"the untrained head was kept although a trained epoch validated as well: {trajectory}"


def test_a_saturated_validation_set_warns_and_is_recorded():
    maps, labels = _maps()
    # two validation groups that any pooling separates perfectly: mAP 1 before training already
    val_maps = [torch.zeros(6, 3, 4) for _ in range(4)]
    for i, m in enumerate(val_maps):
        m[0 if i < 2 else 1] = 1.0 + 0.1 * i
    val_labels = np.array([0, 0, 1, 1])
    miner = TupleMiner(labels, n_neg=2, n_queries=8, pool_size=12, batch_size=4)
    with pytest.warns(SaturatedValidationWarning, match=r"saturated.*hold out more or harder groups.*never UKBench"):
        layer, rec = train_with_validation(GeM(p=3.0), MapSource(maps, labels), miner, TupleLoss("contrastive", 0.7),
                                           val_maps, val_labels, epochs=2, lr=0.1, seed=0)
    assert rec["saturated"] is True and rec["val_mAP"] == [1.0, 1.0, 1.0]
    # nothing to select on: the ties go to the trained head, which training did move
    assert rec["kept_epoch"] == 2 and rec["p"][-1] != rec["p"][0]
    assert all(torch.equal(rec["states"][2][k], v) for k, v in layer.state_dict().items())
    assert rec["kept_why"].startswith("tie with epochs 0, 1") and "saturated" in rec["kept_why"]


def test_an_unsaturated_validation_set_does_not_warn():
    source, miner, objective, val_maps, val_labels = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SaturatedValidationWarning)
        _, rec = train_with_validation(GeM(p=3.0), source, miner, objective, val_maps, val_labels, epochs=1, lr=0.05)
    assert rec["val_mAP"][0] < 1.0 and rec["saturated"] is False and "saturated" not in rec["kept_why"]


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
    assert rec["kept_why"].startswith("keep='last': the last epoch (3)")


def test_keep_last_keeps_the_last_epoch_even_when_an_earlier_one_validates_better(monkeypatch):
    _scripted(monkeypatch, [0.5, 0.9, 0.6, 0.4])
    source, miner, objective, val_maps, val_labels = _problem()
    layer, rec = train_with_validation(WGeM(6, p=3.0), source, miner, objective, val_maps, val_labels, epochs=3,
                                       lr=0.05, keep="last")
    assert rec["kept_epoch"] == 3 and rec["kept_why"] == "keep='last': the last epoch (3) is kept whatever its " \
                                                         "validation mAP (0.4000)"
    assert all(torch.equal(rec["states"][3][k], v) for k, v in layer.state_dict().items())


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
