"""The explorer (notebooks/10_explorer.ipynb) in a real browser: JupyterLab 4 and the stand-alone app (Voilà).

In each, headless Chromium (selenium, :mod:`_browser`) does what a user does, and each step must give a
new decoded image and the expected readout, with no widget error and no traceback on the page:

1. upload a photo through the page's file input: it becomes the query (a new query image, its name);
2. click the button under a thumbnail: that photo becomes the query ("#3 of ...");
3. move the ``p`` slider with the keyboard: the GeM row's label and the timing readout change;
4. press "why" under R-MAC's first result: a decoded overlay image and "the ... contributions sum to";
5. bad input: a text file uploaded and a folder that does not exist each show their message.

The notebook runs at smoke scale on a small folder of photos written by the test (``RETRIEVAL_PHOTOS``),
with its own feature cache, so each server runs the whole notebook in about half a minute on a quiet
machine. Both servers run on a copy of the notebook (JupyterLab autosaves). Measured times are printed.

Without Chromium, chromedriver or selenium these tests skip with the reason, except under CI
(``CI=true``), where they fail.
"""
import json
import os
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
from _fakes import write_groups

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "10_explorer.ipynb"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
RUN_TIMEOUT_S = 300  # the whole notebook at smoke scale (about 30 s quiet; CI machines are loaded)
STEP_TIMEOUT_S = 60
SETTINGS = {  # JupyterLab user settings for this server only: no news toast, no autosave into the copy
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}

# ---------------------------------------------------------------- the page, read with JavaScript
PAGE = """
const root = document.querySelector('.explorer');
if (!root) return null;
const img = sel => { const i = root.querySelector(sel); return i && i.complete && i.naturalWidth > 0 ? i.src : null; };
const text = sel => { const e = root.querySelector(sel); return e ? e.textContent : ''; };
return {query: img('img.explorer-query'), queryText: root.querySelector('.explorer-query-name') ?
          root.querySelector('.explorer-query-name').textContent + ' ' +
          root.querySelector('.explorer-query-name').parentElement.textContent : '',
        why: img('img.explorer-why-image'), whyText: text('.explorer-why-readout'),
        readout: text('.explorer-readout'), message: text('.explorer-message'),
        rows: Array.from(root.querySelectorAll('.explorer-row-label')).map(e => e.textContent),
        thumbs: root.querySelectorAll('button.explorer-thumb').length,
        results: Array.from(root.querySelectorAll('.explorer-row img')).filter(i => i.naturalWidth > 0).length,
        errors: (document.body.textContent.match(/Error displaying widget[^\\n]{0,200}|Error rendering[^\\n]{0,200}|Traceback[^\\n]{0,200}/g) || [])};
"""


def _page(drv):
    return drv.execute_script(PAGE)


def _wait(what, probe, timeout=STEP_TIMEOUT_S, interval=0.3):
    t0, last = time.perf_counter(), None
    while time.perf_counter() - t0 < timeout:
        try:
            last = probe()
        except Exception as err:  # a node replaced while it is read: try again
            last = f"{type(err).__name__}: {err}"
        if last and not isinstance(last, str):
            return last, time.perf_counter() - t0
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last state: {last}", pytrace=False)


def _until(drv, what, condition, timeout=STEP_TIMEOUT_S):
    """Wait until ``condition(page state)`` holds; return the state and the seconds it took."""
    def probe():
        st = _page(drv)
        if st and st["errors"]:
            pytest.fail(f"{what}: the page shows an error: {st['errors']}", pytrace=False)
        return st if st and condition(st) else None
    return _wait(what, probe, timeout)


def _jpeg(path: Path, colour=(30, 120, 200)) -> Path:
    from PIL import Image

    img = Image.new("RGB", (96, 72), colour)
    img.paste((250, 250, 40), (20, 10, 60, 50))
    img.save(path, quality=92)
    return path


