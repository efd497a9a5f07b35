"""metrics.json, results tables, scales, the notebook session and `python -m retrieval_lib reproduce`."""
import json
import os
import pickle
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_lib.__main__ import main
from retrieval_lib.book.config import SCALES, benchmark_for_scale, default_progress, scale_config
from retrieval_lib.book.report import (OFF_THE_SHELF, SETTING_FIELDS, markdown_table, measured, paper_result,
                                       paper_vs_ours, read_metrics, results_table, write_metrics)
from retrieval_lib.book.reproduce import CELL_TIMEOUT_S, find_notebooks, offtheshelf, offtheshelf_table, run_notebooks


def test_metrics_round_trip_and_nan(tmp_path):
    path = write_metrics(tmp_path / "nb", "03_gem", {"mAP/gem": 0.5, "bad": float("nan"), "n": torch.tensor(3)},
                         {"mAP/gem": {"value": 0.647, "source": "Radenović et al., TPAMI 2018"}}, scale="smoke")
    doc = read_metrics(path.parent)
    assert doc["ours"] == {"mAP/gem": 0.5, "bad": None, "n": 3}  # NaN -> null: standard JSON
    assert doc["paper"]["mAP/gem"]["value"] == 0.647 and doc["scale"] == "smoke"
    json.loads(path.read_text())  # strict JSON


def test_metrics_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        write_metrics(tmp_path, "x", {})
    (tmp_path / "metrics.json").write_text('{"ours": {}}')
    with pytest.raises(ValueError, match="notebook"):
        read_metrics(tmp_path)


