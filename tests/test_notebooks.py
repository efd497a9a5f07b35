"""Every numbered notebook: house structure, clean commits, and what a smoke-scale run shows.

The executed notebooks are those of the README's main command
(``python -m retrieval_lib reproduce --scale smoke --out results``, the ``readme_run``
fixture in conftest.py): papermill, the offline default, the inline matplotlib backend a
Jupyter user gets, and reproduce's per-cell timeout. For each notebook this checks its
``metrics.json`` against what the notebook promises (``CHECKS`` below) and its cells:
no errors, a figure wherever a cell draws, no progress widgets, no stray ``PosixPath``
reprs. nbval executes every notebook a second time, independently (``notebooks/conftest.py``).
"""
import ast
import json
import math
import os
import re
from pathlib import Path

import pytest

from retrieval_lib.book.widget_check import read_checks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SMOKE_SECONDS = 90  # the target is 30 s on a 2-core laptop; this leaves room for a noisy CI machine
CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"
WIDGET = "application/vnd.jupyter.widget-view+json"
WIDGET_HELPERS = ("live_figure(", ".app()")  # viz.live_figure, and the page of book.explorer.Explorer.app
TQDM_REPR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")  # "  0%|          | 0/40 [00:00<?, ?img/s]"


def _load(nb):
    with open(nb, encoding="utf-8") as f:
        return json.load(f)


def _code_cells(doc):
    return [c for c in doc["cells"] if c["cell_type"] == "code"]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _checked(cell):
    """Whether nbval compares this cell's committed output (a line ``# NBVAL_CHECK_OUTPUT``)."""
    return any(line.strip() == CHECK_OUTPUT for line in _src(cell).splitlines())


def _fraction(x):
    return x is not None and 0.0 <= x <= 1.0


def _check_offtheshelf(ours, names):
    for name in names:
        assert _fraction(ours[f"mAP/{name}"]), (name, ours.get(f"mAP/{name}"))


CGD_CONFIGS = ("gem_untrained", "S", "M", "G", "SM", "MG", "SG", "SMG")  # what 07 trains and scores

