"""Evaluation: hand-worked APs, a per-query loop reference of the revisited protocol, recall, N-S."""
import numpy as np
import pytest
import torch

from retrieval_lib import metrics
from retrieval_lib.search.evaluate import (
    compute_map,
    evaluate_revisited,
    gnd_from_labels,
    map_by_labels,
    ns_score,
    recall_at_k,
    recall_from_ranks,
)


# ---------------------------------------------------------------- plain per-query reference
def _loop_ap(pos, n_pos):
    """Trapezoid AP over junk-adjusted 0-based positive ranks ``pos`` (ascending)."""
    ap = 0.0
    for j, r in enumerate(pos):
        prec0 = 1.0 if r == 0 else j / r
        prec1 = (j + 1) / (r + 1)
        ap += (prec0 + prec1) / 2.0 / n_pos
    return ap


def _loop_map(ranks, gnd, kappas):
    """One query at a time, as the revisited Oxford/Paris evaluation describes it."""
    n_q = len(gnd)
    aps = np.zeros(n_q)
    pks = np.zeros((n_q, len(kappas)))
    for q in range(n_q):
        ok = np.asarray(gnd[q]["ok"], dtype=np.int64)
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        if len(ok) == 0:
            aps[q] = np.nan
            pks[q] = np.nan
            continue
        row = list(ranks[q])
        pos = [i for i, x in enumerate(row) if x in set(ok.tolist())]  # ascending
        jpos = [i for i, x in enumerate(row) if x in set(junk.tolist())]
        adj = []
        for p in pos:
            n_junk_above = 0
            for jp in jpos:
                if jp < p:
                    n_junk_above += 1
            adj.append(p - n_junk_above)
        aps[q] = _loop_ap(adj, len(ok))
        for c, k in enumerate(kappas):
            if not adj:
                pks[q, c] = 0.0
                continue
            kq = min(max(adj) + 1, k)
            pks[q, c] = sum(1 for r in adj if r < kq) / kq
    valid = ~np.isnan(aps)
    return aps[valid].mean(), aps, pks[valid].mean(0), pks


def _random_case(rng, n_q=25, n_db=120, truncate=None, overlap=False):
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])
    if truncate:
        ranks = ranks[:, :truncate]
    gnd = []
    for q in range(n_q):
        perm = rng.permutation(n_db)
        n_e, n_h, n_j = rng.integers(0, 8, size=3)
        if q % 7 == 3:
            n_e = n_h = 0  # some queries without positives
        easy, hard, junk = perm[:n_e], perm[n_e:n_e + n_h], perm[n_e + n_h:n_e + n_h + n_j]
        if overlap and n_e and n_j:
            junk = np.concatenate([junk, easy[:1]])  # a positive that is also junk
        gnd.append({"easy": easy, "hard": hard, "junk": junk})
    return ranks, gnd


def _protocol(gnd, name):
    out = []
    for g in gnd:
        e, h, j = (np.asarray(g[k]) for k in ("easy", "hard", "junk"))
        out.append({"easy": {"ok": e, "junk": np.r_[j, h]},
                    "medium": {"ok": np.r_[e, h], "junk": j},
                    "hard": {"ok": h, "junk": np.r_[j, e]}}[name])
    return out


