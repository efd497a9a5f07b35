"""retrieval_lib.engine.mining: cirtorch's tuples, P x K batches and the honest real171 split.

Vectorised mining is checked against a plain loop written the way cirtorch's
``TuplesDataset.create_epoch_tuples`` walks its ranking; the split is checked for shared
groups, shared files and shared pixels.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_lib.engine.mining import (EVAL_SUBSETS, OFFLINE_TRAIN_PHOTOS, TRAIN_SUBSETS, PKMiner, TupleMiner,
                                         hardest_negatives, honest_split, positive_pairs)
from retrieval_lib.layers.functional import l2n


# ------------------------------------------------------------------------- hard negatives
def _cirtorch_loop(Q, q_labels, P, p_labels, n_neg):
    """Per query: walk the pool by decreasing similarity, take images of a new group."""
    out = []
    S = (Q @ P.T).tolist()
    for q in range(len(S)):
        ranking = sorted(range(len(S[q])), key=lambda i: -S[q][i])
        taken, groups = [], {int(q_labels[q])}
        for i in ranking:
            if len(taken) == n_neg:
                break
            if int(p_labels[i]) not in groups:
                taken.append(i)
                groups.add(int(p_labels[i]))
        out.append(taken)
    return out


def _problem(n_q=9, n_pool=40, D=6, n_groups=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = l2n(torch.randn(n_q, D, generator=g, dtype=torch.float64))
    P = l2n(torch.randn(n_pool, D, generator=g, dtype=torch.float64))
    ql = torch.randint(0, n_groups, (n_q,), generator=g)
    pl = torch.randint(0, n_groups, (n_pool,), generator=g)
    return Q, ql, P, pl


@pytest.mark.parametrize("chunk", [256, 2])
def test_hardest_negatives_match_cirtorchs_loop(chunk):
    Q, ql, P, pl = _problem()
    got = hardest_negatives(Q, ql, P, pl, n_neg=4, chunk=chunk)
    assert got.shape == (9, 4) and got.dtype == torch.int64
    assert got.tolist() == _cirtorch_loop(Q, ql, P, pl, 4)
    # the rule itself: no negative shares the query's group, no two negatives share a group
    for q in range(9):
        labs = pl[got[q]].tolist()
        assert int(ql[q]) not in labs and len(set(labs)) == 4


def test_hardest_negatives_skip_a_group_already_taken():
    # pool images 0 and 1 are both group 5 and the two most similar: only image 0 is taken
    Q = torch.tensor([[1.0, 0.0]])
    P = l2n(torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [1.0, 0.3], [0.0, 1.0]]))
    pl = torch.tensor([5, 5, 7, 0, 8])  # image 3 is of the query's group 0
    assert hardest_negatives(Q, [0], P, pl, n_neg=3).tolist() == [[0, 2, 4]]


def test_hardest_negatives_errors():
    Q, ql, P, pl = _problem(n_groups=3)
    with pytest.raises(ValueError, match="fewer than n_neg=5"):
        hardest_negatives(Q, ql, P, pl, n_neg=5)
    with pytest.raises(ValueError, match="same D"):
        hardest_negatives(Q, ql, P[:, :3], pl, n_neg=1)
    with pytest.raises(ValueError, match="one label per row"):
        hardest_negatives(Q, ql[:3], P, pl, n_neg=1)
    with pytest.raises(ValueError, match="n_neg"):
        hardest_negatives(Q, ql, P, pl, n_neg=0)


def test_positive_pairs_match_a_loop():
    labels = [3, 1, 3, 2, 1, 3]
    q, p = positive_pairs(labels)
    want = [(a, b) for a in range(6) for b in range(6) if a != b and labels[a] == labels[b]]
    assert list(zip(q.tolist(), p.tolist())) == want
    with pytest.raises(ValueError, match="integer group ids"):
        positive_pairs([0.5, 1.5])


# ------------------------------------------------------------------------- tuple miner
def _groups_with_descriptors(n_groups=6, per=3, D=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_groups).repeat_interleave(per)
    X = l2n(torch.randn(n_groups, D, generator=g)[labels] + 0.8 * torch.randn(len(labels), D, generator=g))
    return labels, X


def test_tuple_miner_mines_by_the_current_descriptors():
    labels, X = _groups_with_descriptors()
    miner = TupleMiner(labels, n_neg=3, n_queries=7, pool_size=15, batch_size=2)
    seen = []

    def describe(idx):
        seen.append(idx.clone())
        return X[idx]

    plan = miner.plan(describe, torch.Generator().manual_seed(0))
    assert len(plan) == 3 == miner.batches_per_epoch()  # 7 queries -> 3 batches of 2, the last dropped
    tuples = torch.cat([b["images"] for b in plan])
    assert tuples.shape == (6, 5)
    # replay the draws: the same generator gives the same queries and pool
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(miner.queries), generator=g)[:7]
    pool = torch.randperm(18, generator=g)[:15]
    q, p = miner.queries[pick], miner.positives[pick]
    assert torch.equal(tuples[:, 0], q[:6]) and torch.equal(tuples[:, 1], p[:6])
    assert (labels[tuples[:, 0]] == labels[tuples[:, 1]]).all() and (tuples[:, 0] != tuples[:, 1]).all()
    want = _cirtorch_loop(X[q], labels[q], X[pool], labels[pool], 3)
    assert tuples[:, 2:].tolist() == [[int(pool[i]) for i in row] for row in want[:6]]
    assert len(seen) == 1 and set(seen[0].tolist()) == set(q.tolist()) | set(pool.tolist())  # one pass


def test_tuple_miner_is_seeded_and_refreshes_each_epoch():
    labels, X = _groups_with_descriptors(n_groups=8)
    miner = TupleMiner(labels, n_neg=2, n_queries=10, pool_size=20, batch_size=5)
    a = miner.plan(lambda i: X[i], torch.Generator().manual_seed(3))
    b = miner.plan(lambda i: X[i], torch.Generator().manual_seed(3))
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    g = torch.Generator().manual_seed(3)
    first = miner.plan(lambda i: X[i], g)
    second = miner.plan(lambda i: X[i], g)  # next epoch: new queries and pool
    assert not all(torch.equal(x["images"], y["images"]) for x, y in zip(first, second))


def test_tuple_miner_with_given_pairs_and_without_negatives():
    labels = [0, 0, 1, 1, 2, 2]
    miner = TupleMiner(labels, n_neg=0, n_queries=3, batch_size=1, queries=[0, 2, 4], positives=[1, 3, 5])
    plan = miner.plan(None, torch.Generator().manual_seed(0))
    rows = sorted(tuple(b["images"][0].tolist()) for b in plan)
    assert rows == [(0, 1), (2, 3), (4, 5)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=[0, 1, 2]), "no query/positive pair"),
    (dict(labels=[0, 0, 1, 1], queries=[0]), "both queries and positives"),
    (dict(labels=[0, 0, 1, 1], queries=[0, 1], positives=[1]), "same length"),
    (dict(labels=[0, 0, 1, 1], queries=[0], positives=[9]), r"in 0..3"),
    (dict(labels=[0, 0, 1, 1], batch_size=0), "batch_size"),
    (dict(labels=[0, 0, 1, 1], n_neg=-1), "n_neg"),
    (dict(labels=[0, 0, 1, 1], batch_size=5), "make no batch"),
    (dict(labels=[[0, 0], [1, 1]]), "1-D"),
])
def test_tuple_miner_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TupleMiner(**kwargs)


def test_tuple_miner_needs_describe_to_mine():
    with pytest.raises(ValueError, match="needs describe"):
        TupleMiner([0, 0, 1, 1], n_neg=1, batch_size=1).plan(None, torch.Generator())


# ------------------------------------------------------------------------- P x K
def test_pk_miner_batches_are_class_balanced():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 4 + [3] * 1 + [4] * 3 + [5] * 6 + [6] * 2)  # class 3: a singleton
    miner = PKMiner(labels, P=3, K=3)
    plan = miner.plan(None, torch.Generator().manual_seed(0))
    assert len(plan) == 2 == miner.batches_per_epoch()  # 6 usable classes / 3
    used = []
    for b in plan:
        idx, lab = b["images"], b["labels"]
        assert idx.shape == lab.shape == (9,)
        assert torch.equal(torch.as_tensor(labels)[idx], lab)  # labels are the images' own
        classes = lab.view(3, 3)
        assert (classes == classes[:, :1]).all()  # class-major: K adjacent images per class
        used += classes[:, 0].tolist()
        for c in classes[:, 0].tolist():
            members = idx[lab == c].tolist()
            if (labels == c).sum() >= 3:
                assert len(set(members)) == 3  # enough images: no repeats
    assert len(set(used)) == 6 and 3 not in used  # each class once per epoch, never the singleton


def test_pk_miner_errors():
    with pytest.raises(ValueError, match="fewer than P=4"):
        PKMiner([0, 0, 1, 1, 2, 2, 3], P=4, K=2)
    with pytest.raises(ValueError, match="K must be"):
        PKMiner([0, 0, 1, 1], P=2, K=1)


# ------------------------------------------------------------------------- honest split
def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fake_real171(root: Path) -> Path:
    """A real171-shaped tree: four subsets of tiny distinct images, two per group."""
    base = root / "real171"
    rng = np.random.default_rng(0)
    subsets = {}
    for s in ("wxbs", "evd", "landmarks23", "ukbench56"):
        (base / s).mkdir(parents=True)
        items = []
        for gi in range(2):
            for k in range(2):
                f = f"{s}_{gi}_{k}.png"
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(base / s / f)
                items.append([f, f"g{gi}"])  # the same group names in every subset
        subsets[s] = {"items": items}
    (base / "manifest.json").write_text(json.dumps({"subsets": subsets}))
    return root


def _check_disjoint(split):
    train_groups, test_groups = set(split.train.group_names), set(split.test.group_names)
    assert train_groups and test_groups and not train_groups & test_groups
    assert not {_sha(p) for p in split.train.database.paths} & {_sha(p) for p in split.test.database.paths}


def test_honest_split_on_a_real171_tree(tmp_path):
    split = honest_split(_fake_real171(tmp_path), with_offline=False)
    assert split.source == "real171"
    assert set(split.train.subsets.tolist()) == set(TRAIN_SUBSETS)
    assert set(split.test.subsets.tolist()) == set(EVAL_SUBSETS)
    assert len(split.train.labels) == len(split.test.labels) == 8
    _check_disjoint(split)  # group g0 of wxbs is not g0 of ukbench56: names carry the subset


def test_honest_split_adds_the_offline_photos_to_training(tmp_path):
    split = honest_split(_fake_real171(tmp_path), with_offline=True)
    assert "skimage_views" in split.train.subset_names and "skimage_views" not in split.test.subset_names
    _check_disjoint(split)


def test_honest_split_on_the_real_photos(data_root):
    if data_root is None:
        pytest.skip("real171 is not here (RETRIEVAL_DATA); the tree-shaped tests above cover the logic")
    split = honest_split(data_root, with_offline=False)
    assert split.source == "real171"
    assert set(split.test.subset_names) == {"wxbs", "evd"}
    assert len(split.test.labels) == 92 and len(split.train.labels) == 79
    _check_disjoint(split)


def test_honest_split_without_real171_splits_the_offline_default_by_photo(tmp_path):
    split = honest_split(tmp_path / "nothing-here")
    assert split.source == "offline_default"
    _check_disjoint(split)

    def photos(ds):
        return {g.split("/")[-1].rsplit("_", 1)[0] for g in ds.group_names if "distractor" not in g}

    assert photos(split.train) == set(OFFLINE_TRAIN_PHOTOS)
    assert not photos(split.train) & photos(split.test)  # both halves of a photo on one side
    assert all("distractor" not in g for g in split.train.group_names)
    assert any("distractor" in g for g in split.test.group_names)
