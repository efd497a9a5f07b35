"""The reproduction run of released networks: the authors' input path, the setting check, and
``reproduce --scale full --network ...`` end to end on a stand-in revisited tree."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_lib.__main__ import main
from retrieval_lib.book import paper_networks as pn
from retrieval_lib.data.datasets import load_gnd
from retrieval_lib.errors import MissingDataError, UsageError
from retrieval_lib.models.released import released_networks

from test_released import _cirtorch_ckpt


# ----------------------------------------------------------------------------- the input path
@pytest.mark.parametrize("w,h,size,expected", [(1024, 768, 1024, (1024, 768)), (2000, 999, 1024, (1024, 511)),
                                               (999, 2000, 1024, (511, 1024)), (300, 200, 1024, (300, 200)),
                                               (3, 1000, 10, (1, 10))])
def test_old_thumbnail_size_truncates_and_never_enlarges(w, h, size, expected):
    assert pn.old_thumbnail_size(w, h, size) == expected


def test_authors_image_crops_resizes_and_normalises(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = pn.authors_image(tmp_path / "x.png", box=(10.4, 5.6, 50.5, 35.2), image_size=None, mean=mean, std=std)
    crop = a[6:35, 10:50].astype(np.float32) / 255  # round(): 10, 6, 50 (banker's), 35
    ref = (crop - np.array(mean, np.float32)) / np.array(std, np.float32)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), ref, rtol=1e-6, atol=1e-6)
    y = pn.authors_image(tmp_path / "x.png", image_size=30)
    assert y.shape == (1, 3, 20, 30)
    lanczos = np.asarray(Image.fromarray(a).resize((30, 20), Image.Resampling.LANCZOS), np.float32) / 255
    ref = (lanczos - np.array((0.485, 0.456, 0.406), np.float32)) / np.array((0.229, 0.224, 0.225), np.float32)
    np.testing.assert_allclose(y[0].permute(1, 2, 0).numpy(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the setting check
def _result():
    entry = released_networks()["rSfM120k-tl-resnet101-gem-w"].as_dict()
    res = {"network": "rSfM120k-tl-resnet101-gem-w", "registry": entry, "released_file": True,
           "info": {"format": "cirtorch", "architecture": "resnet101", "pooling": "gem", "whitening": True, "p": 3.0},
           "setting": {"script": entry["setting"]["script"], "image_size": 1024, "scales": [1.0, 2 ** 0.5, 2 ** -0.5],
                       "msp": 1.0, "post_whitening": None},
           "datasets": {"roxford5k": {"n_database": 4993, "n_queries": 70, "real_ground_truth": True,
                                      "metrics": {f"mAP/{p}": v for p, v in zip(pn.PROTOCOLS, (0.8, 0.678, 0.417))},
                                      "metrics_whitened": None}}}
    return res


def test_same_setting_only_when_every_field_matches():
    res = _result()
    assert pn.setting_differences(res, "roxford5k") == []
    rows = pn.paper_rows(res)
    medium = next(r for r in rows if r["protocol"] == "medium")
    assert medium["paper"] == 67.8 and medium["ours"] == 67.8 and medium["difference"] == 0 and medium["same_setting"]
    easy = next(r for r in rows if r["protocol"] == "easy")
    assert easy["paper"] is None and not easy["same_setting"]  # the README gives no Easy number
    for change, words in (({"image_size": 512}, "image size"), ({"scales": [1.0]}, "scales"), ({"msp": 3.0}, "msp")):
        bad = _result()
        bad["setting"].update(change)
        assert any(words in d for d in pn.setting_differences(bad, "roxford5k"))
    bad = _result()
    bad["datasets"]["roxford5k"]["real_ground_truth"] = False
    assert any("stand-in" in d for d in pn.setting_differences(bad, "roxford5k"))
    bad = _result()
    bad["released_file"] = False
    assert "yes" not in pn.paper_table([bad]).split("\n")[-2]


# ----------------------------------------------------------------------------- end to end
def _cut_gnd(doc, n_queries=2, n_db=6):
    """The first queries of a ground truth and a few database images, re-indexed."""
    gnd = doc["gnd"][:n_queries]
    keep = list(dict.fromkeys([i for k in ("hard", "easy", "junk") for g in gnd for i in g[k][:1]]))[:n_db - 1]
    keep += [i for i in range(len(doc["imlist"])) if i not in set(keep)][: n_db - len(keep)]
    new = {old: k for k, old in enumerate(keep)}
    cut = [{"bbx": [4.0, 6.0, 60.0, 58.0], **{k: [new[i] for i in g[k] if i in new] for k in ("easy", "hard", "junk")}}
           for g in gnd]
    return {"imlist": [doc["imlist"][i] for i in keep], "qimlist": doc["qimlist"][:n_queries], "gnd": cut}


def _stand_in(root, data_root):
    """DIR/<name>/jpg/ with tiny JPEGs named as in the real ground truth (../shared when there)."""
    rng = np.random.default_rng(2)
    for name in ("roxford5k", "rparis6k"):
        real = None if data_root is None else data_root / "revisited_gnd" / f"gnd_{name}.pkl"
        if real is not None and real.is_file():
            doc = _cut_gnd(load_gnd(real))
        else:
            doc = {"imlist": [f"{name}_{i:03d}" for i in range(6)], "qimlist": ["q0", "q1"],
                   "gnd": [{"bbx": [4.0, 6.0, 60.0, 58.0], "easy": [0, 1], "hard": [2], "junk": [3]},
                           {"bbx": [4.0, 6.0, 60.0, 58.0], "easy": [3], "hard": [4], "junk": []}]}
        jpg = root / name / "jpg"
        jpg.mkdir(parents=True)
        for n in doc["imlist"] + doc["qimlist"]:
            Image.fromarray(rng.integers(0, 256, size=(48 + rng.integers(0, 20), 64, 3), dtype=np.uint8)).save(
                jpg / f"{n}.jpg", quality=90)
        with open(root / name / f"gnd_{name}.pkl", "wb") as f:
            pickle.dump(doc, f)
    return root


def test_reproduce_network_end_to_end_on_a_stand_in_tree(tmp_path, data_root):
    data = _stand_in(tmp_path / "data", data_root)
    # a tiny cirtorch checkpoint named like the released ResNet-101 file: matched to its registry entry,
    # and the run must say why it is not the same setting (other bytes, other architecture, stand-in data)
    ckpt = tmp_path / "retrievalSfM120k-resnet101-gem-b80fb85.pth"
    _cirtorch_ckpt(ckpt, whitening=False, lw=True)
    out = tmp_path / "results"
    rc = main(["reproduce", "--scale", "full", "--network", str(ckpt), "--data", str(data), "--out", str(out),
               "--device", "cpu", "--quiet", "--cache", str(tmp_path / "cache")])
    assert rc == 0
    md = (out / "paper_networks.md").read_text()
    doc = json.loads((out / "paper_networks.json").read_text())
    assert len(doc) == 1 and set(doc[0]["datasets"]) == {"roxford5k", "rparis6k"}
    assert doc[0]["setting"]["scales"] == [1.0, 2 ** -0.5, 0.5] and doc[0]["setting"]["image_size"] == 1024
    assert doc[0]["setting"]["post_whitening"] == "Lw ms" and doc[0]["setting"]["msp"] == pytest.approx(2.7)
    rows = doc[0]["rows"]
    assert len(rows) == 6 and not any(r["same_setting"] for r in rows)
    medium = next(r for r in rows if r["dataset"] == "roxford5k" and r["protocol"] == "medium")
    assert medium["paper"] == 65.4 and medium["difference"] == pytest.approx(medium["ours"] - 65.4, abs=0.01)
    assert all(0 <= r["ours"] <= 100 for r in rows)  # every stand-in query has easy and hard positives
    assert "file differs from the released one" in md and "architecture resnet50 != resnet101" in md
    assert "stand-in data" in md and not (out / "offtheshelf.md").exists()


def test_missing_data_and_empty_network_list(tmp_path):
    (tmp_path / "d").mkdir()
    _cirtorch_ckpt(tmp_path / "m.pth", whitening=True, lw=False)
    with pytest.raises(MissingDataError, match="download roxford5k"):
        pn.evaluate_network(tmp_path / "m.pth", tmp_path / "d", device="cpu", progress=False)

    class Args:
        network, device, quiet = " , ", "cpu", True
    with pytest.raises(UsageError, match="at least one"):
        pn.main_paper_networks(Args, tmp_path / "o", tmp_path / "d", tmp_path / "c")


# ----------------------------------------------------------------------------- dirtorch's AP
def _ap_loop(ranking, ok, junk):
    """scikit-learn's average_precision_score on the ranking with junk removed, written as a loop."""
    kept = [i for i in ranking if i not in junk]
    hits, total = 0, 0.0
    for r, i in enumerate(kept, start=1):
        if i in ok:
            hits += 1
            total += hits / r
    return total / len(ok)