def _upload(drv, path: Path):
    """Choose ``path`` in the page's upload control, as a user's file dialog would.

    The control's ``<input type=file>`` is never in the page (a click on its button calls the input's
    ``click()``, which opens the dialog), so that one call is diverted: the input is put in the page and
    selenium types the path into it, which fires its ``change`` event as a real choice does.
    """
    inp = drv.execute_script("""
        const orig = HTMLInputElement.prototype.click;
        window.__explorerFileInput = null;
        HTMLInputElement.prototype.click = function () {
          if (this.type !== 'file') return orig.call(this);
          if (!this.isConnected) document.body.appendChild(this);
          window.__explorerFileInput = this;
        };
        const button = document.querySelector('.explorer .explorer-upload');
        if (!button) return null;
        button.scrollIntoView({block: 'center'});
        button.click();
        HTMLInputElement.prototype.click = orig;
        return window.__explorerFileInput;""")
    assert inp is not None, "the page's upload button opened no file input"
    inp.send_keys(str(path))


def _click(drv, css: str, index: int = 0):
    el = drv.execute_script("const els = document.querySelectorAll(arguments[0]); const e = els[arguments[1]];"
                            "if (e) e.scrollIntoView({block: 'center'}); return e;", css, index)
    assert el is not None, f"no element {css} #{index}"
    el.click()


def _slide(drv, label: str):
    """Focus the handle of the slider labelled ``label`` and press ArrowRight (a click would nudge it)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    handle = drv.execute_script(
        "const s = Array.from(document.querySelectorAll('.explorer .widget-slider')).find("
        "  el => el.querySelector('.widget-label') && el.querySelector('.widget-label').textContent === arguments[0]);"
        "if (!s) return null; const h = s.querySelector('.noUi-handle'); h.scrollIntoView({block: 'center'});"
        "h.focus(); return h;", label)
    assert handle is not None, f"no slider labelled {label!r}"
    ActionChains(drv).send_keys(Keys.ARROW_RIGHT).perform()


def drive(drv, tmp: Path, where: str) -> dict:
    """The user's steps on the explorer page already in ``drv``; returns the seconds each took."""
    times = {}
    st, _ = _until(drv, f"{where}: the explorer page with its thumbnails and results",
                   lambda s: s["thumbs"] >= 3 and s["results"] >= 4 and s["query"], RUN_TIMEOUT_S)
    assert st["rows"][:4] == ["MAC", "SPoC", "GeM (p=3.00)", "R-MAC (L=3)"], st["rows"]

    before = st["query"]
    _upload(drv, _jpeg(tmp / "my_upload.jpg"))
    st, times["upload"] = _until(drv, f"{where}: the uploaded photo as the query",
                                 lambda s: s["query"] and s["query"] != before and "my_upload.jpg" in s["queryText"]
                                 and "upload: redrawn in" in s["readout"])
    assert "uploaded" in st["queryText"], st

    before = st["query"]
    _click(drv, "button.explorer-thumb", 3)
    st, times["click_thumbnail"] = _until(drv, f"{where}: thumbnail #3 as the query",
                                          lambda s: s["query"] != before and "#3 of" in s["queryText"]
                                          and "click thumbnail: redrawn in" in s["readout"])

    _slide(drv, "p (GeM exponent)")
    st, times["p_slider"] = _until(drv, f"{where}: the GeM row at the new p",
                                   lambda s: "GeM (p=3.00)" not in s["rows"] and "p slider: redrawn in" in s["readout"])
    assert any(r.startswith("GeM (p=") for r in st["rows"]), st["rows"]

    before = st["why"]
    _click(drv, ".explorer-row:nth-of-type(4) button.explorer-why", 0)
    st, times["why_rmac"] = _until(drv, f"{where}: R-MAC's why overlay",
                                   lambda s: s["why"] and s["why"] != before and "sum to" in s["whyText"]
                                   and "why overlay: redrawn in" in s["readout"])
    assert "= the score" in st["whyText"], st["whyText"]

    (tmp / "notes.txt").write_text("my holiday notes, not a photo")
    _upload(drv, tmp / "notes.txt")
    st, times["bad_upload"] = _until(drv, f"{where}: the message for a text file",
                                     lambda s: "'notes.txt' is not an image" in s["message"])
    folder = drv.execute_script("return document.querySelector('.explorer .explorer-folder input');")
    folder.clear()
    folder.send_keys(str(tmp / "nowhere"))
    _click(drv, "button.explorer-load")
    st, times["bad_folder"] = _until(drv, f"{where}: the message for a missing folder",
                                     lambda s: "no folder" in s["message"] and "nowhere" in s["message"])
    _click(drv, "button.explorer-thumb", 1)  # the page still answers after bad input
    _until(drv, f"{where}: a click after the bad input", lambda s: "#1 of" in s["queryText"] and not s["message"])
    return {k: round(v, 2) for k, v in times.items()}


