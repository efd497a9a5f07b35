"""metrics.json, results tables, scales, the notebook session and `python -m retrieval_lib reproduce`."""
import json
import math

import nbformat
import pytest
import torch

from retrieval_lib.__main__ import main
from retrieval_lib.book.config import SCALES, scale_config
from retrieval_lib.book.report import markdown_table, paper_vs_ours, read_metrics, results_table, write_metrics
from retrieval_lib.book.reproduce import find_notebooks, offtheshelf_table, run_notebooks


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


def test_tables():
    table = markdown_table(["a", "b"], [[1, 0.12345], ["x", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| x | – |"]
    pv = paper_vs_ours({"mAP": 0.5}, {"mAP": {"value": 0.6, "setting": "VGG16", "source": "T 1"}, "other": 0.7})
    rows = pv.splitlines()[2:]
    assert rows[0] == "| mAP | 0.500 | 0.600 | VGG16; T 1 |"
    assert rows[1].startswith("| other | – | 0.700")  # a paper number we did not measure shows as missing
    rt = results_table([{"notebook": "01", "ours": {"m": 0.25}, "paper": {"m": {"value": 0.5}}}])
    assert rt.splitlines()[2] == "| 01 | m | 0.250 | 0.500 |"


def test_scale_config(monkeypatch):
    assert set(SCALES) == {"smoke", "cpu", "full"}
    monkeypatch.setenv("RETRIEVAL_SCALE", "smoke")
    assert scale_config().name == "smoke"
    assert scale_config("cpu", image_size=256).image_size == 256
    with pytest.raises(ValueError, match="unknown scale"):
        scale_config("huge")


def test_book_smoke_offline(monkeypatch):
    from retrieval_lib.book.session import start
    from retrieval_lib.engine.extract import pool_fmaps

    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    book = start("smoke", progress=False)
    assert book.data_name.startswith("offline_default") and len(book.benchmark.database) <= 40
    X = book.descriptors("gem")
    torch.testing.assert_close(X, pool_fmaps(book.fmaps(), "gem"))
    metrics = book.evaluate(X)
    assert 0 <= metrics["mAP"] <= 1
    assert book.image(0).size[0] == 224 or book.image(0).size[1] == 224


def test_book_full_scale_without_data_says_how_to_get_it(tmp_path):
    from retrieval_lib.book.session import start

    with pytest.raises(FileNotFoundError, match="download_revisited"):
        start("full", data_root=tmp_path, progress=False)


def test_reproduce_command_offline_default(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    out = tmp_path / "res"
    assert main(["reproduce", "--scale", "smoke", "--notebooks", "none", "--out", str(out), "--quiet",
                 "--cache", str(tmp_path / "cache")]) == 0
    res = json.loads((out / "offtheshelf.json").read_text())
    assert list(res["rows"]) == ["MAC", "SPoC", "GeM (p=3)", "R-MAC (L=3)"]
    for metrics in res["rows"].values():
        assert 0 <= metrics["mAP"] <= 1
    assert res["extraction_images_per_s"] > 0
    printed = capsys.readouterr().out
    assert "| R-MAC (L=3) |" in printed and (out / "offtheshelf.md").read_text().strip() in printed
    assert offtheshelf_table(res).count("\n| ") == 5  # header + 4 poolings


def test_reproduce_rejects_bad_scale():
    with pytest.raises(SystemExit):
        main(["reproduce", "--scale", "huge"])


def _tiny_notebook(path, value):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('SCALE = "cpu"\nOUT_DIR = "x"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from retrieval_lib.book.report import write_metrics\n"
        f"write_metrics(OUT_DIR, {path.stem!r}, {{'mAP/x': {value}}}, {{'mAP/x': 0.9}}, scale=SCALE)")]
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
    with pytest.raises(FileNotFoundError, match="notebooks"):
        find_notebooks(tmp_path / "missing")