# What each notebook promises in its metrics.json (keys and ranges robust at smoke scale).
CHECKS = {
    "00_pipeline": lambda o: (
        _check_offtheshelf(o, ["gem"]),
        # the hand-worked AP examples (with and without a junk image) equal the library's exactly
        pytest.approx(o["ap_by_hand"], abs=1e-12) == o["ap_library"],
        pytest.approx(o["ap_by_hand_plain"], abs=1e-12) == o["ap_library_plain"],
        # PNPPNNNPNN: trapezoid AP 463/672 is below the textbook AP (1 + 2/3 + 3/4 + 1/2) / 4
        pytest.approx(463 / 672, abs=1e-12) == o["ap_by_hand_plain"],
        o["ap_by_hand_plain"] < o["ap_textbook_plain"],
        # removing a junk image ranked above three positives can only raise AP
        o["ap_by_hand"] > o["ap_by_hand_plain"],
    ),
    "01_mac": lambda o: (
        _check_offtheshelf(o, ["mac"]),
        # EfficientNet-Lite0's theoretical receptive field; the effective one is far smaller
        o["rf_theoretical_px"] == 851 and o["rf_stride_px"] == 32,
        0 < o["erf_mean_px"] < o["rf_theoretical_px"],
        0 < o["top_k_share_same_place"] <= 1 and 0 < o["top_k_share_other_place"] <= 1,
        0 < o["similarity_other_place"] <= 1 and 0 < o["similarity_same_place"] <= 1,
    ),
    "02_spoc": lambda o: (
        _check_offtheshelf(o, ["spoc", "spoc_center", "mac"]),
        # the per-query APs behind the win/loss comparison average to the benchmark's mAP
        abs(o["mean_query_ap/spoc"] - o["mAP/spoc"]) < 1e-9,
        abs(o["mean_query_ap/mac"] - o["mAP/mac"]) < 1e-9,
        o["n_spoc_wins"] + o["n_spoc_losses"] + o["n_ties"] == o["n_queries"] > 0,
        # the size sweep at the default input size re-measures the descriptors of section 2
        o["size_sweep_default_gap"] < 1e-12,
        0.0 <= o["self_sim_min/spoc"] <= 1.0 + 1e-6,
    ),
    "03_gem": lambda o: (
        _check_offtheshelf(o, ["gem_p1", "gem_p3", "spoc", "mac", "gem_best"]),
        o["grad_max_abs_err"] < 1e-8,
        # p = 1 is SPoC: the notebook measures both and they must agree
        abs(o["mAP/gem_p1"] - o["mAP/spoc"]) < 1e-6,
        # the best of the sweep is at least as good as any swept p
        o["mAP/gem_best"] >= max(o["mAP/gem_p1"], o["mAP/gem_p3"]) - 1e-12,
        # learnable p: Adam lowers the training loss and moves p away from its start
        o["loss_after"] < o["loss_before"],
        abs(o["p_learned"] - o["p_init"]) > 1e-3,
        _fraction(o["mAP/heldout_before"]) and _fraction(o["mAP/heldout_after"]),
    ),
    "04_rmac": lambda o: (
        _check_offtheshelf(o, ["rmac_L3", "mac", "mac_ms", "rmac_L3_ms", "rmac_L3_ms_qe", "rmac_L3_ms_dba",
                               "rmac_L3_ms_dba_qe", "rmac_L1", "rmac_regions_only_L1"]),
        o["n_regions_4x3_L3"] == 20,
        # R-MAC summed by hand from the unit-length region MACs equals functional.rmac
        o["rmac_by_hand_max_abs_err"] < 1e-5,
        # the mAP-vs-L sweep at L = 3 and pooling with RMAC(L=3) are the same descriptor
        o["rmac_L3_sweep_abs_diff"] < 1e-9,
        # every feature map is ceil(image size / 32), as regional.fmap_size says
        o["fmap_size_matches"] == 1.0,
    ),
    "05_wgem": lambda o: (
        _check_offtheshelf(o, ["heldout/gem_untrained", "heldout/gem", "heldout/wgem"]),
        o["p/wgem"] > 1.0,
        # mask mass inside the pasted object's box, and the share a uniform mask puts there
        _fraction(o["mask_mass_in_box/before"]) and _fraction(o["mask_mass_in_box/after"]),
        0 < o["box_area_share"] < 1,
    ),
    "06_darac": lambda o: (
        _check_offtheshelf(o, ["heldout/rmac", "heldout/gordo_pca", "heldout/gordo", "heldout/darac_untrained",
                               "heldout/darac", "heldout/darac_triplet", "heldout/darac_smoothap",
                               "heldout/darac_nra"]),
        # untrained DARAC = the normalised plain sum of its 42 vectors, on every real map
        o["untrained_plain_sum_max_abs_err"] < 1e-6,
        # max-only DARAC = R-MAC with the whole map where R-MAC's grid is the layout (None: no such map)
        o["rmac_reproduction_max_abs_err"] is None or o["rmac_reproduction_max_abs_err"] < 1e-9,
    ),
    "07_cgd": lambda o: (
        all(_fraction(o[f"{m}/heldout/{c}"]) for m in ("R@1", "R@8", "mAP") for c in CGD_CONFIGS),
        # Recall@K never falls as K grows
        all(o[f"R@1/heldout/{c}"] <= o[f"R@2/heldout/{c}"] <= o[f"R@4/heldout/{c}"] <= o[f"R@8/heldout/{c}"]
            for c in CGD_CONFIGS),
        all(o[f"R@1/heldout/{c}/min"] <= o[f"R@1/heldout/{c}"] <= o[f"R@1/heldout/{c}/max"]
            for c in ("S", "MG", "SMG")),
        o["block_norm_max_err"] < 1e-12,  # every branch's block has norm 1/sqrt(n) before the final L2
        o["power_mean_order_holds"] == 1.0,  # SPoC <= GeM(3) <= MAC on every live channel
        o["aux_effect_max_abs/without_scale"] == 0.0,  # frozen backbone: the auxiliary loss cannot move it
    ),
    "08_whitening": lambda o: (
        _check_offtheshelf(o, ["heldout/gem/none", "heldout/gem/pca", "heldout/gem/lw", "heldout/gem/zca",
                               "heldout/rmac/none", "heldout/rmac/pca", "heldout/gem/fp16"]),
        # whitened training descriptors have identity covariance; Euclidean after = Mahalanobis before
        o["whitened_cov_max_abs_err"] < 1e-5, o["mahalanobis_max_rel_err"] < 1e-6,
        # ZCA = U x PCA whitening: same distances, cosines, rankings and mAP at full dimension
        o["zca_minus_rotated_pca_max_abs"] < 1e-5, o["pca_zca_cosine_max_abs_diff"] < 1e-6,
        o["pca_zca_same_ranking_share"] == 1.0,
        abs(o["mAP/heldout/gem/pca_full"] - o["mAP/heldout/gem/zca_full"]) < 1e-9,
        o["lw_fc_max_abs_err"] < 1e-4,  # Lw as nn.Linear inside RetrievalNet = Whitening.apply
        o["bytes/gem/fp16"] == 2 * o["dim"] and o["bytes/gem/fp32"] == 4 * o["dim"],
        any(k.startswith("mAP/heldout/gem/pq") for k in o),  # faiss is installed by requirements.txt
    ),
    "09_reproductions": lambda o: (
        _check_offtheshelf(o, ["offtheshelf/MAC", "offtheshelf/SPoC", "offtheshelf/GeM (p=3)",
                               "offtheshelf/R-MAC (L=3)"]),
        # it read the README run's results, written by every notebook before it
        o["results_found"] == 1.0 and o["n_notebooks_found"] == len([nb for nb in NOTEBOOKS if nb.stem < "09"]),
        o["n_papers"] >= 7 and o["n_quoted"] <= o["n_paper_numbers"],
        0 <= o["n_same_setting"] <= o["n_beside_ours"] <= o["n_paper_numbers"],
        o["n_same_setting"] == 0,  # smoke: nothing is measured in a paper's setting
        o["n_uncatalogued"] == 0,  # every paper number a notebook cites is in report.paper_catalogue()
    ),
    "10_explorer": lambda o: (
        o["n_images"] >= 2 and o["n_collections_offered"] >= 1,
        o["rows_match_bruteforce"] == 1.0,  # every descriptor's row is the brute-force top-k without the query
        o["rmac_sum_abs_err"] < 1e-5,  # R-MAC's region contributions add up to its score
        o["bad_inputs_tried"] == 7 and o["bad_inputs_with_message"] == 7,  # each bad input said in the page
        all(0 < o[f"redraw_s/{k}"] < 30 for k in ("click_thumbnail", "p_slider", "L_slider", "k_slider", "compare",
                                                  "why_mac", "why_gem", "why_rmac")),
    ),
}