# ---------------------------------------------------------------- hand-worked cases
def test_hand_worked_ap_with_junk_truncation_and_empty_query():
    ranks = np.array([
        [3, 0, 7, 1, 5, 2],
        [4, 6, 0, 1, 2, 3],
        [0, 9, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 5],
    ])
    gnd = [
        # positives at positions 1, 3, 5; junk 7 at position 2 -> adjusted r = 1, 2, 4
        # AP = 1/3 * [ (0/1 + 1/2)/2 + (1/2 + 2/3)/2 + (2/4 + 3/5)/2 ]
        #    = 1/3 * [ 0.25 + 7/12 + 0.55 ] = 0.4611...
        # P@1: k_q = 1, none at r < 1 -> 0;  P@5 = P@10: k_q = min(4+1, k) = 5 -> 3/5
        {"ok": [0, 1, 2], "junk": [7]},
        # 4 at r=0 (j/r := 1): (1 + 1)/2 = 1;  0 at position 2 minus 1 junk -> r=1: (1/1 + 2/2)/2 = 1
        # AP = (1 + 1) / 2 = 1: the junk image between them is ignored
        {"ok": [4, 0], "junk": [6]},
        # ranks truncated: 5 and 8 are never retrieved and add 0
        # AP = [ (1 + 1)/2 + (1/2 + 2/3)/2 ] / 4 = (1 + 7/12) / 4 = 19/48
        # P@1 = 1/1;  P@5: k_q = min(2+1, 5) = 3 -> 2/3
        {"ok": [0, 1, 5, 8], "junk": []},
        # no positives: NaN and left out of the means
        {"ok": [], "junk": [0]},
    ]
    mAP, aps, mpk, pks = compute_map(ranks, gnd, kappas=(1, 5, 10))
    ap0 = (0.25 + 7 / 12 + 0.55) / 3
    np.testing.assert_allclose(aps[:3], [ap0, 1.0, 19 / 48])
    assert np.isnan(aps[3]) and np.isnan(pks[3]).all()
    np.testing.assert_allclose(pks[:3], [[0, 0.6, 0.6], [1, 1, 1], [1, 2 / 3, 2 / 3]])
    assert mAP == pytest.approx((ap0 + 1 + 19 / 48) / 3)
    np.testing.assert_allclose(mpk, pks[:3].mean(0))
    assert aps.dtype == np.float64 and pks.shape == (4, 3) and mpk.shape == (3,)


def test_positives_all_outside_truncated_ranks_score_zero():
    mAP, aps, mpk, pks = compute_map(np.array([[5, 6]]), [{"ok": [1, 2], "junk": [5]}], kappas=(1,))
    assert mAP == 0.0 and aps[0] == 0.0 and pks[0, 0] == 0.0


def test_missing_junk_key_means_no_junk_and_torch_ranks_accepted():
    ranks = torch.tensor([[2, 0, 1]])
    mAP, *_ = compute_map(ranks, [{"ok": [0]}])
    # 0 at r=1, j=0: (0/1 + 1/2)/2 = 0.25
    assert mAP == pytest.approx(0.25)


def test_all_queries_without_positives_gives_nan():
    mAP, aps, mpk, _ = compute_map(np.array([[0, 1]]), [{"ok": [], "junk": []}])
    assert np.isnan(mAP) and np.isnan(aps).all() and np.isnan(mpk).all()


# ---------------------------------------------------------------- against the loop reference
@pytest.mark.parametrize("truncate", [None, 30])
@pytest.mark.parametrize("protocol", ["easy", "medium", "hard"])
def test_vectorised_matches_loop_reference(truncate, protocol):
    rng = np.random.default_rng(0)
    ranks, raw = _random_case(rng, truncate=truncate)
    gnd = _protocol(raw, protocol)
    got = compute_map(ranks, gnd, kappas=(1, 5, 10))
    ref = _loop_map(ranks, gnd, (1, 5, 10))
    assert got[0] == pytest.approx(ref[0], abs=1e-12)
    np.testing.assert_allclose(got[1], ref[1], atol=1e-12)
    np.testing.assert_allclose(got[2], ref[2], atol=1e-12)
    np.testing.assert_allclose(got[3], ref[3], atol=1e-12)


def test_positive_that_is_also_junk_matches_loop():
    rng = np.random.default_rng(1)
    ranks, raw = _random_case(rng, n_q=20, n_db=60, overlap=True)
    gnd = [{"ok": g["easy"], "junk": g["junk"]} for g in raw]
    got, ref = compute_map(ranks, gnd), _loop_map(ranks, gnd, (1, 5, 10))
    np.testing.assert_allclose(got[1], ref[1], atol=1e-12)
    np.testing.assert_allclose(got[3], ref[3], atol=1e-12)


