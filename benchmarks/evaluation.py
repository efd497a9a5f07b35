"""Evaluation benchmark: ``compute_map`` / ``evaluate_revisited`` vs a per-query loop.

The reference is the revisited Oxford/Paris evaluation written as its authors wrote it:
one query at a time, the positions of the positives and junk images found in the
query's ranking, junk removed with a counter, AP by the trapezoid rule, P@k from the
positions. (Membership is tested with a boolean mask over the database, the fastest
plain form; ``np.isin`` is slower.) Rankings are random with revisited-style ground
truth (``easy``, ``hard``, ``junk`` per query, some queries without easy positives),
the positives and junk moved towards the top so the APs are not all near zero.

Target (issue 5): identical values; never slower than the loop.
"""
from __future__ import annotations

import numpy as np

from retrieval_lib.search.evaluate import compute_map, evaluate_revisited

from .timing import NumpyMemory, compare, fmt_mb, fmt_s, markdown_table

NAME = "evaluation"
KAPPAS = (1, 5, 10)
CASES_FULL = [(70, 6322), (1000, 100_000)]
CASES_QUICK = [(70, 6322), (200, 20_000)]


# ------------------------------------------------------------------------------ reference
def average_precision_loop(pos: np.ndarray, n_pos: int) -> float:
    """AP from the 0-based junk-free ranks of the retrieved positives (trapezoid rule)."""
    ap = 0.0
    for j, r in enumerate(pos):
        prec0 = 1.0 if r == 0 else j / r
        prec1 = (j + 1) / (r + 1)
        ap += (prec0 + prec1) / 2.0 / n_pos
    return ap


def compute_map_loop(ranks: np.ndarray, gnd: list, kappas=KAPPAS) -> tuple:
    """Per-query reference of :func:`retrieval_lib.search.evaluate.compute_map`: ``(mAP, aps, mpk, pks)``."""
    n_q, _ = ranks.shape
    n_db = int(ranks.max()) + 1
    aps = np.zeros(n_q)
    pks = np.zeros((n_q, len(kappas)))
    for q in range(n_q):
        ok = np.asarray(gnd[q]["ok"], dtype=np.int64)
        if ok.size == 0:
            aps[q] = np.nan
            pks[q] = np.nan
            continue
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        is_ok = np.zeros(n_db, bool)
        is_ok[ok] = True
        is_junk = np.zeros(n_db, bool)
        is_junk[junk] = True
        pos = np.flatnonzero(is_ok[ranks[q]])
        junk_pos = np.flatnonzero(is_junk[ranks[q]])
        k = ij = 0  # junk ranked above the current positive
        for ip in range(len(pos)):
            while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        aps[q] = average_precision_loop(pos, len(ok))
        pos1 = pos + 1
        for c, kk in enumerate(kappas):
            kq = min(int(pos1.max()), kk) if pos1.size else 0
            pks[q, c] = (pos1 <= kq).sum() / kq if kq else 0.0
    valid = ~np.isnan(aps)
    return float(aps[valid].mean()), aps, pks[valid].mean(axis=0), pks


