"""The interactive path in a real browser: JupyterLab 4 + headless Chromium (selenium).

One JupyterLab server runs on a copy of the widget notebooks of ``LAB_NOTEBOOKS`` (02 and 03
by default, see ``lab_notebooks``; autosave would otherwise write into the checkout), at smoke scale on the offline default, with the
feature cache the README's smoke run (the ``readme_run`` fixture, which the notebook tests
need anyway) filled: the notebooks read their feature maps instead of extracting them again.
Each notebook is opened in the same page, all its cells are run (the notebook's
"Run All Cells" command), and once every cell has run and every widget has attached,
one slider per widget cell is moved **with the keyboard** (the handle is focused and
gets an arrow key: a click would nudge it), and the figure must be redrawn below it (a
new, decoded image in the widget's output) with no error anywhere: no error output, no
traceback inside a widget, no "Error displaying widget". Each control's label must be
shown in full and read ``"name (unit)"``.

What made this hard by hand, and what the test does about it: cells attach in stages
(wait until every cell is in the page and every widget has rendered); earlier tabs reopen
(a fresh workspace folder and ``?reset``); off-screen cells are left out of ``innerText``
(``textContent`` is read); a click nudges a slider (focus + arrow key); autosave writes
into the notebooks (a copy, autosave off); the news toast covers a corner (news and update
checks off). ``test_the_live_check_catches_a_broken_redraw`` runs the same check on a
small notebook whose redraws fail, so the check is shown to fail when it should.

Without Chromium, chromedriver or selenium these tests skip with the reason, except under
CI (``CI=true``), where they fail.
"""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from _browser import artefact_dir, require_browser, start_chrome
from test_sliders import control_calls

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
WIDGET_NOTEBOOKS = [nb for nb in NOTEBOOKS if "live_figure(" in nb.read_text(encoding="utf-8")]
# What runs here by default: two notebooks whose controls are every kind the curriculum uses
# (ToggleButtons and IntSlider in 02, FloatLogSlider in 03). Every widget goes through the one
# helper viz.live_figure (test_notebooks.test_one_widget_helper), and every control of every
# notebook is moved once, headless, in the README run (test_notebooks.test_every_live_widget_redraws),
# so the browser is left to check what only a browser can: the front end draws the controls and a
# moved one redraws its figure. RETRIEVAL_BROWSER_NOTEBOOKS=all runs every widget notebook here
# (about half a minute each at smoke on 2 cores), or a comma list of names (02_spoc,05_wgem).
DEFAULT_LAB_NOTEBOOKS = ("02_spoc", "03_gem")


def lab_notebooks(choice=None) -> list:
    """The widget notebooks the browser runs: ``DEFAULT_LAB_NOTEBOOKS``, ``"all"`` or a comma list."""
    choice = os.environ.get("RETRIEVAL_BROWSER_NOTEBOOKS", "") if choice is None else choice
    if choice.strip() == "all":
        return list(WIDGET_NOTEBOOKS)
    names = [n.strip() for n in choice.split(",") if n.strip()] or list(DEFAULT_LAB_NOTEBOOKS)
    known = {nb.stem: nb for nb in WIDGET_NOTEBOOKS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"RETRIEVAL_BROWSER_NOTEBOOKS: no widget notebook {unknown}; there are {sorted(known)}")
    return [known[n] for n in names]


LAB_NOTEBOOKS = lab_notebooks()
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
LABEL = re.compile(r"^\S[^()]*\s\(\S[^()]*\)$")  # "name (unit or meaning)", as tests/test_sliders.py
RUN_TIMEOUT_S = 300   # one notebook at smoke scale (the target is 30 s; CI machines are loaded)
REDRAW_TIMEOUT_S = 60
SETTINGS = {  # JupyterLab user settings for the test's server only
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}

