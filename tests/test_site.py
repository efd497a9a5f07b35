"""The static site (``retrieval_lib.book.site``, ``python -m retrieval_lib site``) on a small fake run.

The fake reproduce folder holds two hand-made executed notebooks (a figure, a widget whose
static figure is in the cell before, a widget drawn in its own cell, a failed one) plus
``results.md``/``results.json``/``offtheshelf.md``, so every check runs in seconds without
executing anything. The real smoke run is rendered and opened in Chromium by
``tests/test_browser_site.py``.
"""
import base64
import html
import io
import json
import re
import unicodedata

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from retrieval_lib.book.colab import colab_url, install_cell_source
from retrieval_lib.book.report import measured, paper_result, write_metrics
from retrieval_lib.book.site import (WIDGET_STATE, WIDGET_VIEW, build_site, executed_notebooks, headline_comparisons,
                                     path_scrubber, plumbing_cells, static_widgets)

DATA_DIR = "/srv/somewhere/retrieval-data"  # an absolute DATA_ROOT of the machine that ran the notebooks
MATH_MARKDOWN = r"""## The exponent $p$

GeM pools each channel as

$$f_k=\Big(\frac{1}{hw}\sum_{p}X_k(p)^{p}\Big)^{1/p},\qquad \bigl\lVert \mathbf{f} \bigr\rVert_2 = 1,$$

with $\operatorname{softmax}_{HW}$ and $\boldsymbol{\omega}$ inline. Code keeps its dollars: `echo $HOME` and

```bash
export X=$RETRIEVAL_DATA  # $not math$
```

and a price of \$5 stays a price.
"""
SETTING = dict(dataset="real171", protocol="mAP", method="GeM p=3", training="ImageNet, off the shelf",
               backbone="efficientnet_lite0", resolution="224 px")
METRICS_OURS = {"mAP/gem_zeta": 0.512, "gap/gem-mac": 0.2, "gap_ci_low/gem-mac": 0.05, "gap_ci_high/gem-mac": 0.31,
                "held_delta": -0.01, "held_ci_low": -0.04, "held_ci_high": 0.02, "lonely_ci_low": 0.1}
METRICS_EXTRA = {"study": {"dims": [8, 16], "comparisons": [
    {"delta": -0.4, "ci": [-0.5, -0.3], "level": 0.95, "n": 8, "significant": True},
    {"delta": 0.0, "ci": [0.0, 0.0], "level": 0.95, "n": 8, "significant": False}]}}


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
    install = new_code_cell(install_cell_source())
    imports = new_code_cell("import os\n\nfrom retrieval_lib import start  # the book's entry point\n")
    params = new_code_cell('SCALE = "cpu"\nOUT_DIR = "results/00_alpha"\nDATA_ROOT = None',
                           metadata={"tags": ["parameters"]})
    injected = new_code_cell(f'# Parameters\nSCALE = "smoke"\nOUT_DIR = "{run}/notebooks/00_alpha"\n'
                             f'DATA_ROOT = "{DATA_DIR}"\n', metadata={"tags": ["injected-parameters"]})
    first_content = new_code_cell("x = 1\nprint(x)", outputs=[new_output("stream", name="stdout", text="1\n")])
    nb_a = _executed([
        new_markdown_cell("# 00 · A pipeline\n\nSome prose."),
        install, imports, params, injected,
        new_markdown_cell(MATH_MARKDOWN),
        first_content,
        new_code_cell("print(OUT_DIR)", outputs=[new_output("stream", name="stdout",
                                                              text=f"wrote {run}/notebooks/00_alpha/metrics.json\n")]),
        figure_cell,
        widget_cell,
    ], _state("box1", {"s1": {"model": "IntSliderModel", "description": "k (rank)", "min": 0, "max": 5,
                              "value": 2}}))
    nb_a.metadata["papermill"]["parameters"].update(OUT_DIR=f"{run}/notebooks/00_alpha", DATA_ROOT=DATA_DIR)
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
    write_metrics(run / "notebooks" / "00_alpha", "00_alpha", ours=METRICS_OURS, extra=METRICS_EXTRA,
                  measured=[measured(0.512, **SETTING), measured(0.3, **{**SETTING, "method": "MAC"})],
                  paper=[paper_result(0.6, **SETTING, source="Same-setting paper, table 1"),
                         paper_result(0.7, **{**SETTING, "dataset": "roxford5k"}, source="Other paper, table 2"),
                         paper_result(None, **{**SETTING, "backbone": "vgg16"}, source="Third paper")])
    return {"run": run, "figure_cell": figure_cell.id, "widget_cell": widget_cell.id, "own_cell": own_cell.id,
            "setup": [install.id, imports.id, params.id, injected.id], "first_content": first_content.id}


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

    import retrieval_lib.book.site as site_mod
    from retrieval_lib.__main__ import main

    seen = {}

    def fake_reproduce(args):
        seen.update(vars(args))
        shutil.copytree(fake_run["run"], args.out)
        return 0

    monkeypatch.setattr(site_mod, "main_reproduce", fake_reproduce)
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


