"""The benchmark scripts: the quick mode runs end to end and every comparison agrees.

Timings are never asserted (the machine is shared); what is asserted is that each
benchmark's reference and the library gave the same outputs, that the result files are
written, and that the measuring tools and references are right on hand-worked cases.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import cpu, curriculum, evaluation, pooling, search, suite, timing  # noqa: E402


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_mode_writes_every_result(quick_results):
    out, doc = quick_results
    assert set(doc["results"]) == set(cli.QUICK)
    for name in cli.QUICK:
        assert (out / f"{name}.json").exists() and (out / f"{name}.md").exists()
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "results.md").read_text()
    assert text.startswith("## Performance")
    assert doc["machine"]["cores"] >= 1 and "torch" in doc["machine"]
    assert text.count("quick mode") == len(cli.QUICK)


def test_quick_pooling_matches_loops(quick_results):
    res = quick_results[1]["results"]["pooling"]
    names = {r["pooling"] for r in res["rows"]}
    assert {"MAC", "SPoC", "GeM (p=3)", "wGeM (p=3)", "R-MAC (L=3)", "region_mac (L=3)"} <= names
    bad = [(r["shape"], r["pooling"], r["max_abs_err"]) for r in res["rows"] if not r["match"]]
    assert not bad, bad
    assert res["summary"]["no_5d_tensor"]
    for r in res["rows"]:
        if r["pooling"] in pooling.REGIONAL:  # never anything near (B, R, C, H, W)
            assert r["largest_alloc_bytes"] <= r["input_bytes"]
    assert res["shares"] and all(0 < p["share"] for s in res["shares"] for p in s["poolings"].values())


def test_quick_extraction_equals_bare_forward(quick_results):
    res = quick_results[1]["results"]["extraction"]
    assert res["summary"]["match"], res["max_abs_err"]
    assert res["n_images"] == 8 and len(res["rows"]) == 3
    assert all(r["images_per_s"] > 0 for r in res["rows"])


def test_quick_evaluation_identical(quick_results):
    res = quick_results[1]["results"]["evaluation"]
    assert res["summary"]["all_match"]
    assert all(r["max_abs_diff"] <= 1e-12 for r in res["rows"])
    assert 0.05 < res["rows"][-1]["mAP_medium"] < 0.95  # the generated rankings are not trivial


def test_quick_search_exact(quick_results):
    res = quick_results[1]["results"]["search"]
    assert res["summary"]["all_match"]
    for r in res["rows"]:
        assert r["max_score_diff"] < 1e-5 and r["index_overlap"] >= 0.999
        # knn's extra memory is bounded by one block; here a block covers the whole database
        assert r["ours_peak_extra_bytes"] <= 2 * r["score_matrix_bytes"] + 2 ** 20
    flat = [f["flat_recall"] for f in res["faiss"]]
    assert flat and min(flat) >= 0.999  # faiss flat is exact too
    ivf = [f for f in res["faiss"] if "ivfpq_recall" in f]
    assert len(ivf) == 1 and 0.0 < ivf[0]["ivfpq_recall"] <= 1.0


def test_quick_scaling_matches(quick_results):
    res = quick_results[1]["results"]["scaling"]
    assert res["summary"]["all_match"]
    assert [r["database"] for r in res["rows"]] == sorted(r["database"] for r in res["rows"])


def test_quick_cpu_levers_side_by_side(quick_results):
    res = quick_results[1]["results"]["cpu"]
    # the two child processes differ by the switch only, and each did what it says
    system, tuned = res["system"]["allocator"], res["tuned"]["allocator"]
    assert system["tuned"] is False and "RETRIEVAL_ALLOCATOR=system" in system["reason"]
    assert tuned["tuned"] is cpu_allocator_possible()
    assert res["system"]["pid"] != res["tuned"]["pid"]
    a = res["allocator"]
    assert a["system_s"] > 0 and a["tuned_s"] > 0 and a["speedup"] == pytest.approx(a["system_s"] / a["tuned_s"])
    assert len(a["speedup_per_repeat"]) == len(a["best_speedup_per_repeat"]) == res["repeats"]
    assert a["best_speedup"] == pytest.approx(a["system_s"] / a["best_s"])
    assert len(a["one_thread"]["speedup_per_repeat"]) == res["repeats"] and a["one_thread"]["tuned_s"] > 0
    levers = {lv["lever"]: lv for lv in res["levers"]}
    assert {"1 torch thread", "channels_last", "BatchNorm folded", "bfloat16 autocast"} <= set(levers)
    for name in ("1 torch thread", "channels_last", "BatchNorm folded", "BatchNorm folded + channels_last"):
        assert levers[name]["max_abs_diff"] <= cpu.MAP_TOL, (name, levers[name]["max_abs_diff"])
    assert set(res["summary"]["kept"]) <= set(levers) - {"bfloat16 autocast"}
    dec = {r["decoder"]: r for r in res["decoding"]}
    assert dec["PIL (library)"]["max_pixel_diff"] == 0 and dec["PIL (library)"]["speedup"] == pytest.approx(1.0)
    assert all(r["same_shape"] for r in res["decoding"])  # every decoder gives the library's input sizes
    so = res["scale_out"]  # 2 torchrun processes x 1 thread against 1 process: the same descriptors
    assert so is None or (so["max_abs_diff"] < 1e-5 and so["n_images"] == 8 and so["sharded_s"] > 0)
    assert "malloc tuned" in (quick_results[0] / "results.md").read_text() or not cpu_allocator_possible()


def test_cpu_lever_verdicts():
    lever = {"faster": True, "exact": True, "threads": None, "load_average": 9.0}
    assert cpu.verdict(lever, 2) == "yes"  # a memory-format lever does not depend on the thread count
    assert cpu.verdict(dict(lever, threads=1), 2) == "not decided (load 9.0 on 2 cores)"
    assert cpu.verdict(dict(lever, threads=1, load_average=1.5), 2) == "yes"
    assert cpu.verdict(dict(lever, exact=False), 2) == "no" and cpu.verdict(dict(lever, faster=False), 2) == "no"


def cpu_allocator_possible() -> bool:
    from retrieval_lib.engine.allocator import _glibc

    return _glibc() is not None


def test_quick_curriculum_harness(quick_results):
    res = quick_results[1]["results"]["curriculum"]
    assert set(res["runs"]) == {"smoke", "smoke_warm"} and res["summary"]["all_ran"]
    for r in res["runs"].values():
        assert r["returncode"] == 0 and r["scale"] == "smoke" and r["offtheshelf_s"] > 0
        assert r["wall_s"] > r["offtheshelf_s"]
        assert curriculum.parts(r)[0][0] == "off-the-shelf comparison"


def test_fold_batchnorm_keeps_the_maps():
    from retrieval_lib.models.backbones import efficientnet_lite

    torch.manual_seed(0)
    model = efficientnet_lite(0, pretrained=False)
    for m in model.modules():  # non-trivial statistics, so that folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    folded = cpu.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(2, 3, 65, 47)
    with torch.inference_mode():
        ref, out = model.features(x), folded.features(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_curriculum_parts_and_markdown():
    run = {"label": "cpu, cold cache", "scale": "cpu", "wall_s": 100.0, "returncode": 0, "timed_out": False,
           "benchmark": "real171", "offtheshelf_s": 10.0, "notebooks": {"00_pipeline": 30.0, "01_mac": 50.0},
           "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 2.0, 2.0], "stderr_tail": []}
    assert curriculum.parts(run) == [("off-the-shelf comparison", 10.0, 0.1), ("00_pipeline", 30.0, 0.3),
                                     ("01_mac", 50.0, 0.5)]
    smoke = dict(run, label="smoke, cold cache", scale="smoke", notebooks={"00_pipeline": 31.0})
    res = {"quick": False, "runs": {"smoke": smoke, "cpu_cold": run},
           "summary": {"smoke_slowest_notebook_s": 31.0, "smoke_target_met": False}}
    md = curriculum.to_markdown(res)
    assert "| 01_mac | 50.0 | 50 % |" in md and "(target <= 15 min: met)" in md
    assert "| 00_pipeline | 31.0 | 31 % | **no** |" in md and "30 s each: NOT met" in md


# ------------------------------------------------------------------------- references by hand
def test_compute_map_loop_hand_worked():
    ranks = np.array([[0, 1, 2, 3]])
    # positives at positions 1 and 3: AP = 1/2 [ (0/1 + 1/2)/2 + (1/3 + 2/4)/2 ] = 1/3
    m, aps, _, pks = evaluation.compute_map_loop(ranks, [{"ok": [1, 3], "junk": []}], kappas=(1, 2))
    assert m == pytest.approx(1 / 3)
    assert pks[0].tolist() == [0.0, 0.5]
    # image 0 is junk: positives move to 0 and 2: AP = 1/2 [ 1 + (1/2 + 2/3)/2 ] = 19/24
    m, _, _, _ = evaluation.compute_map_loop(ranks, [{"ok": [1, 3], "junk": [0]}])
    assert m == pytest.approx(19 / 24)
    # a query without positives is NaN and left out of the mean
    m, aps, _, _ = evaluation.compute_map_loop(np.array([[0, 1], [1, 0]]),
                                               [{"ok": [0], "junk": []}, {"ok": [], "junk": []}])
    assert m == 1.0 and np.isnan(aps[1])


def test_pooling_loops_hand_worked():
    x = torch.arange(18, dtype=torch.float32).view(1, 2, 3, 3)  # channel 0: 0..8, channel 1: 9..17
    assert pooling.mac_loop(x).tolist() == [[8.0, 17.0]]
    assert pooling.spoc_loop(x).tolist() == [[4.0, 13.0]]
    assert pooling.region_mac_loop(x, [(0, 0, 2, 2), (1, 1, 2, 2)]).tolist() == [[[4.0, 13.0], [8.0, 17.0]]]
    g = pooling.gem_loop(torch.full((1, 1, 2, 2), 2.0), p=3.0)
    assert g.item() == pytest.approx(2.0)
    w = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    assert pooling.wgem_loop(x[:, :, :2, :2], w)[0].tolist() == pytest.approx([1e-6, 9.0], abs=1e-5)


def test_search_reference_and_recall():
    X = torch.eye(4)
    Q = torch.tensor([[0.9, 0.1, 0.0, 0.0]])
    s, i = search.bare_topk(Q, X, 2)
    assert i.tolist() == [[0, 1]] and s[0].tolist() == pytest.approx([0.9, 0.1])
    assert search.recall_at_k(torch.tensor([[0, 2]]), torch.tensor([[0, 1]])) == 0.5
    D = search.descriptors(300, dim=32, rank=8, n_clusters=5)
    assert D.shape == (300, 32) and torch.allclose(D.norm(dim=1), torch.ones(300), atol=1e-5)


# ------------------------------------------------------------------------- measuring tools
def test_compare_interleaves_and_reports_speedup():
    calls = []
    res = timing.compare(lambda: calls.append("ref"), lambda: calls.append("ours"), repeats=3, warmup=1)
    assert calls == ["ref", "ours"] * 4  # warm-up pair, then strictly alternating
    assert res["speedup"] == pytest.approx(res["reference_s"] / res["ours_s"])
    assert len(res["reference"]["times"]) == 3
    with pytest.raises(ValueError, match="repeats"):
        timing.compare(lambda: None, lambda: None, repeats=0)
    with pytest.raises(ValueError, match="repeats"):
        timing.bench(lambda: None, repeats=0)


def test_bench_calibrates_short_calls():
    res = timing.bench(lambda: sum(range(100)), repeats=2, warmup=0, min_time=0.005)
    assert res["number"] > 1 and res.median > 0


def test_tensor_memory_peak_and_largest():
    with timing.TensorMemory() as mem:
        a = torch.ones(256, 1024)  # 1 MiB
        b = a * 2  # 1 MiB more, live together: 2 MiB
        del a
        c = b[:10]  # a view: nothing new
        d = torch.ones(128, 1024)  # 0.5 MiB while b lives: 1.5 MiB
        del b, c, d
    assert mem.peak == 2 * 2 ** 20
    assert mem.largest == 2 ** 20 and "ones" in mem.op
    assert mem.live == 0


def test_numpy_memory_sees_arrays():
    with timing.NumpyMemory() as mem:
        a = np.ones(1 << 20)  # 8 MiB
        del a
    assert 8 * 2 ** 20 <= mem.peak < 9 * 2 ** 20


_PEAK_RSS_CHECK = """
import time
import numpy as np
from benchmarks import timing