# ---------------------------------------------------------------- the page, read with JavaScript
NOTEBOOK_STATE = """
const app = window.jupyterapp;
if (!app) return {ready: false, why: 'JupyterLab is still loading'};
const panel = app.shell.currentWidget;
if (!panel || !panel.content || !panel.sessionContext || !panel.context)
  return {ready: false, why: 'no notebook in front'};
if (panel.context.path !== arguments[0]) return {ready: false, why: 'front notebook is ' + panel.context.path};
const kernel = panel.sessionContext.session ? panel.sessionContext.session.kernel : null;
const cells = panel.content.widgets;
let code = 0, done = 0, errors = [], widgetCells = [];
cells.forEach((c, i) => {
  if (c.model.type !== 'code' || !c.model.sharedModel.getSource().trim()) return;
  code += 1;
  if (c.model.executionCount !== null && c.model.executionCount !== undefined) done += 1;
  const outs = c.model.outputs;
  for (let j = 0; j < outs.length; j++) {
    const o = outs.get(j).toJSON();
    if (o.output_type === 'error') errors.push('cell ' + i + ': ' + o.ename + ': ' + o.evalue);
    if (o.data && o.data['application/vnd.jupyter.widget-view+json']) widgetCells.push(i);
  }
});
const attached = cells.filter(c => c.node.isConnected).length;
const rendered = widgetCells.filter(i => cells[i].node.querySelector('.widget-vbox .widget-output')).length;
const text = panel.content.node.textContent;
return {ready: panel.context.isReady, kernel: kernel ? kernel.status : null, code: code, done: done,
        errors: errors, widgetCells: widgetCells, rendered: rendered, attached: attached, cells: cells.length,
        widgetErrors: (text.match(/Error displaying widget[^\\n]{0,200}|Error rendering[^\\n]{0,200}/g) || [])};
"""

CONTROLS = """
const panel = window.jupyterapp.shell.currentWidget;
const node = panel.content.widgets[arguments[0]].node;
const box = node.querySelector('.widget-vbox');
const controls = Array.from(box.children).filter(el => !el.classList.contains('widget-output'));
return controls.map(el => {
  const label = el.querySelector('.widget-label');
  const handle = el.querySelector('.noUi-handle');
  const readout = el.querySelector('.widget-readout');
  return {label: label ? label.textContent : '', readout: readout ? readout.textContent : null,
          cut: label ? label.scrollWidth > label.clientWidth + 1 : false,
          slider: !!handle,
          now: handle ? Number(handle.getAttribute('aria-valuenow')) : null,
          min: handle ? Number(handle.getAttribute('aria-valuemin')) : null,
          max: handle ? Number(handle.getAttribute('aria-valuemax')) : null,
          buttons: Array.from(el.querySelectorAll('button')).map(b => b.classList.contains('mod-active'))};
});
"""

WIDGET_OUTPUT = """
const panel = window.jupyterapp.shell.currentWidget;
const out = panel.content.widgets[arguments[0]].node.querySelector('.widget-vbox .widget-output');
const imgs = Array.from(out.querySelectorAll('img'));
return {images: imgs.filter(i => i.complete && i.naturalWidth > 0).map(i => i.src.length + ':' + i.src.slice(-80)),
        stderr: Array.from(out.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]'))
                     .map(e => e.textContent.trim().slice(-400)),
        kernel: panel.sessionContext.session.kernel.status};
"""


def _element(drv, script, *args):
    return drv.execute_script(script, *args)


def _wait(what: str, probe, timeout: float, interval: float = 0.5):
    """Call ``probe()`` until it returns something true; fail with ``what`` and the last value after ``timeout``."""
    t0, last = time.perf_counter(), None
    while time.perf_counter() - t0 < timeout:
        last = probe()
        if last and not (isinstance(last, dict) and last.get("_wait")):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last state: {last}", pytrace=False)


def open_notebook(drv, lab, rel: str, first: bool):
    """Open ``rel`` in the lab page (the first one by URL with ``?reset``), wait until its kernel is idle."""
    if first:
        drv.get(f"{lab['url']}/lab/tree/{rel}?reset&token={lab['token']}")
    else:
        drv.execute_script("window.jupyterapp.commands.execute('docmanager:open', {path: arguments[0]});", rel)

    def ready():
        st = drv.execute_script(NOTEBOOK_STATE, rel)
        return st if st.get("ready") and st.get("kernel") == "idle" and st["attached"] == st["cells"] else None

    return _wait(f"{rel} to open with an idle kernel", ready, 120)


def run_all(drv, rel: str) -> dict:
    """Run all cells; wait until each has run (or one failed) and every widget is rendered."""
    drv.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")

    def finished():
        st = drv.execute_script(NOTEBOOK_STATE, rel)
        if st["errors"]:
            return st
        done = st["done"] == st["code"] and st["kernel"] == "idle" and st["rendered"] == len(st["widgetCells"])
        return st if done else None

    return _wait(f"every cell of {rel} to run and its widgets to render", finished, RUN_TIMEOUT_S, 1.0)


