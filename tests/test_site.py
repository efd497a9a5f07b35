"""The static site (``retrieval_lib.book.site``, ``python -m retrieval_lib site``) on a small fake run.

The fake reproduce folder holds two hand-made executed notebooks (a figure, a widget whose
static figure is in the cell before, a widget drawn in its own cell, a failed one) plus
``results.md``/``results.json``/``offtheshelf.md``, so every check runs in seconds without
executing anything. The real smoke run is rendered and opened in Chromium by
``tests/test_browser_site.py``.
"""
import base64
import io
import json
import re

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from retrieval_lib.book.site import WIDGET_STATE, WIDGET_VIEW, build_site, executed_notebooks, static_widgets


def _png(w=6, h=4, color=(200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _figure(w=6, h=4):
    return new_output("display_data", data={"image/png": _png(w, h), "text/plain": "<Figure size 600x400 with 1 Axes>"})


def _widget_output(model_id):
    return new_output("display_data", data={WIDGET_VIEW: {"model_id": model_id, "version_major": 2, "version_minor": 0},
                                            "text/plain": "VBox(children=(IntSlider(value=2, description='k (rank)')"
                                                          ", Output()))"})


def _state(vbox, sliders):
    """Widget state of a VBox holding ``sliders`` ({model id: state}) and an Output."""
    state = {vbox: {"model_name": "VBoxModel", "model_module": "@jupyter-widgets/controls",
                    "model_module_version": "2.0.0",
                    "state": {"children": [f"IPY_MODEL_{m}" for m in sliders] + ["IPY_MODEL_out"]}},
             "out": {"model_name": "OutputModel", "model_module": "@jupyter-widgets/output",
                     "model_module_version": "1.0.0", "state": {}}}
    for m, s in sliders.items():
        state[m] = {"model_name": s.pop("model"), "model_module": "@jupyter-widgets/controls",
                    "model_module_version": "2.0.0", "state": s}
    return state


def _executed(cells, widget_state=None):
    nb = new_notebook(cells=cells)
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = n + 1
    nb.metadata["papermill"] = {"parameters": {"SCALE": "smoke"}}
    if widget_state:
        nb.metadata["widgets"] = {WIDGET_STATE: {"state": widget_state, "version_major": 2, "version_minor": 0}}
    return nb


def _write(run, name, nb):
    folder = run / "notebooks" / name
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / f"{name}.ipynb")


@pytest.fixture()
def fake_run(tmp_path):
    run = tmp_path / "run"
    figure_cell = new_code_cell("draw(0)", outputs=[_figure(8, 5)])
    widget_cell = new_code_cell("display(live_figure(draw, k=IntSlider(...)))", outputs=[_widget_output("box1")])
    nb_a = _executed([
        new_markdown_cell("# 00 · A pipeline\n\nSome prose."),
        new_code_cell("x = 1\nprint(x)", outputs=[new_output("stream", name="stdout", text="1\n")]),
        figure_cell,
        widget_cell,
    ], _state("box1", {"s1": {"model": "IntSliderModel", "description": "k (rank)", "min": 0, "max": 5,
                              "value": 2}}))
    own_cell = new_code_cell("draw(); display(live_figure(draw, p=FloatLogSlider(...)))",
                             outputs=[_figure(5, 7), _widget_output("box2")])
    nb_b = _executed([
        new_markdown_cell("# 01 · Another one"),
        own_cell,
        new_code_cell("1 / 0", outputs=[new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                                   traceback=["ZeroDivisionError: division by zero"])]),
    ], _state("box2", {"s2": {"model": "FloatLogSliderModel", "description": "p (GeM exponent)", "min": 0.0,
                              "max": 1.8, "base": 10.0, "value": 3.0}}))
    _write(run, "00_alpha", nb_a)
    _write(run, "01_beta", nb_b)
    (run / "results.md").write_text("Every number measured in this run:\n\n| notebook | metric | ours |\n"
                                    "|---|---|---|\n| 00_alpha | mAP/gem_zeta | 0.512 |\n")
    (run / "results.json").write_text(json.dumps([{"notebook": "00_alpha", "seconds": 12.5, "ours": {}},
                                                  {"notebook": "01_beta", "seconds": 3.25, "ours": {}}]))
    (run / "offtheshelf.md").write_text("| pooling | mAP |\n|---|---|\n| MAC_offtheshelf_row | 0.4 |\n")
    return {"run": run, "figure_cell": figure_cell.id, "widget_cell": widget_cell.id, "own_cell": own_cell.id}