# ---------------------------------------------------------------- equations, setup cells, paths, the front page
def _visible(page: str) -> str:
    """The text a reader sees outside code: no tags, scripts, styles, code blocks or inline code."""
    import html as html_lib

    body = page[page.find("<body"):]
    body = re.sub(r"<(script|style|pre|code)\b[^>]*>.*?</\1>", " ", body, flags=re.S)
    body = re.sub(r"<math\b.*?</math>", " MATH ", body, flags=re.S)
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", body))


def test_markdown_equations_become_mathml_and_code_keeps_its_dollars(built, fake_run):
    _, site = built
    page = (site["index"].parent / "00_alpha.html").read_text()
    assert page.count('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">') == 1
    assert page.count('display="inline"') >= 3  # $p$ in the heading, $\operatorname{softmax}_{HW}$, $\boldsymbol\omega$
    text = _visible(page)
    for latex in ("$$", "\\frac", "\\mathbf", "\\Big", "\\lVert", "\\operatorname", "$p$"):
        assert latex not in text, latex
    assert "<mfrac>" in page and "softmax" in page
    shown = html.unescape(page)
    assert "‖" in shown and unicodedata.lookup("MATHEMATICAL BOLD ITALIC SMALL OMEGA") in shown  # \lVert after
    assert 'mathvariant="bold' not in page  # \bigl; \boldsymbol{\omega} as a Unicode letter (Chromium ignores bold)
    assert "<code>echo $HOME</code>" in page and "$not math$" in page  # code spans and fences untouched
    assert "a price of $5" in text
    assert "mathjax" not in page.lower() and not re.search(r"<script[^>]*src=\"https?:", page)  # no CDN, no network
    heading = re.search(r"<h2[^>]*>.*?</h2>", page, re.S).group(0)
    assert re.search(r'<h2 id="[^"<>]*"', heading) and "<math" in heading  # the anchor is plain text
    assert all(not p["math_failures"] for p in site["pages"])


def test_split_math_reads_dollars_as_jupyter_does():
    from retrieval_lib.book.site_math import split_math

    def kinds(text):
        return [(k, c) for k, c in split_math(text) if k != "text"]

    assert kinds("a $x$ b $$y$$ c") == [("inline", "x"), ("display", "y")]
    assert kinds("costs $5 and $6 now") == []  # a dollar before a digit closes nothing
    assert kinds("`$x$` and ``a $b$ `c` $d$``") == []
    assert kinds("```\n$x$\n```\n$y$") == [("inline", "y")]
    assert kinds(r"\$x\$ and $z$") == [("inline", "z")]
    assert kinds("$ x$ and $x $") == []  # no space inside the delimiters
    assert kinds("$a\n\nb$") == []  # math never crosses a blank line
    assert kinds("$$\n\\sum_i x_i\n$$") == [("display", "\n\\sum_i x_i\n")]
    text = "p $q$ `$r$` $$s$$ \\$t"
    assert "".join(c if k == "text" else ("$" if k == "inline" else "$$") + c + ("$" if k == "inline" else "$$")
                   for k, c in split_math(text)) == text