def move_one_control(drv, cell: int, timeout: float = REDRAW_TIMEOUT_S) -> dict:
    """Move one control of the widget in code cell ``cell`` with the keyboard; return what happened."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    controls = drv.execute_script(CONTROLS, cell)
    movable = [k for k, c in enumerate(controls) if c["slider"] and c["max"] > c["min"]]
    before = drv.execute_script(WIDGET_OUTPUT, cell)["images"]
    t0 = time.perf_counter()
    if movable:
        k = movable[0]
        c = controls[k]
        key = Keys.ARROW_RIGHT if c["now"] < c["max"] else Keys.ARROW_LEFT
        handle = drv.execute_script(
            "const box = window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node"
            ".querySelector('.widget-vbox');"
            "const el = Array.from(box.children)[arguments[1]].querySelector('.noUi-handle');"
            "el.scrollIntoView({block: 'center'}); el.focus(); return el;", cell, k)
        assert drv.switch_to.active_element == handle, "the slider's handle did not take the keyboard focus"
        ActionChains(drv).send_keys(key).perform()
        how = f"{c['label']!r} with {'ArrowRight' if key == Keys.ARROW_RIGHT else 'ArrowLeft'}"
    else:  # nothing to slide at this scale (e.g. a range of one value): press another toggle button
        k = next((k for k, c in enumerate(controls) if len(c["buttons"]) > 1), None)
        assert k is not None, f"cell {cell}: no control can move: {controls}"
        i = next(i for i, active in enumerate(controls[k]["buttons"]) if not active)
        button = drv.execute_script(
            "const box = window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node"
            ".querySelector('.widget-vbox');"
            "return Array.from(box.children)[arguments[1]].querySelectorAll('button')[arguments[2]];", cell, k, i)
        button.send_keys(Keys.SPACE)  # a keyboard press on the button
        how = f"{controls[k]['label']!r} to option {i}"

    def redrawn():
        now = drv.execute_script(WIDGET_OUTPUT, cell)
        if now["stderr"]:
            return now
        new = [s for s in now["images"] if s not in before]
        return now if new and now["kernel"] == "idle" else None

    t0 = time.perf_counter()
    t_end = t0 + timeout
    result = None
    while time.perf_counter() < t_end:
        result = redrawn()
        if result:
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    after = drv.execute_script(CONTROLS, cell)
    return {"cell": cell, "controls": controls, "after": after, "how": how, "seconds": seconds,
            "redrawn": bool(result and not result["stderr"]), "stderr": (result or {}).get("stderr", [])}


def close_notebook(drv):
    """Shut the front notebook's kernel down and close it without saving (it is a copy)."""
    drv.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const panel = window.jupyterapp.shell.currentWidget;
        panel.sessionContext.shutdown().then(() => { panel.context.model.dirty = false; panel.dispose(); done(true); },
                                             e => done(String(e)));""")


def exercise(drv, lab, rel: str, first: bool, redraw_timeout: float = REDRAW_TIMEOUT_S) -> dict:
    """Open, run all, move one control per widget cell; return the problems found and the timings."""
    problems = []
    t0 = time.perf_counter()
    open_notebook(drv, lab, rel, first)
    open_s = time.perf_counter() - t0
    st = run_all(drv, rel)
    run_s = time.perf_counter() - t0
    problems += [f"error output: {e}" for e in st["errors"]]
    if not st["widgetCells"] and not st["errors"]:
        problems.append("no widget was displayed")
    moves = []
    if not st["errors"]:
        for cell in st["widgetCells"]:
            move = move_one_control(drv, cell, redraw_timeout)
            moves.append(move)
            for c in move["controls"]:
                if not LABEL.match(c["label"]) or c["cut"]:
                    problems.append(f"cell {cell}: control label {c['label']!r} is "
                                    + ("cut off" if c["cut"] else "not 'name (unit)'"))
            if move["stderr"]:
                problems.append(f"cell {cell}: moving {move['how']} printed an error in the widget: "
                                f"{move['stderr'][0][-300:]}")
            elif not move["redrawn"]:
                problems.append(f"cell {cell}: moving {move['how']} drew no new figure within {redraw_timeout:.0f} s")
            elif move["after"] == move["controls"]:
                problems.append(f"cell {cell}: the control did not change ({move['how']})")
    final = drv.execute_script(NOTEBOOK_STATE, rel)
    problems += [f"widget error shown: {e}" for e in final.get("widgetErrors", [])]
    problems += [f"error output after the moves: {e}" for e in final.get("errors", []) if e not in st["errors"]]
    shot = artefact_dir(lab["tmp"]) / f"lab_{Path(rel).stem}.png"
    drv.save_screenshot(str(shot))
    close_notebook(drv)
    return {"problems": problems, "open_s": open_s, "run_s": run_s, "redraw_s": [round(m["seconds"], 2) for m in moves],
            "screenshot": shot}


# ---------------------------------------------------------------- one JupyterLab server for the module
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BROKEN_NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": [
            "import matplotlib.pyplot as plt\n", "from IPython.display import display\n",
            "from ipywidgets import IntSlider\n", "from retrieval_lib.book.viz import live_figure\n",
            "def fails(k=0):\n", "    if k:\n", "        raise ValueError('redraw failed on purpose')\n",
            "    plt.plot([0, k]); plt.show()\n",
            "def draws_nothing(k=0):\n", "    pass\n",
            "fails()\n"]},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": ["display(live_figure(fails, k=IntSlider(value=0, min=0, max=3, description='k (steps)')))"]},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": ["display(live_figure(draws_nothing, k=IntSlider(value=0, min=0, max=3, description='k')))"]},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, readme_run):
    browser, driver = require_browser()
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    (root / "notebooks").mkdir(parents=True)
    for nb in LAB_NOTEBOOKS:  # a copy: the notebooks run and may be saved here, never in the checkout
        shutil.copy2(nb, root / "notebooks" / nb.name)
    (root / "notebooks" / "broken_widgets.ipynb").write_text(json.dumps(BROKEN_NOTEBOOK))
    settings = tmp / "settings"
    for rel, values in SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    # the README run's data (the offline default) and its feature cache (conftest.py: <base>/cache)
    env = {k: v for k, v in os.environ.items() if k != "RETRIEVAL_DATA"}
    shared_cache = readme_run.root.parent / "cache"
    env.update({"RETRIEVAL_SCALE": "smoke", "RETRIEVAL_PROGRESS": "0", "MPLBACKEND": INLINE_BACKEND,
                "RETRIEVAL_CACHE": str(shared_cache if shared_cache.is_dir() else tmp / "cache"),
                # nothing from the user's Jupyter set-up (config, kernels, workspaces); the kernel is this Python
                "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
                "JUPYTER_DATA_DIR": str(tmp / "data"),
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
                "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces")})
    log = open(tmp / "jupyterlab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    drv = None
    try:
        t0 = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.perf_counter() - t0 > 90:
                pytest.fail(f"JupyterLab did not start:\n{(tmp / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        drv = start_chrome(browser, driver, 1400, 1000)
        drv.set_page_load_timeout(120)
        drv.set_script_timeout(60)
        yield {"url": url, "token": token, "driver": drv, "tmp": tmp, "opened": 0}
    finally:
        if drv is not None:
            drv.quit()
        for path in ("kernels",):  # shut down what is left, then the server
            try:
                req = urllib.request.Request(f"{url}/api/{path}?token={token}")
                for k in json.loads(urllib.request.urlopen(req, timeout=5).read()):
                    urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}",
                                                                  method="DELETE"), timeout=10)
            except OSError:
                pass
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _exercise(lab, rel, **kw):
    first = lab["opened"] == 0
    lab["opened"] += 1
    return exercise(lab["driver"], lab, rel, first, **kw)


def test_the_live_check_catches_a_broken_redraw(lab):
    """A notebook whose first widget's redraw raises and whose second draws nothing, with a label without unit."""
    result = _exercise(lab, "notebooks/broken_widgets.ipynb", redraw_timeout=6)
    text = "\n".join(result["problems"])
    print(f"broken_widgets: opened in {result['open_s']:.1f} s, ran in {result['run_s']:.1f} s")
    assert "printed an error in the widget" in text and "redraw failed on purpose" in text, text
    assert "drew no new figure" in text, text
    assert "control label 'k' is not 'name (unit)'" in text, text


