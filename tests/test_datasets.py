"""Benchmarks: group datasets (folders, manifests, real171, offline default), revisited
Oxford/Paris on a stand-in tree, CUB-200 on a stand-in archive served over loopback HTTP;
what each says is right for a query (relevance, ground truth, top results, per-query AP)
and the metric it leads with (headline_key), against plain loops over labels and gnd."""
import hashlib
import io
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _fakes import ap_loop as _ap_loop
from _http import Route, serve
from _http import tgz as _tgz
from retrieval_lib.data import datasets as ds
from retrieval_lib.data import cub, revisited
from retrieval_lib.data.datasets import (CUB200, GroupDataset, RevisitedDataset, cache_root, data_root,
                                    default_benchmark, download_cub, download_revisited, load_gnd,
                                    offline_default, real171)
from retrieval_lib.data.download import ChecksumError
from retrieval_lib.search.evaluate import evaluate_revisited, query_aps, revisited_protocol


# ------------------------------------------------------------------ plain-loop references
def _self_first_ranks(n, seed=0):
    """Ranks from a random symmetric similarity, every image first in its own row."""
    rng = np.random.default_rng(seed)
    S = rng.random((n, n))
    S = S + S.T
    np.fill_diagonal(S, 10.0)
    return np.argsort(-S, axis=1, kind="stable")


def _perfect_group_ranks(labels):
    n = len(labels)
    same = (labels[:, None] == labels[None, :]).astype(float) + 2 * np.eye(n)
    return np.argsort(-same, axis=1, kind="stable")


def _jpeg(path, size=(48, 40), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)