def test_latex_to_mathml_hand_worked_cases_and_errors():
    from retrieval_lib.book.site_math import MathError, latex_to_mathml

    assert "<mfrac><mrow><mi>a</mi></mrow><mrow><mi>b</mi></mrow></mfrac>" in latex_to_mathml(r"\frac{a}{b}")
    assert 'display="block"' in latex_to_mathml("x", display=True)
    bold = latex_to_mathml(r"\mathbf{\Lambda}")
    assert "\U0001D6B2" in bold and "mathvariant" not in bold  # MATHEMATICAL BOLD CAPITAL LAMDA
    assert "\\" not in latex_to_mathml(r"\bigl\lVert x \bigr\rVert_2 + \arg\max_p f")
    assert "arg" in latex_to_mathml(r"\arg\max_p f")
    assert "<mo>&#x002C6;</mo></mover>" in latex_to_mathml(r"\hat{x}")  # a hat Chromium sets on its letter
    with pytest.raises(MathError, match=r"would show \\foo as text"):
        latex_to_mathml(r"a + \foo{b}")


def test_every_equation_of_the_notebooks_converts():
    """Each $...$ / $$...$$ of every notebook's markdown converts, and every macro they use is inside one."""
    from pathlib import Path

    from retrieval_lib.book.site_math import latex_to_mathml, split_math

    macros_in_math, macros_anywhere, n = set(), set(), 0
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            text = "".join(cell["source"])
            for kind, content in split_math(text):
                if kind == "text":
                    prose = re.sub(r"```.*?```|`[^`]*`", "", content, flags=re.S)
                    macros_anywhere |= set(re.findall(r"\\[a-zA-Z]+", prose))
                    continue
                n += 1
                macros_in_math |= set(re.findall(r"\\[a-zA-Z]+", content))
                mathml = latex_to_mathml(content, display=kind == "display")  # raises MathError on a leftover macro
                assert "<math" in mathml
    assert n > 100 and {"\\frac", "\\mathbf", "\\operatorname", "\\big", "\\lVert"} <= macros_in_math
    assert not macros_anywhere, f"macros outside $...$ would show as text: {sorted(macros_anywhere)}"


def test_setup_cells_are_folded_and_no_machine_path_is_shown(built, fake_run, tmp_path):
    _, site = built
    out = site["index"].parent
    page = (out / "00_alpha.html").read_text()
    details = page[page.index('<details class="rl-setup">'): page.index("</details>", page.index('class="rl-setup"'))]
    for cell_id in fake_run["setup"]:
        assert f'id="cell-id={cell_id}"' in details
    assert f'id="cell-id={fake_run["first_content"]}"' not in details and "<details open" not in page
    assert "Colab install" in details and "imports" in details and "parameters" in details
    summary = details[: details.index("</summary>")]
    assert 'This run: <code>SCALE = &quot;smoke&quot;; OUT_DIR = &quot;run/notebooks/00_alpha&quot;' in summary
    copy = (out / "ipynb" / "00_alpha.ipynb").read_text()
    for text in (page, copy, site["index"].read_text()):
        assert str(tmp_path) not in text and DATA_DIR not in text
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert 'OUT_DIR = "run/notebooks/00_alpha"' in text and 'DATA_ROOT = "DATA_ROOT"' in text
    assert "wrote run/notebooks/00_alpha/metrics.json" in text
    assert nbformat.read(out / "ipynb" / "00_alpha.ipynb", as_version=4).cells[4].source.count("run/notebooks") == 1
    assert plumbing_cells(nbformat.read(fake_run["run"] / "notebooks" / "00_alpha" / "00_alpha.ipynb",
                                        as_version=4)) == [1, 2, 3, 4]


def test_plumbing_is_only_the_leading_setup():
    nb = new_notebook(cells=[new_markdown_cell("# t"), new_code_cell("import os"),
                             new_code_cell("x = 1", metadata={"tags": ["parameters"]}), new_code_cell("y = x"),
                             new_code_cell("import math")])
    assert plumbing_cells(nb) == [1, 2]  # a later import belongs to the text
    assert plumbing_cells(new_notebook(cells=[new_markdown_cell("# t"), new_code_cell("x = 1")])) == []