def test_the_lab_notebooks_cover_every_kind_of_control():
    """The default pair holds every kind of control the widget notebooks build."""
    def kinds(nbs):
        return {call[0] for nb in nbs for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]
                if cell["cell_type"] == "code" for call in control_calls("".join(cell["source"]))}

    # a FloatSlider's handle is the same slider view, moved the same way, as 03's FloatLogSlider
    assert kinds(lab_notebooks("")) >= kinds(WIDGET_NOTEBOOKS) - {"FloatSlider"}
    assert [nb.stem for nb in lab_notebooks("all")] == [nb.stem for nb in WIDGET_NOTEBOOKS]
    with pytest.raises(ValueError, match="no widget notebook"):
        lab_notebooks("99_none")


@pytest.mark.parametrize("nb", LAB_NOTEBOOKS, ids=lambda p: p.stem)
def test_sliders_redraw_live(lab, nb):
    result = _exercise(lab, f"notebooks/{nb.name}")
    print(f"{nb.stem}: opened in {result['open_s']:.1f} s, ran in {result['run_s']:.1f} s, "
          f"redraws {result['redraw_s']} s, screenshot "
          f"{result['screenshot']}")
    assert not result["problems"], f"{nb.name} in JupyterLab:\n" + "\n".join(result["problems"])


def test_there_are_widget_notebooks():
    assert WIDGET_NOTEBOOKS, "no notebook uses viz.live_figure; the live test would test nothing"