def test_chunked_inverse_table_matches_loop(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_ELEMS", 250)  # 2 queries per chunk on a 120-item database
    rng = np.random.default_rng(2)
    ranks, raw = _random_case(rng, n_q=11)
    gnd = _protocol(raw, "medium")
    np.testing.assert_allclose(compute_map(ranks, gnd)[1], _loop_map(ranks, gnd, (1, 5, 10))[1],
                               atol=1e-12)


def test_evaluate_revisited_protocol_split_hand_case():
    ranks = np.array([[3, 1, 2, 0]])
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    out = evaluate_revisited(ranks, gnd, kappas=(1, 5))
    # Easy: ok [0], junk [2, 1]: 0 at position 3 minus 2 junk -> r=1: AP = (0 + 1/2)/2 = 0.25
    #       P@5: k_q = 2 -> 1/2
    assert out["easy"]["mAP"] == pytest.approx(0.25)
    assert out["easy"]["mP@k"] == {1: 0.0, 5: pytest.approx(0.5)}
    # Medium: ok [0, 1], junk [2]: 1 -> r=1: 0.25;  0 -> 3 - 1 = 2, j=1: (1/2 + 2/3)/2 = 7/12
    #         AP = (0.25 + 7/12)/2 = 5/12;  P@5: k_q = 3 -> 2/3
    assert out["medium"]["mAP"] == pytest.approx(5 / 12)
    assert out["medium"]["mP@k"][5] == pytest.approx(2 / 3)
    # Hard: ok [1], junk [2, 0]: 1 at r=1 -> 0.25
    assert out["hard"]["mAP"] == pytest.approx(0.25)
    assert set(out) == {"easy", "medium", "hard"}


def test_evaluate_revisited_matches_loop_on_random_gnd():
    rng = np.random.default_rng(3)
    ranks, raw = _random_case(rng)
    out = evaluate_revisited(ranks, raw)
    for name in ("easy", "medium", "hard"):
        ref = _loop_map(ranks, _protocol(raw, name), (1, 5, 10))
        assert out[name]["mAP"] == pytest.approx(ref[0], abs=1e-12)
        assert list(out[name]["mP@k"].values()) == pytest.approx(list(ref[2]), abs=1e-12)


# ---------------------------------------------------------------- label-based sets
def test_gnd_from_labels():
    gnd = gnd_from_labels(np.array([7, 3, 7, 7, 3]))
    assert [g["ok"].tolist() for g in gnd] == [[2, 3], [4], [0, 3], [0, 2], [1]]
    assert [g["junk"].tolist() for g in gnd] == [[0], [1], [2], [3], [4]]
    gq = gnd_from_labels(["a", "b", "a"], query_labels=["a", "z"])
    assert gq[0]["ok"].tolist() == [0, 2] and gq[1]["ok"].tolist() == [] and gq[0]["junk"].size == 0


def test_map_by_labels_matches_compute_map():
    labels = np.array([0, 0, 1, 1, 1])
    ranks = np.array([[0, 2, 1, 3, 4], [1, 0, 2, 3, 4], [3, 2, 0, 4, 1],
                      [2, 3, 4, 0, 1], [0, 4, 1, 2, 3]])
    out = map_by_labels(ranks, labels, kappas=(1,))
    # q0: ok [1] at 2, junk self at 0 -> r=1: 0.25.  q1: ok [0] at 1, self junk at 0 -> r=0: 1
    # q2: ok [3, 4]: 3 at r=0 -> 1;  4 at 3 minus self -> r=2, j=1: (1/2 + 2/3)/2 -> (1 + 7/12)/2
    # q3: ok [2, 4] at r=0 and r=1 (self at 1 is junk, 4 at 2) -> 1
    # q4: ok [2, 3] at 3, 4 minus self (at 1) -> r=2, 3: [(0 + 1/3)/2 + (1/3 + 2/4)/2] / 2
    exp = [0.25, 1.0, (1 + 7 / 12) / 2, 1.0, (1 / 6 + 5 / 12) / 2]
    np.testing.assert_allclose(out["aps"], exp)
    assert out["mAP"] == pytest.approx(np.mean(exp))
    assert set(out) == {"mAP", "mP@k", "aps"} and list(out["mP@k"]) == [1]


def test_recall_from_ranks_hand_case_excludes_self():
    labels = np.array([0, 0, 1, 1, 2])
    ranks = np.array([[0, 2, 1, 3, 4],   # self dropped -> [2, 1, ...]: hit at 2nd
                      [1, 0, 2, 3, 4],   # hit at 1st
                      [4, 2, 0, 3, 1],   # -> [4, 0, 3, 1]: hit at 3rd
                      [3, 2, 0, 1, 4],   # hit at 1st
                      [4, 0, 1, 2, 3]])  # label 2 has no partner: never
    assert recall_from_ranks(ranks, labels, ks=(1, 2, 4)) == pytest.approx({1: 0.4, 2: 0.6, 4: 0.8})
    # keeping self (exclude_self=False) every query hits at rank 1 except those ranked below others
    got = recall_from_ranks(ranks, labels, ks=(1,), exclude_self=False)
    assert got == pytest.approx({1: 0.8})  # q2 has 4 (label 2) on top


def test_recall_with_separate_queries_and_loop():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, size=50)
    qlabels = rng.integers(0, 8, size=20)
    ranks = np.stack([rng.permutation(50) for _ in range(20)])
    got = recall_from_ranks(ranks, labels, qlabels, ks=(1, 3, 10))
    for k in (1, 3, 10):
        ref = np.mean([any(labels[ranks[q, :k]] == qlabels[q]) for q in range(20)])
        assert got[k] == pytest.approx(ref)