def test_path_scrubber_writes_paths_as_a_reader_passes_them(tmp_path):
    from pathlib import Path

    run = tmp_path / "myrun"
    scrub = path_scrubber(run, {"DATA_ROOT": "/srv/data/real", "SCALE": "cpu"}, repo="/work/checkout")
    assert scrub(f'OUT_DIR = "{run}/notebooks/03_gem"') == 'OUT_DIR = "myrun/notebooks/03_gem"'
    assert scrub(f"results in {run}: done.") == "results in myrun: done."
    assert scrub("read /srv/data/real/real171/manifest.json") == "read DATA_ROOT/real171/manifest.json"
    assert scrub("/work/checkout/retrieval_lib/x.py:3") == "./retrieval_lib/x.py:3"
    assert scrub("/opt/venv/lib/python3.11/site-packages/torch/nn/f.py:12: Warn") == \
        "site-packages/torch/nn/f.py:12: Warn"
    assert scrub(f"{Path.home()}/.cache/retrieval_lib/features") == "~/.cache/retrieval_lib/features"
    assert scrub("/usr/lib/python3.11/warnings.py") == "…/python3.11/warnings.py"
    assert scrub("mAP/gem 1/2 https://x.org/tmp/a and/or </div>") == "mAP/gem 1/2 https://x.org/tmp/a and/or </div>"


def test_each_page_links_its_executed_notebook_and_colab(built):
    _, site = built
    out = site["index"].parent
    for name in ("00_alpha", "01_beta"):
        page = (out / f"{name}.html").read_text()
        assert f'href="ipynb/{name}.ipynb"' in page and html.escape(colab_url(name)) in page
        assert (out / "ipynb" / f"{name}.ipynb").is_file()


def test_headline_comparisons_read_both_forms():
    found = {c["label"]: c for c in headline_comparisons({"ours": METRICS_OURS, "extra": METRICS_EXTRA})}
    assert sorted(found) == ["gap/gem-mac", "held_delta", "study / comparisons at dims = 16",
                             "study / comparisons at dims = 8"]  # lonely_ci_low has no partner: left out
    assert found["gap/gem-mac"]["ci"] == (0.05, 0.31) and found["gap/gem-mac"]["verdict"].startswith("higher")
    assert found["held_delta"]["verdict"].startswith("within the noise")
    assert found["study / comparisons at dims = 8"]["verdict"].startswith("lower") and \
        found["study / comparisons at dims = 8"]["n"] == 8
    assert found["study / comparisons at dims = 16"]["verdict"] == "identical"


def test_front_page_leads_with_what_was_measured(built, fake_run):
    _, site = built
    index = site["index"].read_text()
    order = [index.index(s) for s in ('id="measured"', "MAC_offtheshelf_row", 'id="headline"', 'id="comparisons"',
                                      'id="paper"', 'id="notebooks"', 'id="results"')]
    assert order == sorted(order)
    measured_part = index[index.index('id="headline"'): index.index('id="paper"')]
    assert "GeM p=3 <b>0.512</b>" in measured_part and "MAC <b>0.300</b>" in measured_part
    assert "+0.050 … +0.310" in measured_part and "dims = 8" in measured_part
    paper = index[index.index('id="paper"'): index.index('id="notebooks"')]
    same = paper[paper.index('id="same-setting"'): paper.index("<details")]
    assert "Same-setting paper" in same and "0.600" in same and "0.512" in same and "-0.088" in same
    assert "Other paper" not in same
    folded = paper[paper.index("<details"):]
    assert "2 paper numbers with no comparable measurement" in folded and "Other paper" in folded
    assert "Third paper" in folded and "differ" in folded
    assert 'id="networks"' not in index  # no paper_networks.json in this run
    assert "<details" in index[index.index('id="results"'):] and "mAP/gem_zeta" in index