def test_markdown_table():
    table = markdown_table(["a", "b"], [[1, 0.12345], ["x", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| x | – |"]
    assert markdown_table(["a"], [["x | y"]]).splitlines()[2] == "| x \\| y |"  # a "|" must not split the cell
    assert markdown_table(["a"], [[True]], fmt=lambda v: "yes" if v else "no").splitlines()[2] == "| yes |"


# ------------------------------------------------------------------ paper vs. ours
ROXF = dict(dataset="roxford5k", protocol="mAP medium", training=OFF_THE_SHELF, backbone="resnet101",
            resolution="1024 px")


def _rows(table):
    """Markdown table rows as lists of cells (header and rule dropped)."""
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


def test_paper_vs_ours_pairs_only_the_same_setting():
    paper = [paper_result(0.417, method="MAC", source="Radenović et al., CVPR 2018, Table 3", **ROXF),
             paper_result(0.647, method="GeM p=3", source="TPAMI 2018", **dict(ROXF, training="fine-tuned SfM-120k"))]
    # same setting written differently (case, punctuation, 1024 vs "1024 px"): they match
    ours = [measured(0.40, method="mac", **dict(ROXF, backbone="ResNet-101", resolution=1024)),
            measured(0.55, method="GeM p=3", **ROXF)]
    rows = _rows(paper_vs_ours(ours, paper))
    assert rows[0][1:3] == ["0.417", "0.400"]
    assert rows[0][0] == "MAC; roxford5k, mAP medium; resnet101, ImageNet, off the shelf, 1024 px"
    assert rows[0][3] == "mac; roxford5k, mAP medium; ResNet-101, ImageNet, off the shelf, 1024 px"  # ours, stated
    assert rows[0][4] == "Radenović et al., CVPR 2018, Table 3"
    # our GeM is off the shelf, the paper's fine-tuned: never paired
    assert rows[1][1:3] == ["0.647", "–"]
    assert rows[1][3] == ("no comparable measurement (ours: GeM p=3; roxford5k, mAP medium; resnet101, "
                          "ImageNet, off the shelf, 1024 px; differs in training)")


@pytest.mark.parametrize("field", SETTING_FIELDS)
def test_paper_vs_ours_one_different_field_prevents_pairing(field):
    paper = [paper_result(0.5, method="MAC", source="s", **ROXF)]
    ours = [measured(0.4, **dict(dict(ROXF, method="MAC"), **{field: "something else"}))]
    (row,) = _rows(paper_vs_ours(ours, paper))
    assert row[2] == "–"
    assert row[3].startswith("no comparable measurement (ours: ") and row[3].endswith(f"differs in {field})")


def test_paper_vs_ours_never_pairs_by_name_alone():
    # The older call matched a paper number to ours by the dictionary key, even when the
    # paper measured ResNet-101 fine-tuned on revisited Oxford and we measured Lite0 on real171.
    old_paper = {"mAP/medium": {"value": 0.647, "setting": "ROxford5k Medium; ResNet-101 fine-tuned", "source": "T 1"},
                 "other": 0.7}
    (r1, r2) = _rows(paper_vs_ours({"mAP/medium": 0.5}, old_paper))
    assert r1[:3] == ["mAP/medium; ROxford5k Medium; ResNet-101 fine-tuned", "0.647", "–"]
    assert r1[3].startswith("not compared: this paper entry states no structured setting") and r1[4] == "T 1"
    assert r2[:3] == ["other", "0.700", "–"]
    # structured paper entries against a plain {name: number} mapping: nothing states our setting
    (row,) = _rows(paper_vs_ours({"mAP": 0.4}, [paper_result(0.5, method="MAC", source="s", **ROXF)]))
    assert row[2:4] == ["–", "no comparable measurement (ours: no number measured with a stated setting)"]


def test_paper_entries_errors():
    with pytest.raises(ValueError, match="needs its source"):
        paper_result(0.5, method="MAC", source="", **ROXF)
    with pytest.raises(ValueError, match=r"\['dataset'\] are empty"):
        measured(0.5, method="MAC", **dict(ROXF, dataset=" "))
    with pytest.raises(TypeError, match="must be a number"):
        measured("0.5", method="MAC", **ROXF)
    with pytest.raises(ValueError, match="share the setting"):
        paper_vs_ours([measured(0.4, method="MAC", **ROXF), measured(0.5, method="mac", **ROXF)],
                      [paper_result(0.5, method="MAC", source="s", **ROXF)])
    with pytest.raises(ValueError, match="needs the fields"):
        paper_vs_ours([{"value": 0.4, "method": "MAC"}], [])
    assert measured(torch.tensor(0.25), method="MAC", **ROXF)["value"] == 0.25
    assert paper_result(None, method="SPoC", source="s", **ROXF)["value"] is None  # not verified: no number


def test_results_table_and_metrics_with_settings(tmp_path):
    ours_entries = [measured(0.40, method="MAC", key="mAP/mac", **ROXF)]
    paper = [paper_result(0.417, method="MAC", source="CVPR 2018", **ROXF),
             paper_result(0.180, method="MAC", source="CVPR 2018", **dict(ROXF, protocol="mAP hard"))]
    write_metrics(tmp_path / "01", "01_mac", {"mAP/mac": 0.40, "rf": 3}, paper, scale="full", measured=ours_entries)
    doc = read_metrics(tmp_path / "01")
    assert doc["measured"] == ours_entries and doc["paper"] == paper
    legacy = {"notebook": "00", "ours": {"m": 0.25}, "paper": {"m": {"value": 0.5}}}  # an older metrics.json
    table = results_table([doc, legacy])
    first, second = table.split("Every number measured in this run:")
    rows = _rows(first.strip().split("\n", 2)[2])
    assert [r[:4] for r in rows] == [["01_mac", "MAC; roxford5k, mAP medium; resnet101, ImageNet, off the shelf, 1024 px",
                                      "0.417", "0.400"],
                                     ["01_mac", "MAC; roxford5k, mAP hard; resnet101, ImageNet, off the shelf, 1024 px",
                                      "0.180", "–"],
                                     ["00", "m", "0.500", "–"]]
    assert rows[1][4].endswith("differs in protocol)") and rows[2][4].startswith("not compared")
    assert _rows(second.strip()) == [["01_mac", "mAP/mac", "0.400"], ["01_mac", "rf", "3"], ["00", "m", "0.250"]]
    with pytest.raises(ValueError, match="needs the fields"):
        write_metrics(tmp_path, "x", {"m": 1.0}, measured=[{"value": 1.0}])


def test_scale_config(monkeypatch):
    assert set(SCALES) == {"smoke", "cpu", "full"}
    monkeypatch.setenv("RETRIEVAL_SCALE", "smoke")
    assert scale_config().name == "smoke"
    assert scale_config("cpu", image_size=256).image_size == 256
    with pytest.raises(ValueError, match="unknown scale"):
        scale_config("huge")


def test_default_progress(monkeypatch):
    monkeypatch.delenv("RETRIEVAL_PROGRESS", raising=False)
    assert default_progress() is True
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "0")
    assert default_progress() is False
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "1")
    assert default_progress() is True
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "maybe")
    with pytest.raises(ValueError, match="RETRIEVAL_PROGRESS='maybe'"):
        default_progress()