@pytest.fixture()
def built(fake_run, tmp_path):
    return fake_run, build_site(fake_run["run"], tmp_path / "site")


def _cell_html(page: str, cell_id: str) -> str:
    """The HTML of one cell of an nbconvert lab page (from its anchor to the next cell's)."""
    start = page.index(f'id="cell-id={cell_id}"')
    nxt = page.find('id="cell-id=', start + 10)
    return page[start: nxt if nxt > 0 else len(page)]


def _images(fragment: str) -> list:
    from PIL import Image

    sizes = []
    for data in re.findall(r"<img[^>]*src=\"data:image/png;base64,([^\"]*)\"", fragment):
        sizes.append(Image.open(io.BytesIO(base64.b64decode(data))).size)
    return sizes


def test_pages_exist_with_their_figures_embedded(built):
    _, site = built
    out = site["index"].parent
    assert sorted(p.name for p in out.glob("*.html")) == ["00_alpha.html", "01_beta.html", "index.html"]
    a = (out / "00_alpha.html").read_text()
    b = (out / "01_beta.html").read_text()
    assert _images(a) == [(8, 5)]  # decodable PNGs of the figures' own size, nothing else
    assert _images(b) == [(5, 7)]
    assert not re.search(r"<img[^>]+src=[\"']?https?:", a + b)  # no image fetched from elsewhere
    assert (out / "ipynb" / "00_alpha.ipynb").is_file() and (out / "ipynb" / "01_beta.ipynb").is_file()
    assert [p["figures"] for p in site["pages"]] == [1, 1]


def test_index_lists_every_notebook_and_the_tables(built):
    _, site = built
    index = site["index"].read_text()
    for name, title in (("00_alpha", "00 · A pipeline"), ("01_beta", "01 · Another one")):
        assert f'href="{name}.html"' in index and title in index and f'href="ipynb/{name}.ipynb"' in index
    assert "<table" in index and "mAP/gem_zeta" in index and "0.512" in index  # results.md as an HTML table
    assert "MAC_offtheshelf_row" in index
    assert "12.5" in index and "3.2" in index  # run times from results.json
    assert "smoke" in index
    assert "stopped in code cell 1" in index and "ZeroDivisionError" in index  # 01_beta's failure is named
    assert "k (rank)" in index and "p (GeM exponent)" in index


def test_widgets_become_notes_pointing_at_their_static_figure(built, fake_run):
    _, site = built
    out = site["index"].parent
    a = (out / "00_alpha.html").read_text()
    b = (out / "01_beta.html").read_text()
    for page in (a, b):
        assert WIDGET_VIEW not in page and WIDGET_STATE not in page  # no widget manager, no empty widget area
    # 00: the widget's figure is in the cell before it; that cell holds the image
    note = _cell_html(a, fake_run["widget_cell"])
    assert f'data-figure-cell="cell-id={fake_run["figure_cell"]}"' in note and "k (rank)" in note
    assert "from 0 to 5" in note and "drawn at 2" in note
    assert _images(_cell_html(a, fake_run["figure_cell"])) == [(8, 5)]
    # 01: drawn in its own cell; the log slider's range in p, not in exponents
    own = _cell_html(b, fake_run["own_cell"])
    assert f'data-figure-cell="cell-id={fake_run["own_cell"]}"' in own and "p (GeM exponent)" in own
    assert "from 1 to 63.1" in own
    assert [w["figure_cell"] for p in site["pages"] for w in p["widgets"]] == [fake_run["figure_cell"],
                                                                             fake_run["own_cell"]]


