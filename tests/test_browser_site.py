"""The executed site in a real browser (headless Chromium, selenium).

The site is built at smoke scale from the README's run (the ``readme_run`` fixture:
``reproduce --scale smoke`` in a copy of the checkout, which the notebook tests use too),
with the command a user types: ``python -m retrieval_lib site --from RUN --out SITE``. Then
Chromium, with every host but this machine unreachable, opens ``index.html`` and every
notebook page and checks that each image is decoded (``naturalWidth > 0``), that the index
links every notebook and shows the results table, and that each widget's note points at
a cell that shows its static figure. Screenshots of the index and of ``00_pipeline`` are
saved (``$RETRIEVAL_ARTEFACTS`` when set, else the test's tmp folder).

Without Chromium, chromedriver or selenium these tests skip with the reason, except under
CI (``CI=true``), where they fail: ``.ci/browser`` installs the browser.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _browser import artefact_dir, full_page_screenshot, require_browser, start_chrome

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# what a page shows, read in the browser
PAGE_STATE = """
const imgs = Array.from(document.images);
const ok = i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0;
const notes = Array.from(document.querySelectorAll('.rl-widget')).map(n => {
  const id = n.dataset.figureCell || '';
  const cell = id ? document.getElementById(id) : null;
  const figs = cell ? Array.from(cell.querySelectorAll('img')) : [];
  return {id: id, found: !!cell,
          before: !!cell && (cell.contains(n)
                             || !!(cell.compareDocumentPosition(n) & Node.DOCUMENT_POSITION_FOLLOWING)),
          figures: figs.filter(ok).length, visible: n.getBoundingClientRect().height > 0,
          labels: Array.from(n.querySelectorAll('li b')).map(b => b.textContent)};
});
return {images: imgs.length, decoded: imgs.filter(ok).length,
        broken: imgs.filter(i => !ok(i)).map(i => (i.alt || '') + ' ' + i.src.slice(0, 40)),
        notes: notes, widget_areas: document.querySelectorAll('.jupyter-widgets').length,
        widget_errors: /Error displaying widget|Loading widget/.test(document.body.textContent),
        links: Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href')),
        tables: Array.from(document.querySelectorAll('table')).map(t => t.rows.length),
        text: document.body.textContent};
"""


def page_problems(state: dict, expected_images: int, expected_notes: int) -> list:
    """What is wrong with a rendered notebook page (empty: nothing)."""
    problems = []
    if state["images"] < expected_images:
        problems.append(f"{state['images']} images on the page, the notebook has {expected_images} figures")
    if state["broken"]:
        problems.append(f"{len(state['broken'])} images not decoded (naturalWidth 0): {state['broken'][:3]}")
    if len(state["notes"]) != expected_notes:
        problems.append(f"{len(state['notes'])} widget notes, the notebook has {expected_notes} widgets")
    for k, note in enumerate(state["notes"]):
        if not (note["found"] and note["before"] and note["figures"] > 0):
            problems.append(f"widget {k}: its static figure is not shown before it (cell {note['id']!r}: found "
                            f"{note['found']}, before the note {note['before']}, decoded images {note['figures']})")
        if not note["visible"] or not note["labels"] or not all(s.strip() and s != "(no description)"
                                                                for s in note["labels"]):
            problems.append(f"widget {k}: the note is hidden or does not name its controls: {note['labels']}")
    if state["widget_areas"] or state["widget_errors"]:
        problems.append(f"{state['widget_areas']} live widget areas / widget error text left on a static page")
    return problems


@pytest.fixture(scope="module")
def chrome():
    browser, driver = require_browser()
    drv = start_chrome(browser, driver)
    drv.set_page_load_timeout(120)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def smoke_site(readme_run, tmp_path_factory):
    """The site of the README's smoke run, built with the command line; ``(site folder, run folder, seconds)``."""
    require_browser()
    run = readme_run.root / "results"
    if not list(run.glob("notebooks/*/*.ipynb")):
        pytest.fail(f"the README run left no executed notebooks (exit code {readme_run.returncode}):\n"
                    f"{readme_run.tail(30)}")
    out = tmp_path_factory.mktemp("site") / "site"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "retrieval_lib", "site", "--from", str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, \
        f"`site --from` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(f"site built from the smoke run in {seconds:.1f} s: {out}")
    return out, run, seconds