def test_start_smoke_offline_reads_the_progress_switch(monkeypatch):
    from retrieval_lib.book.session import start

    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "0")  # what reproduce sets for the notebooks it runs
    book = start("smoke")
    assert book.progress is False
    assert book.data_name.startswith("offline_default") and len(book.benchmark.database) <= 40
    assert book.cfg == scale_config("smoke")
    monkeypatch.delenv("RETRIEVAL_PROGRESS")
    assert start("smoke").progress is True and start("smoke", progress=False).progress is False


def test_full_scale_without_data_says_how_to_get_it(tmp_path):
    from retrieval_lib.book.session import start

    # the notebooks (start) and the off-the-shelf table (reproduce) need the same data at full scale
    with pytest.raises(FileNotFoundError, match="full scale runs on roxford5k.*download_revisited"):
        start("full", data_root=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="full scale runs on roxford5k.*download_revisited"):
        offtheshelf("full", data_root=tmp_path, progress=False)


def _tiny_revisited(root, n_db=10, name="roxford5k"):
    """A stand-in revisited data set: n_db coloured database images, 2 queries with boxes."""
    jpg = root / name / "jpg"
    jpg.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imlist, qimlist = [f"db{i}" for i in range(n_db)], ["q0", "q1"]
    for n in imlist + qimlist:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(jpg / f"{n}.jpg")
    gnd = [{"bbx": [4.0, 4.0, 60.0, 44.0], "easy": [0, 1], "hard": [2], "junk": [3]},
           {"bbx": [0.0, 0.0, 64.0, 48.0], "easy": [4], "hard": [5, 6], "junk": []}]
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def test_one_benchmark_per_scale_for_start_and_reproduce(tmp_path, monkeypatch):
    from retrieval_lib.book.session import start

    _tiny_revisited(tmp_path)
    full = benchmark_for_scale("full", tmp_path)
    assert full.name == "roxford5k" and len(full.database) == 10 and len(full.queries) == 2
    # a cheap scale that measures the same kind of data: both entry points see the same benchmark
    cfg = scale_config("smoke", data="roxford5k", max_images=6, image_size=64)
    res = offtheshelf(cfg, data_root=tmp_path, progress=False, cache_dir=None)
    book = start(cfg, tmp_path, progress=False)
    assert res["benchmark"] == book.data_name == "roxford5k-sub6"
    assert (res["n_database"], res["n_queries"]) == (len(book.benchmark.database), len(book.benchmark.queries)) == (6, 2)
    assert res["setting"] == cfg.summary() and "roxford5k" in res["setting"]
    # the default benchmark at smoke scale, for both
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    assert benchmark_for_scale("smoke").name == start("smoke", progress=False).data_name
    with pytest.raises(ValueError, match="unknown data 'imagenet'"):
        benchmark_for_scale(scale_config("smoke", data="imagenet"))