# ---------------------------------------------------------------- which cells draw
DRAWING = re.compile(r"^(plt\.(show|figure|subplots|imshow|plot|bar|hist)|show_\w+)$")


def _callee(node):
    """``plt.show`` for ``plt.show(...)``, ``draw`` for ``draw(...)``; None for anything else."""
    f = node.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return None


def _calls(node, *, conditional: bool):
    """Names called in ``node``; inside function bodies never, inside ``if`` only when asked."""
    skip = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
    skip_if = () if conditional else (ast.If, ast.IfExp, ast.Try)
    todo = list(ast.iter_child_nodes(node))
    while todo:
        n = todo.pop()
        if isinstance(n, skip) or isinstance(n, skip_if):
            continue
        if isinstance(n, ast.Call) and _callee(n):
            yield _callee(n)
        todo.extend(ast.iter_child_nodes(n))


def drawing_cells(cells):
    """Indices of the code cells that always draw a figure when they run.

    A cell draws when, outside any ``if``, it calls ``plt.show``/``plt.subplots``/..., a
    ``show_*`` helper of ``retrieval_lib.book.viz``, or a function defined in the notebook
    that does one of these (e.g. ``draw_grid``). Defining a function draws nothing.
    """
    trees = [ast.parse(_src(c)) for c in cells]
    draws = set()
    functions = {f.name: f for t in trees for f in ast.walk(t) if isinstance(f, ast.FunctionDef)}
    changed = True
    while changed:  # functions that draw, directly or through other notebook functions
        changed = False
        for name, f in functions.items():
            if name not in draws and any(DRAWING.match(c) or c in draws
                                         for s in f.body for c in _calls(ast.Module([s], []), conditional=True)):
                draws.add(name)
                changed = True
    return [i for i, t in enumerate(trees) if any(DRAWING.match(c) or c in draws for c in _calls(t, conditional=False))]