def test_released_network_rows_come_first_when_the_run_has_them(fake_run, tmp_path):
    """Both layouts of paper_networks.json: flat rows, and per network its ``rows`` (mAP in %, ``difference``)."""
    flat = [{"network": "rSfM120k-tl-resnet101-gem-w", "dataset": "roxford5k", "protocol": "mAP medium",
             "paper": 0.647, "ours": None, "diff": None, "same_setting": False},
            {"network": "gl18-tl-resnet101-gem-w", "dataset": "roxford5k", "protocol": "mAP medium", "paper": 0.677,
             "ours": 0.675, "diff": -0.002, "same_setting": True}]
    (fake_run["run"] / "paper_networks.json").write_text(json.dumps(flat))
    index = build_site(fake_run["run"], tmp_path / "site_nets")["index"].read_text()
    paper = index[index.index('id="paper"'):]
    assert paper.index('id="networks"') < paper.index("Same-setting paper")
    nets = paper[paper.index('id="networks"'): paper.index("</table>")]
    assert nets.index("gl18-tl-resnet101-gem-w") < nets.index("rSfM120k-tl-resnet101-gem-w")  # same setting first
    assert "-0.002" in nets and "0.675" in nets
    nested = [{"network": "x", "rows": [
        {"network": "retrievalSfM120k-resnet101-gem", "dataset": "rparis6k", "protocol": "hard", "paper": 53.0,
         "ours": 51.75, "difference": -1.25, "same_setting": False, "differences": ["stand-in data (12 images)"]},
        {"network": "retrievalSfM120k-resnet101-gem", "dataset": "roxford5k", "protocol": "medium", "paper": 64.7,
         "ours": 64.71, "difference": 0.01, "same_setting": True, "differences": []}]}]
    (fake_run["run"] / "paper_networks.json").write_text(json.dumps(nested))
    index = build_site(fake_run["run"], tmp_path / "site_nested")["index"].read_text()
    nets = index[index.index('id="networks"'):]
    nets = nets[: nets.index("</table>")]
    assert "paper (%)" in nets and "64.7" in nets and "+0.0" in nets and "-1.2" in nets
    assert nets.index("roxford5k") < nets.index("rparis6k") and "no: stand-in data (12 images)" in nets


def test_an_equation_that_cannot_convert_is_shown_as_source_and_reported(tmp_path, capsys):
    from retrieval_lib.__main__ import main

    run = tmp_path / "run"
    _write(run, "00_odd", _executed([new_markdown_cell("# 00 · Odd\n\nA macro nobody knows: $a + \\foo{b}$."),
                                     new_code_cell("x = 1")]))
    site = build_site(run, tmp_path / "site")
    assert [tex for tex, _ in site["pages"][0]["math_failures"]] == ["a + \\foo{b}"]
    page = (tmp_path / "site" / "00_odd.html").read_text()
    assert '<code class="rl-tex-error" title="not converted">a + \\foo{b}</code>' in page
    assert main(["site", "--from", str(run), "--out", str(tmp_path / "cli")]) == 0
    assert "00_odd: an equation is shown as its source" in capsys.readouterr().out


def test_a_page_of_widgets_is_walked_through_its_boxes():
    """10_explorer's app: nested boxes, display-only models and a grid of numbered thumbnail buttons."""
    from retrieval_lib.book.site_cells import _controls

    def m(name, **state):
        return {"model_name": name, "state": state}

    state = {
        "app": m("VBoxModel", children=["IPY_MODEL_top", "IPY_MODEL_t0", "IPY_MODEL_t1", "IPY_MODEL_t2", "IPY_MODEL_out"]),
        "top": m("HBoxModel", children=["IPY_MODEL_dd", "IPY_MODEL_note", "IPY_MODEL_k"]),
        "dd": m("DropdownModel", description="collection", _options_labels=["a", "b"], index=1),
        "note": m("HTMLModel", value="<b>hi</b>"),
        "k": m("IntSliderModel", description="k (results per row)", min=1, max=8, value=4),
        **{f"t{i}": m("VBoxModel", children=[f"IPY_MODEL_img{i}", f"IPY_MODEL_b{i}"]) for i in range(3)},
        **{f"img{i}": m("ImageModel") for i in range(3)},
        **{f"b{i}": m("ButtonModel", description=f"#{i}") for i in range(3)},
        "out": m("OutputModel"),
        "lay": m("LayoutModel"),
    }
    got = _controls("app", state)
    assert got == [{"kind": "Dropdown", "description": "collection", "options": ["a", "b"], "value": "b"},
                   {"kind": "IntSlider", "description": "k (results per row)", "min": 1, "max": 8, "value": 4},
                   {"kind": "Button", "description": "3 buttons (#0 … #2)"}]
    # a live_figure: a VBox of sliders and an Output, as before
    state["lf"] = m("VBoxModel", children=["IPY_MODEL_k", "IPY_MODEL_out"])
    assert _controls("lf", state) == [got[1]]