def test_reproduce_command_offline_default(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    out = tmp_path / "res"
    assert main(["reproduce", "--scale", "smoke", "--notebooks", "none", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "offtheshelf.json").read_text())
    assert list(res["rows"]) == ["MAC", "SPoC", "GeM (p=3)", "R-MAC (L=3)"]
    for metrics in res["rows"].values():
        assert 0 <= metrics["mAP"] <= 1
    # a throughput only when images were run through the network (this session's cache may hold them)
    assert (res["extraction_images_per_s"] > 0) if res["extracted_images"] else res["extraction_images_per_s"] is None
    printed = capsys.readouterr().out
    assert "| R-MAC (L=3) |" in printed and (out / "offtheshelf.md").read_text().strip() in printed
    assert offtheshelf_table(res).count("\n| ") == 5  # header + 4 poolings


def test_reproduce_rejects_bad_scale():
    with pytest.raises(SystemExit):
        main(["reproduce", "--scale", "huge"])


ENV_SEEN = ("RETRIEVAL_PROGRESS", "RETRIEVAL_DATA", "RETRIEVAL_CACHE", "RETRIEVAL_SCALE", "RETRIEVAL_RESULTS")


def _tiny_notebook(path, value):
    """A numbered notebook that writes metrics.json, recording what it was handed."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('SCALE = "cpu"\nOUT_DIR = "x"\nDATA_ROOT = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import os\n"
        "from retrieval_lib.book.report import write_metrics\n"
        f"write_metrics(OUT_DIR, {path.stem!r}, {{'mAP/x': {value}}}, {{'mAP/x': 0.9}}, scale=SCALE,\n"
        f"              extra={{'OUT_DIR': OUT_DIR, 'DATA_ROOT': DATA_ROOT, 'cwd': os.getcwd(),\n"
        f"                     'env': {{k: os.environ.get(k) for k in {ENV_SEEN!r}}}}})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_notebooks_gathers_metrics(tmp_path):
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    _tiny_notebook(nb_dir / "00_a.ipynb", 0.25)
    _tiny_notebook(nb_dir / "01_b.ipynb", 0.5)
    (nb_dir / "notes.ipynb").write_text("{}")  # not numbered: not run
    assert [p.name for p in find_notebooks(nb_dir)] == ["00_a.ipynb", "01_b.ipynb"]
    docs = run_notebooks("smoke", tmp_path / "out", nb_dir, only=["01"], progress=False)
    assert [d["notebook"] for d in docs] == ["01_b"]
    assert docs[0]["ours"] == {"mAP/x": 0.5} and docs[0]["scale"] == "smoke" and docs[0]["seconds"] > 0
    assert (tmp_path / "out" / "01_b" / "01_b.ipynb").exists()  # the executed copy is kept
    with pytest.raises(FileNotFoundError, match="pass --notebooks-dir DIR"):
        find_notebooks(tmp_path / "missing")


def test_find_notebooks_default_is_the_repositorys_folder(tmp_path, monkeypatch):
    repo_notebooks = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert repo_notebooks and repo_notebooks[0].startswith("00_")
    monkeypatch.chdir(tmp_path)  # elsewhere: the checkout's notebooks
    assert [p.name for p in find_notebooks()] == repo_notebooks
    (tmp_path / "notebooks").mkdir()  # a notebooks/ folder here comes first
    _tiny_notebook(tmp_path / "notebooks" / "07_here.ipynb", 0.1)
    assert [p.name for p in find_notebooks()] == ["07_here.ipynb"]


def test_reproduce_hands_notebooks_absolute_paths_and_no_progress(tmp_path, monkeypatch, capfd):
    # The README's command uses a relative --out; the notebooks run inside the notebooks
    # folder, so every path they are handed must be absolute.
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    _tiny_notebook(nb_dir / "00_a.ipynb", 0.25)
    # a relative data root from the environment without real171: the offline default, with a warning
    # (an explicit --data without real171 is refused: tests/test_cli_errors.py)
    (tmp_path / "data").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("RETRIEVAL_PROGRESS", raising=False)
    monkeypatch.setenv("RETRIEVAL_SCALE", "cpu")
    monkeypatch.setenv("RETRIEVAL_DATA", "../data")
    before = dict(os.environ)
    with pytest.warns(UserWarning, match="no real171"):
        assert main(["reproduce", "--scale", "smoke", "--out", "results", "--cache", "cache",
                     "--notebooks-dir", str(nb_dir), "--quiet"]) == 0
    assert dict(os.environ) == before  # the environment is restored afterwards
    out = work / "results"
    doc = read_metrics(out / "notebooks" / "00_a")
    assert doc["ours"] == {"mAP/x": 0.25}
    seen = doc["extra"]
    assert seen["OUT_DIR"] == str(out / "notebooks" / "00_a") and seen["cwd"] == str(nb_dir)
    assert seen["DATA_ROOT"] == str(tmp_path / "data")
    assert seen["env"] == {"RETRIEVAL_PROGRESS": "0", "RETRIEVAL_DATA": str(tmp_path / "data"),
                           "RETRIEVAL_CACHE": str(work / "cache"), "RETRIEVAL_SCALE": "smoke",
                           "RETRIEVAL_RESULTS": str(out)}  # where 09_reproductions finds offtheshelf.json
    assert (work / "cache" / "features").is_dir()  # the relative --cache is used from here too
    assert not (nb_dir / "results").exists()
    assert (out / "offtheshelf.md").is_file() and "00_a" in (out / "results.md").read_text()
    assert "without encryption" not in capfd.readouterr().err  # the kernels talk over IPC, not TCP


def test_smoke_cells_time_out_within_two_minutes():
    assert CELL_TIMEOUT_S["smoke"] <= 120 and CELL_TIMEOUT_S["cpu"] >= CELL_TIMEOUT_S["smoke"]


def _failing_notebook(path, message="no rSfM-120k here; download it with `python -m retrieval_lib download rsfm120k`"):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('SCALE = "cpu"\nOUT_DIR = "x"\nDATA_ROOT = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell(f"raise FileNotFoundError({message!r})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_a_failing_notebook_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from retrieval_lib.errors import NotebooksFailed

    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    _failing_notebook(nb_dir / "00_a.ipynb")
    _tiny_notebook(nb_dir / "01_b.ipynb", 0.5)
    out = tmp_path / "res"
    args = ["reproduce", "--scale", "smoke", "--out", str(out), "--notebooks-dir", str(nb_dir), "--quiet"]
    assert main(args) == NotebooksFailed.exit_code == 6
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # In [4]: the failing cell's execution count, after the parameters cell papermill injects
    assert err.startswith("error: 1 of 2 notebooks failed, the others ran: 00_a (In [4]: FileNotFoundError: no rSfM")
    md = (out / "results.md").read_text()
    assert "Notebooks that failed" in md and "download rsfm120k" in md and "| 01_b | smoke |" in md
    assert "What each notebook measured" in md
    saved = json.loads((out / "results.json").read_text())
    assert [(d["notebook"], d.get("failed", False)) for d in saved] == [("00_a", True), ("01_b", False)]
    assert saved[0]["cell"] == 4 and saved[1]["ours"] == {"mAP/x": 0.5}
    assert (out / "notebooks" / "00_a" / "00_a.ipynb").is_file()  # the executed copy up to the failing cell

    # the fix, then a rerun of that notebook alone: the results accumulate instead of being replaced
    _tiny_notebook(nb_dir / "00_a.ipynb", 0.75)
    assert main(args[:-1] + ["--notebooks", "00", "--quiet"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert [(d["notebook"], d.get("failed", False)) for d in saved] == [("00_a", False), ("01_b", False)]
    assert saved[0]["ours"] == {"mAP/x": 0.75} and saved[1]["ours"] == {"mAP/x": 0.5}
    assert "Notebooks that failed" not in (out / "results.md").read_text()


def test_notebook_kernels_never_inherit_torchruns_process_group(tmp_path, monkeypatch):
    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    _tiny_notebook(nb_dir / "00_a.ipynb", 0.25)
    torchrun_env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                    "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}
    for k, v in torchrun_env.items():
        monkeypatch.setenv(k, v)
    code = ("import os\nfrom retrieval_lib.book.report import write_metrics\n"
            f"write_metrics(OUT_DIR, '00_a', {{'mAP/x': 0.1}}, extra={{k: os.environ.get(k) for k in {list(torchrun_env)!r}}})")
    nb = nbformat.read(nb_dir / "00_a.ipynb", as_version=4)
    nb.cells[1].source = code
    nbformat.write(nb, nb_dir / "00_a.ipynb")
    docs = run_notebooks("smoke", tmp_path / "out", nb_dir, progress=False)
    assert docs[0]["extra"] == {k: None for k in torchrun_env}
    assert all(os.environ[k] == v for k, v in torchrun_env.items())  # this process keeps its own


def test_offtheshelf_table_with_the_papers_imagenet_features(tmp_path, monkeypatch, capsys):
    """--backbone: cirtorch's ImageNet (Caffe) features file runs the off-the-shelf table instead of the scale's."""
    import torch
    import torchvision
    from torch import nn

    from retrieval_lib.book.reproduce import table_backbone
    from retrieval_lib.engine.extract import extract_descriptors
    from retrieval_lib.layers.pooling import GeM
    from retrieval_lib.search.nearest import rank_database

    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    torch.manual_seed(0)
    cut = nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-2])  # cirtorch's features
    path = tmp_path / "imagenet-caffe-resnet50-features-0000000.pth"
    torch.save(cut.state_dict(), path)
    out = tmp_path / "res"
    assert main(["reproduce", "--scale", "smoke", "--notebooks", "none", "--backbone", str(path), "--out", str(out),
                 "--quiet"]) == 0
    res = json.loads((out / "offtheshelf.json").read_text())
    assert res["backbone"] == str(path) and res["weights"] == f"file:{path}"
    assert str(path) in (out / "offtheshelf.md").read_text()
    # the table's GeM is GeM of that file's maps, extracted as the table does
    book_db = benchmark_for_scale("smoke").database
    X = extract_descriptors(table_backbone(str(path)), book_db, GeM(p=3.0, learn_p=False), image_size=224,
                            progress=False)
    assert benchmark_for_scale("smoke").evaluate(rank_database(X, X))["mAP"] == pytest.approx(
        res["rows"]["GeM (p=3)"]["mAP"], abs=1e-6)
    capsys.readouterr()
    # names that are not off-the-shelf backbones are refused before anything is written
    assert main(["reproduce", "--scale", "smoke", "--notebooks", "none", "--backbone", "resnet7", "--out",
                 str(tmp_path / "r2")]) == 2
    assert main(["reproduce", "--scale", "smoke", "--notebooks", "none", "--backbone", "rSfM120k-tl-resnet101-gem-w",
                 "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "imagenet-caffe-resnet101" in err and "--network rSfM120k-tl-resnet101-gem-w" in err
    assert not (tmp_path / "r2").exists()