def _expected(executed: Path) -> tuple:
    """(figures, widgets) of an executed notebook."""
    doc = json.loads(executed.read_text(encoding="utf-8"))
    outs = [o for c in doc["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    figures = sum(1 for o in outs for m in ("image/png", "image/jpeg") if m in o.get("data", {}))
    widgets = sum(1 for o in outs if WIDGET_VIEW in o.get("data", {}))
    return figures, widgets


def test_missing_browser_skips_outside_ci_and_fails_under_ci(monkeypatch):
    """The browser tests can only skip on a developer's machine; under CI a missing browser is a failure."""
    import _browser

    monkeypatch.setattr(_browser.shutil, "which", lambda name: None)
    monkeypatch.setattr(_browser, "DRIVERS", ("/nonexistent/chromedriver",))
    for value in ("", "0", "false"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="a Chromium browser .*chromedriver.*\\.ci/browser"):
            _browser.require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _browser.require_browser()
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="CI is set, so this is a failure"):
            _browser.require_browser()


def test_the_page_check_catches_broken_figures(chrome, tmp_path):
    """A hand-made page: one image that does not decode, a note whose figure cell has none, one live widget area."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body><div id="cell-id=a"><img alt="broken" src="data:image/png;base64,AAAA"></div>'
        '<div id="cell-id=b"><p>no figure here</p></div>'
        '<div class="rl-widget" data-figure-cell="cell-id=b"><ul><li><b>(no description)</b>: 0 to 3</li></ul></div>'
        '<div class="jupyter-widgets"></div></body></html>')
    chrome.get(page.as_uri())
    problems = page_problems(chrome.execute_script(PAGE_STATE), expected_images=2, expected_notes=1)
    text = "\n".join(problems)
    assert "1 images on the page, the notebook has 2" in text
    assert "not decoded" in text and "broken" in text
    assert "static figure is not shown" in text and "decoded images 0" in text
    assert "does not name its controls" in text
    assert "live widget areas" in text


def test_index_in_the_browser(smoke_site, chrome, tmp_path):
    out, run, seconds = smoke_site
    executed = sorted(run.glob("notebooks/*/[0-9][0-9]_*.ipynb"))
    chrome.get((out / "index.html").as_uri())
    state = chrome.execute_script(PAGE_STATE)
    shot = full_page_screenshot(chrome, artefact_dir(tmp_path) / "site_index.png")
    print(f"screenshot: {shot}")
    for nb in executed:
        assert f"{nb.stem}.html" in state["links"], f"the index does not link {nb.stem}.html"
        assert f"ipynb/{nb.name}" in state["links"]
    assert state["tables"] and state["tables"][0] == len(executed) + 1, state["tables"]  # header + one per notebook
    assert len(state["tables"]) >= 2 and max(state["tables"][1:]) > 1, "no results table with rows"
    assert "Every number measured in this run" in state["text"]
    assert "stopped in code cell" not in state["text"], "the index says a notebook stopped with an error"
    assert shot.stat().st_size > 10_000


def test_every_notebook_page_shows_its_figures(smoke_site, chrome, tmp_path):
    out, run, _ = smoke_site
    executed = sorted(run.glob("notebooks/*/[0-9][0-9]_*.ipynb"))
    assert executed
    problems, widgets_seen = {}, 0
    for nb in executed:
        figures, widgets = _expected(nb)
        chrome.set_window_size(1280, 1000)
        chrome.get((out / f"{nb.stem}.html").as_uri())
        state = chrome.execute_script(PAGE_STATE)
        widgets_seen += len(state["notes"])
        found = page_problems(state, figures, widgets)
        if found:
            problems[nb.stem] = found
        if nb.stem.startswith("00_"):
            shot = full_page_screenshot(chrome, artefact_dir(tmp_path) / f"site_{nb.stem}.png")
            print(f"screenshot: {shot}")
    assert not problems, json.dumps(problems, indent=1)
    assert widgets_seen > 0, "no page showed a widget's note; the notebooks have sliders"