# ---------------------------------------------------------------- the committed notebooks
def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"


def test_every_notebook_has_checks():
    missing = [nb.stem for nb in NOTEBOOKS if nb.stem not in CHECKS]
    assert not missing, f"add the promised metrics of {missing} to CHECKS in tests/test_notebooks.py"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(nb):
    """No outputs or counts, except on cells nbval compares: those must carry both."""
    doc = _load(nb)
    for i, cell in enumerate(_code_cells(doc)):
        if _checked(cell):
            # nbval skips a cell whose execution_count is null, so a checked cell needs one
            assert cell.get("outputs") and cell.get("execution_count") is not None, \
                f"{nb.name}: code cell {i} is marked {CHECK_OUTPUT} but has no committed output to compare"
            kinds = {o["output_type"] for o in cell["outputs"]}
            assert kinds <= {"stream", "display_data"}, f"{nb.name}: code cell {i} commits {kinds}"
            assert not any("image/png" in o.get("data", {}) for o in cell["outputs"]), \
                f"{nb.name}: code cell {i} commits an image (nbval does not compare images)"
        else:
            assert not cell.get("outputs"), f"{nb.name}: code cell {i} carries outputs (strip them)"
            assert cell.get("execution_count") is None, f"{nb.name}: code cell {i} has an execution count"
    assert "widgets" not in doc.get("metadata", {}), f"{nb.name}: notebook metadata carries widget state"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_house_structure(nb):
    doc = _load(nb)
    cells = _code_cells(doc)
    assert doc["cells"][0]["cell_type"] == "markdown", "the first cell is the title + paper + what you learn"
    assert "google.colab" in _src(cells[0]), "the first code cell is the Colab-only install"
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters`"
    params = _src(tagged[0])
    for name in ("SCALE", "DATA_ROOT", "OUT_DIR", "DEVICE", "SEED"):
        assert f"{name} =" in params, f"parameters cell lacks {name}"
    # nbval injects no parameters: the scale and the data must come from the environment
    for name, var in (("SCALE", "RETRIEVAL_SCALE"), ("DATA_ROOT", "RETRIEVAL_DATA")):
        assert re.search(rf"^{name} = os\.environ\.get\(\"{var}\"", params, re.M), \
            f"the parameters cell must read {name} from os.environ.get({var!r}, ...)"
    for forbidden in ("open(", "read_", "load", "extract"):
        assert forbidden not in params, f"the parameters cell does I/O ({forbidden!r}); literals and env reads only"
    body = "\n".join(_src(c) for c in cells)
    assert "sys.path" not in body, "notebooks must not edit sys.path; install the package instead"
    assert "write_metrics" in _src(cells[-1]), "the last cell writes metrics.json"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_widget_helper(nb):
    """Sliders go through viz.live_figure, never ipywidgets.interact/interactive.

    ``interactive`` calls the function while building the widget and draws the figure
    into an output widget; with the inline backend papermill then waits on that cell
    until its timeout (forever without one), and the saved notebook shows no figure.
    """
    for i, cell in enumerate(_code_cells(_load(nb))):
        found = re.findall(r"\b(interactive|interact|interact_manual)\s*\(", _src(cell))
        assert not found, f"{nb.name}: code cell {i} uses ipywidgets.{found[0]}; use viz.live_figure"


def test_drawing_cells_are_found():
    """The figure check below knows which cells draw (a hand-made notebook)."""
    cells = [{"source": s} for s in (
        "def draw(k=1):\n    show_ranked(q, r)\n    plt.show()\n",              # 0 defines only
        "draw()\ndisplay(live_figure(draw, k=IntSlider()))",                  # 1 draws through draw
        "display(live_figure(draw, k=IntSlider()))",                          # 2 widget only
        "for a in (1, 2):\n    draw(a)",                                      # 3 in a loop
        "if labels is not None:\n    plt.figure(); plt.show()",               # 4 maybe
        "fig, ax = plt.subplots()\nax.plot([1, 2])",                          # 5 shown at cell end
        "x = 1\nprint(x)",                                                    # 6 nothing
    )]
    assert drawing_cells(cells) == [1, 3, 5]


# ---------------------------------------------------------------- the executed notebooks
def _executed(readme_run, nb):
    """The executed copy of ``nb`` from the README run, and its metrics.json document."""
    found = list(readme_run.root.glob(f"results/notebooks/**/{nb.name}"))
    if not found:
        pytest.fail(f"the README run left no executed {nb.name} (exit code {readme_run.returncode}):\n"
                    f"{readme_run.tail(30)}")
    executed = found[0]
    metrics = [p for p in readme_run.root.glob("results/notebooks/**/metrics.json")
               if json.loads(p.read_text()).get("notebook") == nb.stem]
    return _load(executed), (json.loads(metrics[0].read_text()) if metrics else None)


def _executed_code_cells(doc):
    """Code cells of an executed notebook without papermill's injected-parameters cell."""
    return [c for c in _code_cells(doc) if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_without_errors(nb, readme_run):
    doc, _ = _executed(readme_run, nb)
    for i, cell in enumerate(_executed_code_cells(doc)):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", \
                f"{nb.name}: code cell {i} raised {out.get('ename')}: {out.get('evalue')}"
            if out["output_type"] == "stream" and out["name"] == "stderr":
                assert "Traceback" not in out["text"], f"{nb.name}: code cell {i} printed a traceback:\n{out['text']}"


def _text_outputs(cell) -> str:
    """What a cell printed or returned as text (stdout and text/plain), as nbval compares it."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out["name"] == "stdout":
            parts.append(_src({"source": out["text"]}))
        elif out["output_type"] in ("execute_result", "display_data") and "text/plain" in out.get("data", {}):
            parts.append(_src({"source": out["data"]["text/plain"]}))
    return "".join(parts)


def checked_output_mismatches(committed: dict, executed: dict) -> list:
    """The ``# NBVAL_CHECK_OUTPUT`` cells whose executed text differs from the committed one.

    Cells are matched by their source (papermill's injected-parameters cell shifts indices).
    Returns ``(cell source head, committed text, executed text)`` per mismatch; a checked cell
    the executed copy lacks is a mismatch with executed text ``None``.
    """
    ran = {_src(c): c for c in _executed_code_cells(executed)}
    bad = []
    for cell in _code_cells(committed):
        if not _checked(cell):
            continue
        want = _text_outputs(cell)
        got = ran.get(_src(cell))
        got_text = None if got is None else _text_outputs(got)
        if got_text != want:
            bad.append((_src(cell)[:120], want, got_text))
    return bad


def test_the_checked_output_comparison_can_fail():
    cell = {"cell_type": "code", "source": "# NBVAL_CHECK_OUTPUT\nprint(1)", "metadata": {},
            "outputs": [{"output_type": "stream", "name": "stdout", "text": "1\n"}]}
    same = {"cells": [cell]}
    other = {"cells": [dict(cell, outputs=[{"output_type": "stream", "name": "stdout", "text": "2\n"}])]}
    assert checked_output_mismatches(same, same) == []
    assert checked_output_mismatches(same, other) == [(cell["source"][:120], "1\n", "2\n")]
    assert checked_output_mismatches(same, {"cells": []})[0][2] is None


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_checked_outputs_match_the_committed_ones(nb, readme_run):
    """Cells marked ``# NBVAL_CHECK_OUTPUT`` print, in the README run, exactly what the committed file holds."""
    doc, _ = _executed(readme_run, nb)
    bad = checked_output_mismatches(_load(nb), doc)
    assert not bad, "\n".join(f"{nb.name}: checked cell {src!r}\n  committed: {want!r}\n  executed:  {got!r}"
                              for src, want, got in bad)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_shows_its_figures(nb, readme_run):
    """Every cell that draws holds a PNG: the figures reach the reader with Jupyter's inline backend."""
    doc, _ = _executed(readme_run, nb)
    cells = _executed_code_cells(doc)
    expected = drawing_cells(cells)
    assert expected, f"{nb.name}: no cell draws a figure"
    missing = [i for i in expected if not any("image/png" in o.get("data", {}) for o in cells[i].get("outputs", []))]
    assert not missing, (f"{nb.name}: code cells {missing} draw a figure but hold no image/png output "
                         f"(first: {_src(cells[missing[0]])[:200]!r})")
    state = json.dumps(doc.get("metadata", {}).get("widgets", {}))
    assert "image/png" not in state, f"{nb.name}: a figure was drawn into a widget's state (use viz.live_figure)"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_without_noise(nb, readme_run):
    """No progress widgets (they show '0%| 0/171' in a static notebook) and no stray ``PosixPath(...)``."""
    doc, _ = _executed(readme_run, nb)
    for i, cell in enumerate(_executed_code_cells(doc)):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text = "".join(data.get("text/plain", ""))
            if WIDGET in data:
                assert not TQDM_REPR.search(text), f"{nb.name}: code cell {i} shows a progress widget: {text!r}"
                assert any(h in _src(cell) for h in WIDGET_HELPERS), \
                    f"{nb.name}: code cell {i} shows a widget {text[:80]!r} outside viz.live_figure or the explorer"
            assert "PosixPath(" not in text, (f"{nb.name}: code cell {i} ends with a path's repr {text!r}; "
                                              "end the line with ';'")


LIVE_NOTEBOOKS = [nb for nb in NOTEBOOKS if "live_figure(" in nb.read_text(encoding="utf-8")]


@pytest.mark.parametrize("nb", LIVE_NOTEBOOKS, ids=lambda p: p.stem)
def test_every_live_widget_redraws(nb, readme_run):
    """In the README run each control of each ``live_figure`` was moved once (book/widget_check.py):
    the redraw raised nothing and drew a figure. The browser test moves them through JupyterLab."""
    records = [r for r in read_checks(readme_run.widget_log) if r["notebook"] == nb.stem]
    built = sum(_src(c).count("live_figure(") for c in _code_cells(_load(nb)))
    assert records, (f"{nb.name} builds {built} live figure(s) but the README run recorded no widget check "
                     f"(exit code {readme_run.returncode})")
    broken = [r for r in records if r["moved"] and (r["error"] or not r["drew"])]
    assert not broken, "\n".join(f"{nb.name}: moving {r['control']!r} ({r['kind']}) to {r['value']} "
                                 f"{'raised ' + r['error'] if r['error'] else 'drew no figure'}" for r in broken)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_at_smoke_scale(nb, readme_run):
    doc, metrics = _executed(readme_run, nb)
    assert metrics is not None, f"{nb.name} wrote no metrics.json in the README run"
    assert metrics["scale"] == "smoke"
    ours = metrics["ours"]
    for key, value in ours.items():
        if key.split("/")[0] in ("mAP", "R@1", "mP@1", "mP@5", "mP@10"):
            assert _fraction(value), f"{key} = {value} is not a fraction"
        if isinstance(value, float):
            assert math.isfinite(value), f"{key} = {value}"
    results = CHECKS[nb.stem](ours)
    if isinstance(results, tuple):
        for i, ok in enumerate(results):
            assert ok is None or ok is True or bool(ok), f"{nb.stem}: promised check {i} failed: {ours}"
    seconds = doc["metadata"]["papermill"]["duration"]
    assert seconds < SMOKE_SECONDS or os.environ.get("RETRIEVAL_NO_TIME_LIMIT"), \
        f"{nb.stem} took {seconds:.0f} s at smoke scale (limit {SMOKE_SECONDS} s, target 30 s)"