def revisited_protocols(gnd: list) -> dict:
    """Easy / Medium / Hard ``ok``/``junk`` lists from raw ``easy``/``hard``/``junk``, per query."""
    out = {"easy": [], "medium": [], "hard": []}
    for g in gnd:
        easy, hard, junk = g["easy"], g["hard"], g["junk"]
        out["easy"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        out["medium"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        out["hard"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def evaluate_revisited_loop(ranks: np.ndarray, gnd: list, kappas=KAPPAS) -> dict:
    """Per-query reference of :func:`retrieval_lib.search.evaluate.evaluate_revisited`."""
    out = {}
    for name, g in revisited_protocols(gnd).items():
        m, _, mpk, _ = compute_map_loop(ranks, g, kappas)
        out[name] = {"mAP": m, "mP@k": {k: float(v) for k, v in zip(kappas, mpk)}}
    return out


# ------------------------------------------------------------------------------ data
def revisited_case(n_q: int, n_db: int, seed: int = 0) -> tuple:
    """Random rankings ``(n_q, n_db)`` and revisited-style ground truth.

    Per query: 1-80 easy, 1-150 hard and 5-200 junk images (disjoint); query 0 has no
    easy and query 1 no hard positives (their Easy / Hard AP is NaN). The marked images
    sit at random positions among the first ``4 x`` their number, the rest in random order.
    """
    rng = np.random.default_rng(seed)
    ranks = np.empty((n_q, n_db), dtype=np.int64)
    gnd = []
    for q in range(n_q):
        n_easy = 0 if q == 0 else int(rng.integers(1, 81))
        n_hard = 0 if q == 1 else int(rng.integers(1, 151))
        n_junk = int(rng.integers(5, 201))
        marked = rng.choice(n_db, n_easy + n_hard + n_junk, replace=False)
        gnd.append({"easy": marked[:n_easy], "hard": marked[n_easy:n_easy + n_hard],
                    "junk": marked[n_easy + n_hard:]})
        slots = rng.choice(min(n_db, 4 * len(marked)), len(marked), replace=False)
        at_slot = np.zeros(n_db, bool)
        at_slot[slots] = True
        is_marked = np.zeros(n_db, bool)
        is_marked[marked] = True
        rest = rng.permutation(np.flatnonzero(~is_marked))
        ranks[q, slots] = rng.permutation(marked)
        ranks[q, ~at_slot] = rest
    return ranks, gnd


def _max_diff(a: dict, b: dict) -> float:
    d = 0.0
    for proto in a:
        d = max(d, abs(a[proto]["mAP"] - b[proto]["mAP"]))
        for k in a[proto]["mP@k"]:
            d = max(d, abs(a[proto]["mP@k"][k] - b[proto]["mP@k"][k]))
    return d


def run(quick: bool = False, repeats: int | None = None) -> dict:
    """Run the evaluation benchmark; return a JSON-able dict with ``rows`` and ``summary``."""
    repeats = repeats or (2 if quick else 5)
    rows = []
    for n_q, n_db in (CASES_QUICK if quick else CASES_FULL):
        ranks, gnd = revisited_case(n_q, n_db)
        medium = revisited_protocols(gnd)["medium"]
        # compute_map on one protocol: per-query APs and P@k compared entry by entry
        ours_m, ref_m = compute_map(ranks, medium, KAPPAS), compute_map_loop(ranks, medium, KAPPAS)
        err_ap = float(np.nanmax(np.abs(ours_m[1] - ref_m[1])))
        err_pk = float(np.nanmax(np.abs(ours_m[3] - ref_m[3])))
        nan_same = bool(np.array_equal(np.isnan(ours_m[1]), np.isnan(ref_m[1])))
        t_map = compare(lambda: compute_map_loop(ranks, medium, KAPPAS), lambda: compute_map(ranks, medium, KAPPAS),
                        repeats=repeats, warmup=1)
        # evaluate_revisited: three protocols
        ours_r, ref_r = evaluate_revisited(ranks, gnd, KAPPAS), evaluate_revisited_loop(ranks, gnd, KAPPAS)
        err_r = _max_diff(ours_r, ref_r)
        t_rev = compare(lambda: evaluate_revisited_loop(ranks, gnd, KAPPAS),
                        lambda: evaluate_revisited(ranks, gnd, KAPPAS), repeats=repeats, warmup=1)
        with NumpyMemory() as mem:
            evaluate_revisited(ranks, gnd, KAPPAS)
        for fn, t, err in (("compute_map (Medium)", t_map, max(err_ap, err_pk)),
                           ("evaluate_revisited (E/M/H)", t_rev, err_r)):
            rows.append({
                "queries": n_q, "database": n_db, "function": fn,
                "reference_s": t["reference_s"], "ours_s": t["ours_s"], "speedup": t["speedup"],
                "max_abs_diff": err, "match": err <= 1e-12 and nan_same,
                "peak_extra_bytes": mem.peak if fn.startswith("evaluate") else None,
                "ranks_bytes": ranks.nbytes,
            })
        rows[-1]["mAP_medium"] = ours_r["medium"]["mAP"]
    summary = {
        "all_match": all(r["match"] for r in rows),
        "min_speedup": min(r["speedup"] for r in rows),
        "never_slower": all(r["speedup"] >= 1.0 for r in rows),
    }
    return {"name": NAME, "quick": quick, "repeats": repeats, "rows": rows, "summary": summary}


def to_markdown(res: dict) -> str:
    s = res["summary"]
    rows = [[f"{r['queries']} x {r['database']}", r["function"], fmt_s(r["reference_s"]), fmt_s(r["ours_s"]),
             f"{r['speedup']:.1f}x", f"{r['max_abs_diff']:.1e}",
             fmt_mb(r["peak_extra_bytes"]) if r["peak_extra_bytes"] is not None else "–"]
            for r in res["rows"]]
    return "\n".join([
        "### Evaluation: vectorised vs a per-query loop", "",
        "Full random rankings (queries x database) with revisited-style ground truth; the loop is "
        "the revisited protocol's per-query algorithm with boolean-mask membership. Peak extra: "
        f"numpy memory allocated by `evaluate_revisited` (tracemalloc) beyond the ranks themselves; "
        f"median of {res['repeats']}.", "",
        markdown_table(["rankings", "function", "per-query loop", "ours", "speedup", "max |diff|",
                        "peak extra"], rows), "",
        f"Values identical (|diff| <= 1e-12, same NaN queries): {'yes' if s['all_match'] else 'NO'}; "
        f"never slower than the loop: {'yes' if s['never_slower'] else 'NO'} "
        f"(smallest speedup {s['min_speedup']:.1f}x).",
    ])
