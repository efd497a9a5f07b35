"""The executed site in a real browser (headless Chromium, selenium).

The site is built at smoke scale from the README's run (the ``readme_run`` fixture:
``reproduce --scale smoke`` in a copy of the checkout, which the notebook tests use too),
with the command a user types: ``python -m retrieval_lib site --from RUN --out SITE``. Then
Chromium, with every host but this machine unreachable, opens ``index.html`` and every
notebook page and checks that each image is decoded (``naturalWidth > 0``), that the index
links every notebook and leads with the run's numbers (the off-the-shelf table and each
notebook's headline numbers above the paper table), that each widget's note points at a
cell that shows its static figure, that every equation is drawn as MathML (one ``<math>``
per ``$...$`` of the notebook's markdown, each with a size on screen, and no text outside
code showing ``$$``, ``\\frac``, ``\\mathbf`` or a ``$...$`` span), that the setup cells are
folded, that no page shows a path of this machine, and that each page links its executed
notebook and Colab. Screenshots of the index and of ``04_rmac`` (display equations) are
saved (``$RETRIEVAL_ARTEFACTS`` when set, else the test's tmp folder).

``RETRIEVAL_SITE_RUN=DIR`` builds the site from an existing ``reproduce --scale smoke --out
DIR`` instead of the README's run (quicker while working on the site).

Without Chromium, chromedriver or selenium these tests skip with the reason, except under
CI (``CI=true``), where they fail: ``.ci/browser`` installs the browser.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _browser import artefact_dir, full_page_screenshot, require_browser, start_chrome
from retrieval_lib.book.site_math import split_math

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

# what a reader reads: text outside code that still looks like LaTeX, the equations' boxes, the folded setup
READING_STATE = """
const latex = /\\$\\$|\\\\frac|\\\\mathbf|\\$[^$\\s](?:[^$]*[^$\\s])?\\$/;
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
const raw = [];
while (walker.nextNode()) {
  const node = walker.currentNode;
  if (node.parentElement.closest('pre, code, script, style, .highlight, .jp-InputArea-editor')) continue;
  if (latex.test(node.textContent)) raw.push(Array.from(node.textContent.trim()).slice(0, 120).join(''));
}
const maths = Array.from(document.querySelectorAll('math')).map(m => {
  const r = m.getBoundingClientRect();
  return {w: r.width, h: r.height, display: getComputedStyle(m).display,
          folded: !!m.closest('details:not([open])'), text: Array.from(m.textContent).slice(0, 40).join('')};
});
const setup = Array.from(document.querySelectorAll('details.rl-setup')).map(d => ({
  open: d.open, height: d.getBoundingClientRect().height,
  cells: d.querySelectorAll('.jp-Cell').length,
  hidden: Array.from(d.querySelectorAll('.jp-Cell')).every(c => !c.checkVisibility())}));