def test_recall_at_k_from_descriptors_matches_loop():
    g = torch.Generator().manual_seed(5)
    X = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (40,), generator=g)
    got = recall_at_k(X, X, labels, ks=(1, 2, 4))
    S = X @ X.T
    for k in (1, 2, 4):
        hits = []
        for q in range(40):
            order = [i for i in torch.argsort(S[q], descending=True).tolist() if i != q][:k]
            hits.append(any(labels[i] == labels[q] for i in order))
        assert got[k] == pytest.approx(np.mean(hits))
    # separate queries, no self-exclusion
    Q = X[:10] + 0.01
    got2 = recall_at_k(Q, X, labels[:10], labels, ks=(1,))
    top1 = torch.argmax(Q @ X.T, dim=1)
    assert got2[1] == pytest.approx(float((labels[top1] == labels[:10]).float().mean()))


def test_ns_score_hand_case():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ranks = np.array([[0, 1, 2, 3], [1, 0, 4, 5], [2, 7, 6, 5], [3, 2, 1, 0],
                      [4, 5, 6, 7], [5, 4, 0, 1], [6, 0, 1, 2], [7, 6, 5, 0]])
    # same-object counts in the top 4 (query counted): 4, 2, 1, 4, 4, 2, 1, 3 -> mean 21/8
    assert ns_score(ranks, labels) == pytest.approx(21 / 8)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    gnd = [{"ok": [0], "junk": []}]
    with pytest.raises(ValueError, match="2-D"):
        compute_map(np.array([0, 1, 2]), gnd)
    with pytest.raises(ValueError, match="gnd has 2 entries but ranks has 1"):
        compute_map(np.array([[0, 1]]), gnd * 2)
    with pytest.raises(TypeError, match="integer"):
        compute_map(np.array([[0.0, 1.0]]), gnd)
    with pytest.raises(ValueError, match="negative"):
        compute_map(np.array([[0, -1]]), gnd)
    with pytest.raises(KeyError, match="'ok'"):
        compute_map(np.array([[0, 1]]), [{"junk": []}])
    with pytest.raises(ValueError, match="kappas"):
        compute_map(np.array([[0, 1]]), gnd, kappas=(0,))
    with pytest.raises(KeyError, match="'easy', 'hard' and 'junk'"):
        evaluate_revisited(np.array([[0, 1]]), gnd)
    with pytest.raises(ValueError, match="retrieve more"):
        recall_from_ranks(np.array([[0, 1]]), [0, 0], ks=(2,))
    with pytest.raises(ValueError, match="top 4"):
        ns_score(np.array([[0, 1, 2]]), [0, 0, 0])
    with pytest.raises(ValueError, match="ranks has 2 rows"):
        map_by_labels(np.array([[0, 1], [1, 0]]), [0, 0, 1])
    with pytest.raises(TypeError, match=r"gnd\[0\] must be a dict"):
        compute_map(np.array([[0, 1]]), [[0]])
    with pytest.raises(ValueError, match="negative database indices"):
        compute_map(np.array([[0, 1]]), [{"ok": [-1]}])
    with pytest.raises(ValueError, match="query_labels has 1 entries but ranks has 2 rows"):
        recall_from_ranks(np.array([[0, 1], [1, 0]]), [0, 1], query_labels=[0], ks=(1,))
    with pytest.raises(ValueError, match="only 2 labels"):
        recall_from_ranks(np.array([[0, 5]]), [0, 1], query_labels=[0], ks=(1,))
    with pytest.raises(ValueError, match="pass query_labels"):
        recall_from_ranks(np.array([[0, 1]] * 3), [0, 1], ks=(1,))
    with pytest.raises(ValueError, match="q_labels .* and x_labels .* differ"):
        recall_at_k(torch.eye(3), torch.eye(3), [0, 1, 2], [0, 1], ks=(1,), exclude_self=True)
    with pytest.raises(ValueError, match="every query must be"):
        ns_score(np.zeros((3, 4), dtype=int), [0, 0])
    with pytest.raises(ValueError, match="1-D"):
        gnd_from_labels(np.zeros((2, 2)))