# ---------------------------------------------------------------- servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(tmp: Path) -> dict:
    photos = tmp / "photos"
    for g, colour in enumerate(("red", "green", "blue", "cyan")):
        write_groups(photos / colour, n_groups=1, per_group=3, seed=g)
    env = {k: v for k, v in os.environ.items() if k != "RETRIEVAL_DATA"}
    env.update({"RETRIEVAL_SCALE": "smoke", "RETRIEVAL_PROGRESS": "0", "MPLBACKEND": INLINE_BACKEND,
                "RETRIEVAL_CACHE": str(tmp / "cache"), "RETRIEVAL_PHOTOS": str(photos),
                "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
                "JUPYTER_DATA_DIR": str(tmp / "data"),
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])})
    return env


def _serve(cmd, cwd, env, url, log_path, port=None):
    log = open(log_path, "wb")
    server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    while True:
        try:
            if url is None:  # voila runs the notebook on every page request: only check that it listens
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.perf_counter() - t0 > 90:
            _stop(server, log)
            pytest.fail(f"{cmd[2]} did not start:\n{Path(log_path).read_text()[-3000:]}", pytrace=False)
        time.sleep(0.5)
    return server, log


def _stop(server, log):
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass
    log.close()


@pytest.fixture
def chrome():
    browser, driver = require_browser()
    drv = start_chrome(browser, driver, 1400, 1100)
    drv.set_page_load_timeout(RUN_TIMEOUT_S)
    drv.set_script_timeout(60)
    yield drv
    drv.quit()


def test_the_explorer_as_a_stand_alone_app(chrome, tmp_path):
    """``voila --no-browser --port N notebooks/10_explorer.ipynb``, the README's command (its page only)."""
    root = tmp_path / "root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy2(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "voila", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           f"notebooks/{NOTEBOOK.name}"]
    server, log = _serve(cmd, root, _environment(tmp_path), None, tmp_path / "voila.log", port)
    try:
        t0 = time.perf_counter()
        chrome.get(url)
        times = drive(chrome, tmp_path, "voila")
        chrome.save_screenshot(str(artefact_dir(tmp_path) / "voila_explorer.png"))
        print(f"voila: page ready and driven in {time.perf_counter() - t0:.1f} s; step times (s): {times}")
    finally:
        _stop(server, log)


def test_the_explorer_in_jupyterlab(chrome, tmp_path):
    root = tmp_path / "root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy2(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    settings = tmp_path / "settings"
    for rel, values in SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(values))
    env = _environment(tmp_path)
    env.update({"JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")})
    port, token = _free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"]
    server, log = _serve(cmd, root, env, f"{url}/api/status?token={token}", tmp_path / "lab.log")
    try:
        t0 = time.perf_counter()
        chrome.get(f"{url}/lab/tree/notebooks/{NOTEBOOK.name}?reset&token={token}")
        rel = f"notebooks/{NOTEBOOK.name}"

        def kernel_idle():
            return chrome.execute_script(
                "const app = window.jupyterapp; if (!app) return null; const p = app.shell.currentWidget;"
                "if (!p || !p.sessionContext || !p.context || p.context.path !== arguments[0]) return null;"
                "const k = p.sessionContext.session ? p.sessionContext.session.kernel : null;"
                "return p.context.isReady && k && k.status === 'idle' ? true : null;", rel)

        _wait("the notebook to open with an idle kernel", kernel_idle, 120)
        chrome.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
        times = drive(chrome, tmp_path, "JupyterLab")
        errors = chrome.execute_script(
            "const cells = window.jupyterapp.shell.currentWidget.content.widgets; const out = [];"
            "cells.forEach((c, i) => { if (c.model.type !== 'code') return; const o = c.model.outputs;"
            "  for (let j = 0; j < o.length; j++) { const d = o.get(j).toJSON();"
            "    if (d.output_type === 'error') out.push(i + ': ' + d.ename + ': ' + d.evalue); } });"
            "return out;")
        assert not errors, f"cells failed in JupyterLab: {errors}"
        chrome.save_screenshot(str(artefact_dir(tmp_path) / "lab_explorer.png"))
        print(f"JupyterLab: notebook run and page driven in {time.perf_counter() - t0:.1f} s; step times (s): {times}")
    finally:
        _stop(server, log)