const top = id => { const e = document.getElementById(id); return e ? e.getBoundingClientRect().top + window.scrollY : null; };
return {raw: raw, maths: maths, setup: setup,
        ipynb: Array.from(document.querySelectorAll('a.rl-ipynb')).map(a => a.getAttribute('href')),
        colab: Array.from(document.querySelectorAll('a.rl-colab')).map(a => a.href),
        paths: (document.body.textContent.match(/(^|[\\s"'(=])\\/(tmp|home|root|work|Users)\\/\\S*/g) || []).slice(0, 5),
        tops: {measured: top('measured'), offtheshelf: top('offtheshelf'), headline: top('headline'),
               paper: top('paper'), notebooks: top('notebooks')},
        headline_numbers: Array.from(document.querySelectorAll('table.headline b')).map(b => b.textContent)};
"""


def equations(executed: Path) -> int:
    """How many equations the executed notebook's markdown holds (cells and markdown outputs)."""
    doc = json.loads(executed.read_text(encoding="utf-8"))
    texts = []
    for cell in doc["cells"]:
        if cell["cell_type"] == "markdown":
            texts.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            md = out.get("data", {}).get("text/markdown")
            if md is not None:
                texts.append("".join(md) if isinstance(md, list) else md)
    return sum(1 for t in texts for kind, _ in split_math(t) if kind != "text")


def reading_problems(state: dict, expected_math: int) -> list:
    """What a reader would see wrong on a chapter page (empty: nothing)."""
    problems = []
    if state["raw"]:
        problems.append(f"{len(state['raw'])} text nodes show LaTeX: {state['raw'][:3]}")
    shown = [m for m in state["maths"] if not m["folded"]]
    if len(state["maths"]) != expected_math:
        problems.append(f"{len(state['maths'])} <math> elements, the notebook's markdown has {expected_math} equations")
    empty = [m["text"] for m in shown if not (m["w"] > 0 and m["h"] > 0)]
    if empty:
        problems.append(f"{len(empty)} equations have no size on screen: {empty[:3]}")
    not_math = sorted({m["display"] for m in shown if "math" not in m["display"]})
    if not_math:
        problems.append(f"equations laid out as {not_math}, not as MathML")
    if len(state["setup"]) != 1 or state["setup"][0]["open"] or state["setup"][0]["cells"] < 3 \
            or not state["setup"][0]["hidden"] or state["setup"][0]["height"] > 80:
        problems.append(f"the setup cells are not folded into one closed <details>: {state['setup']}")
    if state["paths"]:
        problems.append(f"paths of this machine on the page: {state['paths']}")
    if len(state["ipynb"]) != 1 or not all(c.startswith("https://colab.research.google.com/github/")
                                           for c in state["colab"]) or len(state["colab"]) != 1:
        problems.append(f"links to the executed notebook {state['ipynb']} / to Colab {state['colab']}")
    return problems


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
def smoke_site(request, tmp_path_factory):
    """The site of the README's smoke run (or of ``$RETRIEVAL_SITE_RUN``), built with the command line;
    ``(site folder, run folder, seconds)``."""
    require_browser()
    if os.environ.get("RETRIEVAL_SITE_RUN"):
        run = Path(os.environ["RETRIEVAL_SITE_RUN"]).expanduser().resolve()
        assert list(run.glob("notebooks/*/*.ipynb")), f"RETRIEVAL_SITE_RUN={run} holds no executed notebook"
    else:
        readme_run = request.getfixturevalue("readme_run")
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


def test_the_reading_check_catches_latex_and_unfolded_setup(chrome, tmp_path):
    """A hand-made page: LaTeX left as text, a zero-size equation, setup cells shown, a machine path."""
    page = tmp_path / "raw.html"
    page.write_text(
        '<html><body><p>The mean $\\frac{1}{n}$ and $$x$$.</p><code>$ok$ in code</code>'
        '<math style="display:none"><mi>x</mi></math><div class="jp-Cell">setup</div>'
        '<p>wrote /tmp/run/notebooks/00/metrics.json</p></body></html>')
    chrome.get(page.as_uri())
    text = "\n".join(reading_problems(chrome.execute_script(READING_STATE), expected_math=2))
    assert "text nodes show LaTeX" in text and "ok$ in code" not in text
    assert "1 <math> elements, the notebook's markdown has 2" in text
    assert "not folded" in text and "paths of this machine" in text and "links to the executed notebook" in text


def test_index_in_the_browser(smoke_site, chrome, tmp_path):
    out, run, seconds = smoke_site
    executed = sorted(run.glob("notebooks/*/[0-9][0-9]_*.ipynb"))
    chrome.set_window_size(1280, 1000)
    chrome.get((out / "index.html").as_uri())
    state = chrome.execute_script(PAGE_STATE)
    reading = chrome.execute_script(READING_STATE)
    shot = full_page_screenshot(chrome, artefact_dir(tmp_path) / "site_index.png")
    print(f"screenshot: {shot}")
    for nb in executed:
        assert f"{nb.stem}.html" in state["links"], f"the index does not link {nb.stem}.html"
        assert f"ipynb/{nb.name}" in state["links"]
    tables = chrome.execute_script("return Array.from(document.querySelectorAll('table.notebooks')).map(t => t.rows.length)")
    assert tables == [len(executed) + 1], tables  # header + one per notebook
    tops = reading["tops"]
    assert None not in tops.values(), tops
    assert tops["measured"] < tops["offtheshelf"] < tops["headline"] < tops["paper"] < tops["notebooks"], tops
    numbers = [float(b) for b in reading["headline_numbers"] if re.fullmatch(r"-?\d+\.\d+", b)]
    assert len(numbers) >= len(executed) - 1, reading["headline_numbers"]  # 09 measures nothing of its own
    assert "Every number measured in this run" in state["text"]  # results.md, folded at the end
    assert not reading["raw"] and not reading["paths"], (reading["raw"], reading["paths"])
    assert "stopped in code cell" not in state["text"], "the index says a notebook stopped with an error"
    assert shot.stat().st_size > 10_000


def test_every_notebook_page_shows_its_figures(smoke_site, chrome, tmp_path):
    out, run, _ = smoke_site
    executed = sorted(run.glob("notebooks/*/[0-9][0-9]_*.ipynb"))
    assert executed
    problems, widgets_seen, maths_seen = {}, 0, 0
    for nb in executed:
        figures, widgets = _expected(nb)
        chrome.set_window_size(1280, 1000)
        chrome.get((out / f"{nb.stem}.html").as_uri())
        state = chrome.execute_script(PAGE_STATE)
        reading = chrome.execute_script(READING_STATE)
        widgets_seen += len(state["notes"])
        maths_seen += len(reading["maths"])
        found = page_problems(state, figures, widgets) + reading_problems(reading, equations(nb))
        if found:
            problems[nb.stem] = found
        if nb.stem.startswith("04_"):
            shot = full_page_screenshot(chrome, artefact_dir(tmp_path) / f"site_{nb.stem}.png")
            print(f"screenshot: {shot}")
    assert not problems, json.dumps(problems, indent=1)
    assert widgets_seen > 0, "no page showed a widget's note; the notebooks have sliders"
    assert maths_seen > 100, f"{maths_seen} equations drawn over all pages; the notebooks have hundreds"