def test_widget_without_saved_state_named_from_its_repr():
    nb = _executed([new_code_cell("display(w)", outputs=[_widget_output("gone")])])
    static, widgets = static_widgets(nb)
    assert widgets[0]["controls"] == [{"kind": "IntSlider", "description": "k (rank)"}]
    assert widgets[0]["figure_cell"] is None  # nothing drawn before it: the note says so
    html = static["cells"][0]["outputs"][0]["data"]["text/html"]
    assert "none was drawn" in html
    assert "widgets" not in static["metadata"]


def test_missing_or_empty_or_unexecuted_folders_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no reproduce run at .*reproduce --out"):
        build_site(tmp_path / "nope", tmp_path / "site")
    (tmp_path / "empty" / "notebooks").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no executed notebook"):
        executed_notebooks(tmp_path / "empty")
    run = tmp_path / "raw"
    _write(run, "00_raw", new_notebook(cells=[new_code_cell("x = 1")]))
    with pytest.raises(ValueError, match="never executed"):
        build_site(run, tmp_path / "site")


def test_command_line_from_a_run(fake_run, tmp_path, capsys):
    from retrieval_lib.__main__ import build_parser, main

    args = build_parser().parse_args(["site", "--from", "R", "--out", "S", "--scale", "smoke"])
    assert (args.from_dir, args.out, args.scale) == ("R", "S", "smoke")
    assert build_parser().parse_args(["site"]).out == "site" and build_parser().parse_args(["site"]).from_dir is None
    out = tmp_path / "cli_site"
    code = main(["site", "--from", str(fake_run["run"]), "--out", str(out)])
    printed = capsys.readouterr().out
    assert (out / "index.html").is_file() and (out / "01_beta.html").is_file()
    assert code == 1 and "01_beta" in printed and "stopped with an error" in printed  # 01_beta failed: exit 1
    assert main(["site", "--from", str(tmp_path / "missing"), "--out", str(out)]) == 3  # one line, exit 3


def test_command_line_without_from_runs_reproduce_into_out_run(fake_run, tmp_path, monkeypatch):
    """Without --from, `site` hands its own arguments to reproduce with --out OUT/run, then renders that."""
    import shutil

    import retrieval_lib.book.reproduce as reproduce
    from retrieval_lib.__main__ import main

    seen = {}

    def fake_reproduce(args):
        seen.update(vars(args))
        shutil.copytree(fake_run["run"], args.out)
        return 0

    monkeypatch.setattr(reproduce, "main_reproduce", fake_reproduce)
    out = tmp_path / "made"
    code = main(["site", "--scale", "smoke", "--out", str(out), "--notebooks", "00,01"])
    assert seen["out"] == str(out.resolve() / "run") and seen["scale"] == "smoke" and seen["notebooks"] == "00,01"
    assert (out / "index.html").is_file() and (out / "00_alpha.html").is_file()
    assert code == 1  # the fake run's 01_beta holds an error


def test_a_run_that_timed_out_is_marked_stopped(tmp_path):
    """papermill leaves no error output on a cell that ran out of time: the cells after it simply did not run."""
    run = tmp_path / "run"
    nb = new_notebook(cells=[new_markdown_cell("# 04 · Timed out"), new_code_cell("x = 1"),
                             new_code_cell("slow()"), new_code_cell("after()"), new_code_cell("")])
    nb.cells[1].execution_count, nb.cells[2].execution_count = 1, 2
    _write(run, "04_slow", nb)
    _write(run, "05_fine", _executed([new_code_cell("y = 2")]))
    site = build_site(run, tmp_path / "site")
    assert site["pages"][0]["error"] == (1, "the run ended here: code cells 2 to 2 did not run (a cell that runs "
                                             "out of time leaves no error output)")
    assert site["pages"][1]["error"] is None
    assert "stopped in code cell 1" in site["index"].read_text()