# the sampling thread sees a short-lived block (waited for, not slept on: the machine may be busy)
with timing.PeakRSS(interval=0.001) as mem:
    a = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    deadline = time.monotonic() + 10
    while mem.peak_extra < 32 * 2 ** 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    del a
assert mem.peak_extra >= 32 * 2 ** 20, mem.peak_extra
# and the last sample, taken on exit, sees a block still alive then
with timing.PeakRSS(interval=60) as mem:
    b = np.ones(64 << 20, dtype=np.uint8)
assert mem.peak_extra >= 32 * 2 ** 20, mem.peak_extra
print("ok")
"""


def test_peak_rss_sees_a_large_allocation():
    # In a fresh interpreter: inside the test session, pages freed by earlier tests may
    # still be resident and be reused, so a new block need not raise the RSS at all.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHECK], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_geomean_and_table():
    assert timing.geomean([2.0, 8.0]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="positive"):
        timing.geomean([1.0, 0.0])
    table = timing.markdown_table(["a", "b"], [[True, 1.23456], [False, None]])
    assert table.splitlines()[2] == "| yes | 1.23 |" and table.splitlines()[3] == "| **no** | – |"


# ------------------------------------------------------------------------- command line and suite
def test_cli_refuses_unknown_names_and_quick_suite(capsys):
    with pytest.raises(SystemExit):
        cli.main(["poolng"])
    assert "unknown benchmark(s) poolng" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--quick", "suite"])
    assert "suite has no quick mode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["evaluation", "--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no quick mode"):
        suite.run(quick=True)


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_notebooks" name="test_runs_at_smoke_scale[00_pipeline]" time="12.5"/>'
        '<testcase classname="tests.test_notebooks" name="test_house_structure[00_pipeline]" time="0.5"/>'
        '<testcase classname="tests.test_search" name="test_knn" time="1.0"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_search" name="test_faiss" time="2.0"><skipped message="y"/></testcase>'
        '</testsuite></testsuites>')
    res = suite.parse_junit(xml)
    assert res["notebooks"] == {"00_pipeline": 12.5}
    assert res["files"] == {"test_notebooks.py": 13.0, "test_search.py": 3.0}
    assert res["counts"] == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1}


# ------------------------------------------------------------------------- extract.py's worker default
@pytest.mark.parametrize("cores, threads, device, expected", [
    (2, 2, "cpu", 0),  # the forward uses both cores: decode in the main process
    (16, 8, "cpu", 4),  # spare cores: workers, at most 4
    (8, 6, "cpu", 2),
    (2, 2, "cuda", 1),  # the forward runs on the GPU: keep one core for the main process
    (1, 1, "cuda", 0),
])
def test_default_workers_leave_the_forward_its_cores(monkeypatch, cores, threads, device, expected):
    from retrieval_lib.engine import batching

    monkeypatch.setattr(batching.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(batching.torch, "get_num_threads", lambda: threads)
    assert batching.default_workers(torch.device(device)) == expected