# ---------------------------------------------------------------- recall_at_k: NaN, inf, empty
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_recall_at_k_refuses_non_finite_descriptors(value):
    g = torch.Generator().manual_seed(6)
    X = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (20,), generator=g)
    bad = X.clone()
    bad[4, 0] = value
    with pytest.raises(ValueError, match=r"recall_at_k: X contains NaN or inf values: 1 row\(s\) .*rows 4\)"):
        recall_at_k(X[:5], bad, labels[:5], labels)
    with pytest.raises(ValueError, match=r"recall_at_k: Q contains NaN or inf values"):
        recall_at_k(bad, X, labels, labels)
    with pytest.raises(ValueError, match=r"recall_at_k: Q contains NaN or inf values"):
        recall_at_k(bad, bad, labels)  # the self-query form


def test_recall_at_k_refuses_empty_inputs_and_mismatched_labels():
    X = torch.eye(4)
    with pytest.raises(ValueError, match=r"recall_at_k: Q has 0 descriptor\(s\).*pass at least one"):
        recall_at_k(X[:0], X, [], [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"recall_at_k: X has 0 descriptor\(s\)"):
        recall_at_k(X, X[:0], [0, 1, 2, 3], [])
    with pytest.raises(ValueError, match="recall_at_k: ks is empty"):
        recall_at_k(X, X, [0, 0, 1, 1], ks=())
    with pytest.raises(ValueError, match="recall_at_k: q_labels has 3 entries but Q has 4 rows"):
        recall_at_k(X, X, [0, 0, 1], exclude_self=False)
    with pytest.raises(ValueError, match=r"recall_at_k: x_labels has 2 entries but X has 4 rows"):
        recall_at_k(X[:2], X, [0, 1], [0, 1])
    with pytest.raises(ValueError, match=r"x_labels=None \(the queries' labels\) has 2 entries but X has 4"):
        recall_at_k(X[:2], X, [0, 1])