# ------------------------------------------------------------------ environment helpers
def test_data_root_and_cache_root_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRIEVAL_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.setenv("RETRIEVAL_DATA", "")
    assert data_root() is None
    monkeypatch.delenv("RETRIEVAL_DATA")
    assert data_root() is None
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("RETRIEVAL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "retrieval_lib"


# ------------------------------------------------------------------ group datasets
def _folder_tree(root):
    for g, n in (("bridge", 3), ("cat", 2), ("lonely", 1)):
        for k in range(n):
            _jpeg(root / g / f"{g}{k}.jpg", colour=(40 * k, 100, 200))
    (root / "cat" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    _jpeg(root / ".hidden" / "x.jpg")


def test_from_folder_groups_and_errors(tmp_path):
    _folder_tree(tmp_path / "photos")
    d = GroupDataset.from_folder(tmp_path / "photos")
    assert d.name == "photos" and d.group_names == ["bridge", "cat", "lonely"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 2] and d.subsets is None and d.queries is None
    assert [Path(p).name for p in d.database.paths] == ["bridge0.jpg", "bridge1.jpg", "bridge2.jpg",
                                                      "cat0.jpg", "cat1.jpg", "lonely0.jpg"]
    assert d.database[3].size == (48, 40)
    assert "6 images in 3 groups (1 single-image distractor groups)" in d.summary()

    with pytest.raises(FileNotFoundError, match="no folder"):
        GroupDataset.from_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "g").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        GroupDataset.from_folder(tmp_path / "empty")
    _jpeg(tmp_path / "photos" / "loose.jpg")
    with pytest.raises(ValueError, match="loose.jpg.*sub-folder named after its group"):
        GroupDataset.from_folder(tmp_path / "photos")


def _manifest_tree(root):
    """Two subsets; 'same' is a group name used in both (must become two groups)."""
    items_a = [["a0.jpg", "same"], ["a1.jpg", "same"], ["a2.jpg", "other"], ["top.jpg", "other"]]
    items_b = [["b0.jpg", "same"], ["b1.jpg", "same"], ["b2.jpg", "solo"]]
    for f, _ in items_a[:3]:
        _jpeg(root / "A" / f)
    _jpeg(root / "top.jpg")  # relative to the manifest's folder, not the subset folder
    for f, _ in items_b:
        _jpeg(root / "B" / f)
    doc = {"subsets": {"A": {"items": items_a, "source": "test"}, "B": {"items": items_b}}}
    (root / "manifest.json").write_text(json.dumps(doc))
    return root / "manifest.json"


def test_from_manifest_resolves_paths_and_makes_groups_unique(tmp_path):
    m = _manifest_tree(tmp_path / "set")
    d = GroupDataset.from_manifest(m)
    assert d.name == "set" and d.subset_names == ["A", "B"]
    assert d.group_names == ["A/same", "A/other", "B/same", "B/solo"]
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert d.subsets.tolist() == ["A"] * 4 + ["B"] * 3
    assert d.database.paths[3] == str(tmp_path / "set" / "top.jpg")
    assert d.database.paths[4] == str(tmp_path / "set" / "B" / "b0.jpg")
    only_b = GroupDataset.from_manifest(m, subsets=["B"])
    assert len(only_b.database) == 3 and only_b.group_names == ["B/same", "B/solo"]


def test_from_manifest_errors(tmp_path):
    m = _manifest_tree(tmp_path / "set")
    with pytest.raises(ValueError, match=r"unknown subset\(s\) \['C'\].*\['A', 'B'\]"):
        GroupDataset.from_manifest(m, subsets=["B", "C"])
    with pytest.raises(FileNotFoundError, match="no manifest"):
        GroupDataset.from_manifest(tmp_path / "none.json")
    os.remove(tmp_path / "set" / "B" / "b1.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed .* missing: \['B/b1.jpg'\]"):
        GroupDataset.from_manifest(m)
    bad = tmp_path / "bad.json"
    for text, msg in (("{not json", "not valid JSON"),
                      ('{"items": []}', "has no 'subsets'"),
                      ('{"subsets": {"A": {}}}', "has no 'items' list"),
                      ('{"subsets": {"A": {"items": [["x.jpg"]]}}}', r"item 0 of subset 'A'.*\[file, group\]")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            GroupDataset.from_manifest(bad)
    with pytest.raises(ValueError, match="3 paths but 2 group labels"):
        GroupDataset(["a", "b", "c"], ["x", "y"])


def test_group_evaluate_matches_plain_loops(tmp_path):
    m = _manifest_tree(tmp_path / "set")
    d = GroupDataset.from_manifest(m)
    lab, n = d.labels, 7
    for seed in range(3):
        R = _self_first_ranks(n, seed)
        out = d.evaluate(R)
        aps = [_ap_loop(R[q].tolist(), {i for i in range(n) if lab[i] == lab[q] and i != q}, {q})
               for q in range(n)]
        assert np.isnan(aps[6])  # B/solo has no positives: left out
        assert out["mAP"] == pytest.approx(np.nanmean(aps), abs=1e-12)
        assert out["mAP/A"] == pytest.approx(np.mean(aps[:4]), abs=1e-12)
        assert out["mAP/B"] == pytest.approx(np.nanmean(aps[4:]), abs=1e-12)
        first_other = [next(i for i in R[q] if i != q) for q in range(n)]
        r1 = np.mean([lab[first_other[q]] == lab[q] for q in range(6)])  # the 6 with positives
        assert out["R@1"] == pytest.approx(r1) and out["mP@1"] == pytest.approx(r1)
        assert "N-S/ukbench56" not in out
        assert all(isinstance(v, float) for v in out.values())
    perfect = d.evaluate(_perfect_group_ranks(lab))
    assert perfect["mAP"] == perfect["R@1"] == perfect["mAP/A"] == 1.0
    assert perfect["mP@5"] == 1.0  # P@k is capped by the number of positives (protocol rule)
    with pytest.raises(ValueError, match=r"ranks has shape \(6, 7\).*\(7, up to 7\)"):
        d.evaluate(R[:6])


def test_ukbench_ns_score_over_all_images(tmp_path):
    root = tmp_path / "set"
    items = {"other": [["o0.jpg", "x"], ["o1.jpg", "x"]],
             "ukbench56": [[f"u{i}.jpg", f"obj{i // 4}"] for i in range(8)]}
    for s, its in items.items():
        for f, _ in its:
            _jpeg(root / s / f)
    (root / "manifest.json").write_text(json.dumps({"subsets": {s: {"items": v} for s, v in items.items()}}))
    d = GroupDataset.from_manifest(root / "manifest.json")
    lab = d.labels
    for seed in range(3):
        R = _self_first_ranks(10, seed)
        ns = np.mean([sum(lab[i] == lab[q] for i in R[q, :4]) for q in range(2, 10)])
        assert d.evaluate(R)["N-S/ukbench56"] == pytest.approx(ns)
    assert d.evaluate(_perfect_group_ranks(lab))["N-S/ukbench56"] == 4.0


def test_group_subset_keeps_whole_groups_round_robin(tmp_path):
    d = GroupDataset.from_manifest(_manifest_tree(tmp_path / "set"))
    s = d.subset(4)
    # round robin: A/same (2), B/same (2) fit; A/other (2) would exceed 4
    assert s.group_names == ["A/same", "B/same"] and len(s.database) == 4
    assert s.subsets.tolist() == ["A", "A", "B", "B"] and s.name == "set-sub4"
    assert s.evaluate(_perfect_group_ranks(s.labels))["mAP"] == 1.0
    assert d.subset(100) is d
    with pytest.raises(ValueError, match="no whole group"):
        d.subset(0)


def test_real171(data_root):
    if data_root is None or not (data_root / "real171").is_dir():
        pytest.skip("real171 is not available here (RETRIEVAL_DATA unset, no ../shared/data)")
    d = real171()
    assert d.name == "real171" and len(d.database) == 171 and len(d.group_names) == 65
    counts = {s: int((d.subsets == s).sum()) for s in d.subset_names}
    assert counts == {"ukbench56": 56, "wxbs": 62, "evd": 30, "landmarks23": 23}
    assert all(Path(p).is_file() for p in d.database.paths)
    assert len({g.split("/")[0] for g in d.group_names}) == 4
    R = _self_first_ranks(171)
    out = d.evaluate(R)
    assert set(out) == {"mAP", "mP@1", "mP@5", "R@1", "mAP/ukbench56", "mAP/wxbs", "mAP/evd",
                        "mAP/landmarks23", "N-S/ukbench56"}
    rows = np.flatnonzero(d.subsets == "ukbench56")
    ns = np.mean([sum(d.labels[i] == d.labels[q] for i in R[q, :4]) for q in rows])
    assert out["N-S/ukbench56"] == pytest.approx(ns)
    perfect = d.evaluate(_perfect_group_ranks(d.labels))
    assert perfect["mAP"] == 1.0 and perfect["N-S/ukbench56"] == 4.0
    assert default_benchmark().name == "real171"
    small = d.subset(40)
    assert len(small.database) <= 40 and set(small.subset_names) == set(d.subset_names)


def test_real171_and_default_benchmark_without_data(monkeypatch, tmp_path):
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="RETRIEVAL_DATA"):
        real171()
    with pytest.raises(FileNotFoundError, match="real171 not found"):
        real171(tmp_path)
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    assert default_benchmark().name == "offline_default"
    monkeypatch.setenv("RETRIEVAL_DATA", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="no real171"):
        assert default_benchmark().name == "offline_default"


# ------------------------------------------------------------------ offline default
def _pixels(d):
    return [np.asarray(d.database[i]) for i in range(len(d.database))]


def test_offline_default_structure_determinism_and_reuse(tmp_path):
    t0 = time.perf_counter()
    a = offline_default(cache_dir=tmp_path / "one")
    build_s = time.perf_counter() - t0
    assert build_s < 10, f"building the offline default took {build_s:.1f} s"
    assert len(a.database) == 60 and len(a.group_names) == 18
    sizes = np.bincount(a.labels)
    assert sorted(sizes.tolist()) == [1] * 4 + [4] * 14
    assert a.group_names[:2] == ["skimage_views/chelsea_a", "skimage_views/chelsea_b"]
    assert a.subset_names == ["skimage_views"]
    assert all(g.startswith("skimage_views/distractor_") for g, s in zip(a.group_names, sizes) if s == 1)
    folder = tmp_path / "one" / f"offline_default_v{ds.OFFLINE_VERSION}" / "seed0-views3-distractors4"
    assert sorted(os.listdir(folder)) == ["manifest.json", "skimage_views"]
    assert sorted(os.listdir(folder.parent)) == [folder.name]  # no temp left
    imgs = _pixels(a)
    assert all(320 <= max(im.shape[:2]) <= 512 for im in imgs)

    b = offline_default(cache_dir=tmp_path / "two")
    assert all(np.array_equal(x, y) for x, y in zip(imgs, _pixels(b)))
    assert a.labels.tolist() == b.labels.tolist()
    c = offline_default(cache_dir=tmp_path / "two", seed=1, n_views=2, n_distractors=3)
    assert len(c.database) == 14 * 3 + 3
    assert not np.array_equal(np.asarray(c.database[1]), imgs[1])

    # reuse: nothing rewritten
    first = Path(a.database.paths[5])
    mtime = first.stat().st_mtime_ns
    again = offline_default(cache_dir=tmp_path / "one")
    assert again.database.paths == a.database.paths and first.stat().st_mtime_ns == mtime
    # a damaged cache is rebuilt
    first.unlink()
    rebuilt = offline_default(cache_dir=tmp_path / "one")
    assert np.array_equal(np.asarray(rebuilt.database[5]), imgs[5])
    # the default location follows RETRIEVAL_CACHE (set per session by conftest)
    assert offline_default().database.paths[0].startswith(str(cache_root()))


def test_offline_default_views_are_retrievable(tmp_path):
    """A colour histogram already finds the views far above chance: the labels are right."""
    from retrieval_lib.search.evaluate import map_by_labels

    d = offline_default(cache_dir=tmp_path)
    X = []
    for im in _pixels(d):
        h = np.histogramdd(im.reshape(-1, 3) // 64, bins=(4, 4, 4), range=[(0, 4)] * 3)[0].ravel()
        X.append(h / np.linalg.norm(h))
    X = np.array(X)
    m = map_by_labels(np.argsort(-X @ X.T, axis=1), d.labels)["mAP"]
    assert m > 0.3  # measured 0.44; random ranks give about 0.08


def test_offline_default_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_distractors"):
        offline_default(cache_dir=tmp_path, n_distractors=9)
    with pytest.raises(ValueError, match="n_views"):
        offline_default(cache_dir=tmp_path, n_views=0)


# ------------------------------------------------------------------ revisited Oxford/Paris
def _gnd_doc(data_root, name="roxford5k"):
    """The real ground truth when the shared data is here, else a synthetic one like it."""
    if data_root is not None and (data_root / "revisited_gnd" / f"gnd_{name}.pkl").is_file():
        return load_gnd(data_root / "revisited_gnd" / f"gnd_{name}.pkl")
    rng = np.random.default_rng(0)
    imlist = [f"{name}_db_{i:04d}" for i in range(400)]
    gnd = []
    for q in range(12):
        pick = rng.permutation(400)[:30].tolist()
        gnd.append({"bbx": [10.5 + q, 20.0, 300.0, 260.4], "easy": pick[:8], "hard": pick[8:14] if q % 5 else [],
                    "junk": pick[14:20]})
    return {"imlist": imlist, "qimlist": [f"{name}_q_{q:02d}" for q in range(12)], "gnd": gnd}


def _revisited_tree(root, doc, name="roxford5k"):
    """Stand-in images: db names hard-linked to 4 tiny JPEGs; queries red inside their box."""
    jpg = root / name / "jpg"
    jpg.mkdir(parents=True)
    seeds = []
    for k in range(4):
        _jpeg(root / f"seed{k}.jpg", colour=(60 * k, 40, 90))
        seeds.append(root / f"seed{k}.jpg")
    for i, n in enumerate(doc["imlist"]):
        os.link(seeds[i % 4], jpg / f"{n}.jpg")
    for n, g in zip(doc["qimlist"], doc["gnd"]):
        x0, y0, x1, y1 = g["bbx"]
        a = np.zeros((int(y1) + 20, int(x1) + 20, 3), np.uint8)
        a[:] = (0, 0, 255)
        a[round(y0):round(y1), round(x0):round(x1)] = (255, 0, 0)
        Image.fromarray(a).save(jpg / f"{n}.jpg", quality=95)
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(doc, f)
    return jpg


def _perfect_revisited_ranks(gnd, n_db):
    rows = []
    for g in gnd:
        top = list(dict.fromkeys(list(g["easy"]) + list(g["hard"])))
        rows.append(top + [i for i in range(n_db) if i not in set(top)])
    return np.array(rows)


def test_revisited_end_to_end_on_stand_in_tree(tmp_path, data_root):
    doc = _gnd_doc(data_root)
    _revisited_tree(tmp_path, doc)
    d = RevisitedDataset("roxford5k", tmp_path)
    assert len(d.database) == len(doc["imlist"]) and len(d.queries) == len(doc["qimlist"])
    assert d.queries.boxes[0] == tuple(float(v) for v in doc["gnd"][0]["bbx"])
    q = np.asarray(d.queries[0]).astype(int)  # cropped to its box: all red
    assert q[..., 0].mean() > 230 and q[..., 2].mean() < 25
    assert d.database[1].size == (48, 40)

    n_db = len(d.database)
    perfect = d.evaluate(_perfect_revisited_ranks(d.gnd, n_db))
    assert [perfect[f"mAP/{p}"] for p in ("easy", "medium", "hard")] == pytest.approx([1, 1, 1])
    assert perfect["mP@10/medium"] == pytest.approx(1.0)
    # a stand-in extraction: random descriptors, ranks by inner product
    rng = np.random.default_rng(0)
    X, Q = rng.standard_normal((n_db, 8)), rng.standard_normal((len(d.queries), 8))
    R = np.argsort(-Q @ X.T, axis=1)
    out = d.evaluate(R)
    ref = evaluate_revisited(R, d.gnd)
    assert set(out) == {f"{m}/{p}" for m in ("mAP", "mP@1", "mP@5", "mP@10") for p in ("easy", "medium", "hard")}
    assert out["mAP/medium"] == ref["medium"]["mAP"] and out["mP@5/hard"] == ref["hard"]["mP@k"][5]
    assert out["mAP/medium"] < 0.2
    # medium AP of query 0 by the plain loop
    g = d.gnd[0]
    ap0 = _ap_loop(R[0].tolist(), set(g["easy"]) | set(g["hard"]), set(g["junk"]))
    assert evaluate_revisited(R[:1], d.gnd[:1])["medium"]["mAP"] == pytest.approx(ap0)

    s = d.subset(200)
    assert len(s.database) == 200 and len(s.queries) == len(d.queries)
    assert s.evaluate(_perfect_revisited_ranks(s.gnd, 200))["mAP/medium"] == pytest.approx(1.0)
    kept = {s.imlist[i] for g in s.gnd for i in g["easy"]}
    assert kept <= set(d.imlist) and s.imlist == sorted(s.imlist, key=d.imlist.index)
    assert "queries cropped" in d.summary()


def test_revisited_errors(tmp_path, monkeypatch):
    doc = _gnd_doc(None)
    jpg = _revisited_tree(tmp_path, doc)
    with pytest.raises(ValueError, match="unknown revisited dataset"):
        RevisitedDataset("oxford105k", tmp_path)
    with pytest.raises(FileNotFoundError, match="download_revisited"):
        RevisitedDataset("rparis6k", tmp_path)  # no gnd
    os.remove(jpg / f"{doc['imlist'][7]}.jpg")
    with pytest.raises(FileNotFoundError, match=rf"1 of 412 images .*{doc['imlist'][7]}\.jpg"):
        RevisitedDataset("roxford5k", tmp_path)
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="RETRIEVAL_DATA"):
        RevisitedDataset("roxford5k")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_load_gnd_never_runs_code(tmp_path):
    target = tmp_path / "pwned"
    p = tmp_path / "gnd_evil.pkl"
    p.write_bytes(pickle.dumps({"imlist": [_Evil(str(target))], "qimlist": [], "gnd": []}))
    with pytest.raises(ValueError, match="refusing to load posix.mkdir|refusing to load os.mkdir"):
        load_gnd(p)
    assert not target.exists()
    p.write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(ValueError, match="lacks the revisited keys"):
        load_gnd(p)
    p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a plain revisited"):
        load_gnd(p)




def _jpeg_bytes(colour=(10, 200, 10), size=(40, 36)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def server():
    srv = serve({})
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_revisited_from_loopback(tmp_path, server, monkeypatch):
    doc = {"imlist": [f"paris_a_{i}" for i in range(5)] + [f"paris_b_{i}" for i in range(4)],
           "qimlist": ["paris_a_q"],
           "gnd": [{"bbx": [0, 0, 30, 30], "easy": [0, 1], "hard": [5], "junk": [2]}]}
    gnd_bytes = pickle.dumps(doc)
    img = _jpeg_bytes()
    part1 = _tgz({f"paris/a/{n}.jpg": img for n in doc["imlist"][:5] + ["paris_a_q"]})
    part2 = _tgz({f"paris/b/{n}.jpg": img for n in doc["imlist"][5:]})
    server.routes.update({"/gnd_rparis6k.pkl": Route(gnd_bytes), "/p1.tgz": Route(part1),
                          "/p2.tgz": Route(part2), "/evil.pkl": Route(gnd_bytes + b"x")})
    monkeypatch.setattr(revisited, "GND_URL", server.url("/gnd_{name}.pkl"))
    monkeypatch.setitem(ds.GND_SHA256, "rparis6k", hashlib.sha256(gnd_bytes).hexdigest())
    monkeypatch.setitem(ds.IMAGE_URLS, "rparis6k", [server.url("/p1.tgz"), server.url("/p2.tgz")])

    base = download_revisited("rparis6k", tmp_path, progress=False)
    assert base == tmp_path / "rparis6k"
    assert sorted(os.listdir(base)) == ["gnd_rparis6k.pkl", "jpg"]  # archives removed
    assert len(os.listdir(base / "jpg")) == 10  # flattened from paris/<landmark>/
    d = RevisitedDataset("rparis6k", tmp_path)
    assert d.evaluate(_perfect_revisited_ranks(d.gnd, 9))["mAP/medium"] == pytest.approx(1.0)
    n = len(server.log)
    download_revisited("rparis6k", tmp_path, progress=False)
    assert len(server.log) == n  # everything present and verified: no request

    # a ground-truth file whose checksum differs is never kept (hence never unpickled)
    monkeypatch.setattr(revisited, "GND_URL", server.url("/evil.pkl"))
    with pytest.raises(ChecksumError, match="sha256"):
        download_revisited("rparis6k", tmp_path / "other", progress=False)
    assert os.listdir(tmp_path / "other" / "rparis6k") == []


def test_real_gnd_checksums_are_the_constants(data_root):
    if data_root is None or not (data_root / "revisited_gnd").is_dir():
        pytest.skip("the revisited ground truth is not available here")
    from retrieval_lib.data.download import file_hash

    for name in ds.REVISITED:
        assert file_hash(data_root / "revisited_gnd" / f"gnd_{name}.pkl") == ds.GND_SHA256[name]


# ------------------------------------------------------------------ CUB-200-2011
def _cub_files(classes=(1, 2, 101, 102, 103), per_class=3):
    files, images, labels, boxes = {}, [], [], []
    k = 0
    for c in classes:
        for j in range(per_class):
            k += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{j}.jpg"
            files[f"CUB_200_2011/images/{rel}"] = _jpeg_bytes((c, 2 * j, 50), size=(64, 48))
            images.append(f"{k} {rel}")
            labels.append(f"{k} {c}")
            boxes.append(f"{k} 4.0 6.0 40.0 36.0")
    files["CUB_200_2011/images.txt"] = "\n".join(images).encode()
    files["CUB_200_2011/image_class_labels.txt"] = "\n".join(labels).encode()
    files["CUB_200_2011/bounding_boxes.txt"] = "\n".join(boxes).encode()
    files["CUB_200_2011/classes.txt"] = "\n".join(f"{c} {c:03d}.Bird_{c}" for c in classes).encode()
    files["attributes.txt"] = b"1 has_bill_shape::dagger\n"
    return files


def test_cub200_download_splits_and_recall(tmp_path, server, monkeypatch):
    arc = _tgz(_cub_files())
    server.routes["/CUB_200_2011.tgz"] = Route(arc)
    monkeypatch.setattr(cub, "CUB_URL", server.url("/CUB_200_2011.tgz"))
    monkeypatch.setattr(cub, "CUB_MD5", hashlib.md5(arc).hexdigest())
    base = download_cub(tmp_path, progress=False)
    assert base == tmp_path / "CUB_200_2011"
    assert sorted(os.listdir(tmp_path)) == ["CUB_200_2011", "attributes.txt"]  # archive removed
    n = len(server.log)
    download_cub(tmp_path, progress=False)
    assert len(server.log) == n

    test = CUB200(tmp_path)
    assert test.name == "cub200-test" and test.queries is None
    assert test.labels.tolist() == [101] * 3 + [102] * 3 + [103] * 3
    assert test.class_names[102] == "102.Bird_102"
    assert CUB200(tmp_path, split="train").labels.tolist() == [1] * 3 + [2] * 3
    assert len(CUB200(tmp_path, split="all").database) == 15
    assert test.database[0].size == (64, 48)
    boxed = CUB200(tmp_path, use_boxes=True)
    assert boxed.database.boxes[0] == (4.0, 6.0, 44.0, 42.0) and boxed.database[0].size == (40, 36)

    perfect = _perfect_group_ranks(test.labels)
    assert test.evaluate(perfect) == {"R@1": 1.0, "R@2": 1.0, "R@4": 1.0, "R@8": 1.0}
    # hand-worked: image 0's nearest other is of another class, the rest are right
    R = perfect.copy()
    R[0] = [0, 3, 1, 2, 4, 5, 6, 7, 8]
    out = test.evaluate(R)
    assert out["R@1"] == pytest.approx(8 / 9) and out["R@2"] == 1.0
    small = test.subset(7)
    assert small.labels.tolist() == [101] * 3 + [102] * 3 and len(small.database) == 6
    assert "3 bird classes" in test.summary()


def test_cub200_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="download_cub"):
        CUB200(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        CUB200(tmp_path, split="val")
    for rel, data in _cub_files().items():
        if rel.endswith(".txt"):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(data)
    (tmp_path / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        CUB200(tmp_path, use_boxes=True)
    (tmp_path / "CUB_200_2011" / "images.txt").write_text("1 a.jpg extra\n")
    with pytest.raises(ValueError, match="line 1 .* 3 fields, expected 2"):
        CUB200(tmp_path)


def test_cub_download_with_wrong_md5_keeps_nothing(tmp_path, server, monkeypatch):
    server.routes["/CUB_200_2011.tgz"] = Route(_tgz(_cub_files()))
    monkeypatch.setattr(cub, "CUB_URL", server.url("/CUB_200_2011.tgz"))
    monkeypatch.setattr(cub, "CUB_MD5", "0" * 32)
    with pytest.raises(ChecksumError, match="md5"):
        download_cub(tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ what is right for a query
def _cub_on_disk(root):
    for rel, data in _cub_files().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return CUB200(root)


def _relevance_loop(labels, q, i):
    """Group sets and CUB: the query itself is junk, its group (class) is right."""
    return None if i == q else bool(labels[i] == labels[q])


def _revisited_relevance_loop(g, i):
    """Revisited, Medium protocol: easy and hard are right, junk is neither."""
    if i in list(g["junk"]):
        return None
    return i in list(g["easy"]) or i in list(g["hard"])


def test_group_relevance_matches_a_loop_over_labels(tmp_path):
    d = GroupDataset.from_manifest(_manifest_tree(tmp_path / "set"))
    n = len(d.database)
    for q in range(n):
        want = [_relevance_loop(d.labels, q, i) for i in range(n)]
        assert [d.relevance(q, i) for i in range(n)] == want
        codes = d.relevance_row(q, np.arange(n)[::-1])
        assert codes.dtype == np.int8
        assert codes.tolist() == [-1 if w is None else int(w) for w in want[::-1]]
    assert d.relevance(6, 6) is None and not any(d.relevance(6, i) for i in range(6))  # the singleton
    assert d.relevance(np.int64(0), np.int64(1)) is True
    assert d.relevance(torch.tensor(0), torch.tensor(1)) is True  # a 0-d tensor from ranks[q, k]


def test_revisited_relevance_matches_a_loop_over_gnd(tmp_path, data_root):
    doc = _gnd_doc(data_root)
    _revisited_tree(tmp_path, doc)
    d = RevisitedDataset("roxford5k", tmp_path)
    n = len(d.database)
    for q in range(len(d.queries)):
        g = d.gnd[q]
        codes = d.relevance_row(q, np.arange(n))
        want = [_revisited_relevance_loop(g, i) for i in range(n)]
        assert codes.tolist() == [-1 if w is None else int(w) for w in want]
        # one image of each kind, through the scalar form
        for key, expected in (("easy", True), ("hard", True), ("junk", None)):
            if len(g[key]):
                assert d.relevance(q, int(g[key][0])) is expected
        other = next(i for i in range(n) if want[i] is False)
        assert d.relevance(q, other) is False
    assert d.headline_key == "mAP/medium"


def test_cub_relevance_and_headline(tmp_path):
    cub = _cub_on_disk(tmp_path)
    n = len(cub.database)
    for q in range(n):
        assert [cub.relevance(q, i) for i in range(n)] == [_relevance_loop(cub.labels, q, i) for i in range(n)]
    assert cub.headline_key == "R@1" and cub.headline_key in cub.evaluate(_perfect_group_ranks(cub.labels))
    small = cub.subset(7)  # a subset builds its own ground truth, not its parent's
    cub.ground_truth()
    assert len(small.ground_truth()) == len(small.database) == 6
    assert [small.relevance(0, i) for i in range(6)] == [_relevance_loop(small.labels, 0, i) for i in range(6)]


def test_every_benchmark_names_a_headline_it_reports(tmp_path):
    d = GroupDataset.from_manifest(_manifest_tree(tmp_path / "set"))
    assert d.headline_key == "mAP" and d.headline_key in d.evaluate(_perfect_group_ranks(d.labels))
    doc = _gnd_doc(None)
    _revisited_tree(tmp_path / "rev", doc)
    r = RevisitedDataset("roxford5k", tmp_path / "rev")
    assert r.headline_key in r.evaluate(_perfect_revisited_ranks(r.gnd, len(r.database)))
    assert r.labels is None and r.subsets is None  # every benchmark has the attributes
    assert d.subsets is not None and d.labels is not None


def test_ground_truth_is_built_once_and_is_the_protocol(tmp_path):
    d = GroupDataset.from_manifest(_manifest_tree(tmp_path / "set"))
    gt = d.ground_truth()
    assert d.ground_truth() is gt
    assert gt[0]["ok"].tolist() == [1] and gt[0]["junk"].tolist() == [0]
    doc = _gnd_doc(None)
    _revisited_tree(tmp_path / "rev", doc)
    r = RevisitedDataset("roxford5k", tmp_path / "rev")
    assert r.ground_truth() is r.ground_truth()
    for got, g in zip(r.ground_truth(), r.gnd):
        assert sorted(got["ok"].tolist()) == sorted(list(g["easy"]) + list(g["hard"]))
        assert sorted(got["junk"].tolist()) == sorted(g["junk"])


def test_revisited_protocols_by_their_definition():
    gnd = [{"easy": [0, 4], "hard": [2], "junk": [1]}, {"easy": [], "hard": [3], "junk": []}]
    rules = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
    for name, (ok_from, junk_from) in rules.items():
        got = revisited_protocol(gnd, name)
        for g, entry in zip(gnd, got):
            assert sorted(entry["ok"].tolist()) == sorted(i for k in ok_from for i in g[k])
            assert sorted(entry["junk"].tolist()) == sorted(i for k in junk_from for i in g[k])
    with pytest.raises(ValueError, match="unknown revisited protocol 'medum'"):
        revisited_protocol(gnd, "medum")
    with pytest.raises(KeyError, match=r"gnd\[0\] lacks \['junk'\]"):
        revisited_protocol([{"easy": [], "hard": []}], "easy")


def test_top_results_group_set_skips_the_query():
    bench = GroupDataset(["a", "b", "c", "d"], [0, 0, 1, 1])
    ranks = np.array([[0, 2, 1, 3], [1, 0, 2, 3], [2, 3, 0, 1], [3, 0, 1, 2]])
    assert bench.top_results(ranks, 0, k=2) == ([2, 1], [False, True])
    assert bench.top_results(ranks, 3, k=5) == ([0, 1, 2], [False, False, True])
    # the query is skipped wherever it is ranked
    assert bench.top_results(np.array([[2, 1, 3, 0]] * 4), 0, k=3) == ([2, 1, 3], [False, True, False])


def test_top_results_revisited_marks_junk_as_none(tmp_path):
    doc = {"imlist": [f"db{i}" for i in range(4)], "qimlist": ["q0"],
           "gnd": [{"bbx": [0, 0, 20, 20], "easy": [2], "hard": [0], "junk": [1]}]}
    _revisited_tree(tmp_path, doc)
    r = RevisitedDataset("roxford5k", tmp_path)
    assert r.top_results(np.array([[1, 2, 3, 0]]), 0, k=4) == ([1, 2, 3, 0], [None, True, False, True])
    assert r.top_results(np.array([[1, 2, 3, 0]]), 0, k=2) == ([1, 2], [None, True])


def test_query_aps_group_set_by_hand_and_mean():
    bench = GroupDataset(["a", "b", "c", "d"], [0, 0, 1, 1])
    ranks = np.array([[0, 2, 1, 3],   # query 0: positive 1 at rank 1 after junk 0 and wrong 2
                      [1, 0, 2, 3],   # query 1: its positive first
                      [2, 3, 0, 1],
                      [3, 0, 1, 2]])  # query 3: positive 2 last
    aps = query_aps(bench, ranks)
    # trapezoid AP (revisited protocol), junk removed: query 0 has its positive at
    # position 1 -> 1/2 (0/1 + 1/2) = 0.25; query 3 at position 2 -> 1/2 (0/2 + 1/3) = 1/6
    assert aps == pytest.approx([0.25, 1.0, 1.0, 1 / 6])
    assert np.nanmean(aps) == pytest.approx(bench.evaluate(ranks)["mAP"])


def test_query_aps_revisited_is_the_medium_protocol(tmp_path):
    doc = _gnd_doc(None)
    _revisited_tree(tmp_path, doc)
    r = RevisitedDataset("roxford5k", tmp_path)
    rng = np.random.default_rng(3)
    R = np.stack([rng.permutation(len(r.database)) for _ in range(len(r.queries))])
    aps = query_aps(r, R)
    for q, g in enumerate(r.gnd):
        want = _ap_loop(R[q].tolist(), set(g["easy"]) | set(g["hard"]), set(g["junk"]))
        assert aps[q] == pytest.approx(want, abs=1e-12)
    assert np.nanmean(aps) == pytest.approx(r.evaluate(R)["mAP/medium"], abs=1e-12)


def test_relevance_errors(tmp_path):
    d = GroupDataset.from_manifest(_manifest_tree(tmp_path / "set"))
    with pytest.raises(IndexError, match="query 7 is not one of this benchmark's 7 queries"):
        d.relevance(7, 0)
    with pytest.raises(IndexError, match="query -1 is not one"):
        d.relevance_row(-1, [0])
    with pytest.raises(IndexError, match=r"database indices in 0\.\.6; got \[9\]"):
        d.relevance(0, 9)
    with pytest.raises(IndexError, match="one database index"):
        d.relevance(0, 1.0)
    with pytest.raises(IndexError, match="one database index"):
        d.relevance(0, True)
    with pytest.raises(IndexError, match="query 0.0 is not one"):
        d.relevance(0.0, 1)
    with pytest.raises(ValueError, match="1-D sequence of database indices"):
        d.relevance_row(0, np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match=r"ranks has shape \(1, 7\)"):
        d.top_results(np.zeros((1, 7), dtype=int), 0)


def test_find_gnd_looks_where_the_download_puts_it_first(tmp_path):
    from retrieval_lib.data.datasets import find_gnd
    from retrieval_lib.errors import MissingDataError

    with pytest.raises(MissingDataError, match=r"download roxford5k --data"):
        find_gnd("roxford5k", tmp_path)
    (tmp_path / "revisited_gnd").mkdir()
    alone = tmp_path / "revisited_gnd" / "gnd_roxford5k.pkl"
    alone.write_bytes(b"x")
    assert find_gnd("roxford5k", tmp_path) == alone  # the ground truth without its images
    (tmp_path / "roxford5k").mkdir()
    downloaded = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    downloaded.write_bytes(b"x")
    assert find_gnd("roxford5k", tmp_path) == downloaded  # where download_revisited puts it wins
    with pytest.raises(FileNotFoundError, match="rparis6k"):  # MissingDataError is a FileNotFoundError
        find_gnd("rparis6k", tmp_path)
    with pytest.raises(ValueError, match="unknown revisited dataset"):
        find_gnd("holidays", tmp_path)