def test_map_noninterpolated_against_a_loop_and_a_hand_case():
    gnd = [{"easy": [0], "hard": [2], "junk": [1]}]
    # medium: ok {0, 2}, junk {1}; ranking 0, 3, 1, 2 -> kept 0, 3, 2: AP = (1/1 + 2/3) / 2
    assert pn.map_noninterpolated(np.array([[0, 3, 1, 2]]), gnd, "medium") == pytest.approx((1 + 2 / 3) / 2)
    rng = np.random.default_rng(4)
    n = 30
    gnd = [{"easy": rng.choice(n, 3, replace=False).tolist(), "hard": [], "junk": []} for _ in range(5)]
    for g in gnd:
        rest = [i for i in range(n) if i not in g["easy"]]
        g["hard"], g["junk"] = rest[:2], rest[2:5]
    gnd.append({"easy": [], "hard": [], "junk": [1]})  # no positive: left out of the mean
    R = np.stack([rng.permutation(n) for _ in gnd])
    for prot, (ok, junk) in {"easy": ("easy", ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
                             "hard": ("hard", ("junk", "easy"))}.items():
        ok = (ok,) if isinstance(ok, str) else ok
        ref = [_ap_loop(list(R[q]), {i for k in ok for i in g[k]}, {i for k in junk for i in g[k]})
               for q, g in enumerate(gnd[:-1])]
        assert pn.map_noninterpolated(R, gnd, prot) == pytest.approx(np.mean(ref))


def test_start_with_a_released_network(tmp_path):
    from _fakes import group_benchmark
    from retrieval_lib.book.session import start

    feats, sd, _ = _cirtorch_ckpt(tmp_path / "net.pth", whitening=True, lw=False)
    book = start("smoke", device="cpu", benchmark=group_benchmark(tmp_path, n_groups=2, per_group=2),
                 network=tmp_path / "net.pth", progress=False)
    assert book.network.info["format"] == "cirtorch" and book.model is book.network.backbone
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(book.model.features(x), feats(x))


def test_unknown_network_name_is_a_usage_error_on_the_command_line(tmp_path, capsys):
    data = _stand_in(tmp_path / "data", None)
    rc = main(["reproduce", "--scale", "full", "--network", "no-such-network", "--data", str(data),
               "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown released network 'no-such-network'" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "paper_networks.md").exists()


def test_a_learned_notebooks_released_section_on_a_stand_in_tree(tmp_path, data_root):
    # 08 at full shows the authors' GeM network with and without its Lw; here a tiny checkpoint stands in
    ckpt = tmp_path / "retrievalSfM120k-resnet101-gem-b80fb85.pth"
    _cirtorch_ckpt(ckpt, whitening=False, lw=True)
    assert set(pn.RELEASED_FOR) == {"05_wgem", "08_whitening"}
    assert all(name in released_networks() for name in pn.RELEASED_FOR.values())
    text, result = pn.released_section("08_whitening", tmp_path / "empty", device="cpu", network=str(ckpt),
                                       progress=False)
    assert result is None and "download roxford5k --data" in text  # nothing there: says what to fetch
    data = _stand_in(tmp_path / "data", data_root)
    text, result = pn.released_section("08_whitening", data, device="cpu", network=str(ckpt), progress=False)
    assert set(result["datasets"]) == {"roxford5k", "rparis6k"}
    assert "without" in text and "with the whitening" in text and "| roxford5k | Medium |" in text
    d = result["datasets"]["roxford5k"]
    shown = f"| roxford5k | Medium | {100 * d['metrics']['mAP/medium']:.1f} | {100 * d['metrics_whitened']['mAP/medium']:.1f} |"
    assert shown in text and "paper" in text


def test_reproduce_in_notebook_fetches_only_what_is_missing(tmp_path, data_root, monkeypatch):
    ckpt = tmp_path / "rSfM120k-tl-resnet101-gem-w-a155e54.pth"
    _cirtorch_ckpt(ckpt, whitening=True, lw=False)
    data = _stand_in(tmp_path / "data", data_root)
    fetched = []
    monkeypatch.setattr(pn, "fetch_item", lambda name, root, progress=True: fetched.append(name))
    results = pn.reproduce_in_notebook(str(ckpt), data, tmp_path / "out", device="cpu", progress=False)
    assert fetched == [] and (tmp_path / "out" / "paper_networks.json").is_file()  # both sets there: no download
    assert set(results[0]["datasets"]) == {"roxford5k", "rparis6k"}
    import shutil
    shutil.rmtree(data / "rparis6k" / "jpg")  # images gone: that set is fetched (here: recorded), then measured
    with pytest.raises(MissingDataError):  # the stand-in fetch puts nothing there, so the measurement says so
        pn.reproduce_in_notebook(str(ckpt), data, tmp_path / "out2", device="cpu", progress=False)
    assert fetched == ["rparis6k"]
    with pytest.raises(UsageError, match="data root"):
        pn.reproduce_in_notebook(str(ckpt), None, tmp_path / "out3")
