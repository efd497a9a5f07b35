"""Every slider says what it changes: ``viz.live_figure`` refuses a control without a
description, and every control built in the notebooks or the library carries one of the
form ``"name (unit or meaning)"`` (``"p (GeM exponent)"``, ``"L (scale levels)"``).

The live behaviour (sliders render with their labels and redraw their figure) is checked
in a real browser by ``tests/test_browser_lab.py``.
"""
import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CONTROL = re.compile(r"(Slider|ToggleButtons|Dropdown|RadioButtons|Select|Checkbox|Text)$")
LABEL = re.compile(r"^\S[^()]*\s\(\S[^()]*\)$")  # "name (unit or meaning)"


def _name(func) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def control_calls(source: str) -> list:
    """``(constructor, description, line)`` for every ipywidgets control built in ``source``, in line order.

    ``description`` is the literal string, ``None`` when there is none, and the expression's
    source (e.g. ``"f'{name} (px)'"``) when it is computed at run time.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and CONTROL.search(_name(node.func)) and _name(node.func)[:1].isupper():
            desc = next((k.value for k in node.keywords if k.arg == "description"), None)
            text = desc.value if isinstance(desc, ast.Constant) and isinstance(desc.value, str) else None
            if desc is not None and text is None:
                text = ast.unparse(desc)  # built at run time: at least it is there
            found.append((_name(node.func), text, node.lineno))
    return sorted(found, key=lambda f: f[2])


def computed_lines(source: str) -> set:
    """Lines of controls whose description is computed at run time (live_figure checks those are not empty)."""
    return {node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and CONTROL.search(_name(node.func))
            and any(k.arg == "description" and not isinstance(k.value, ast.Constant) for k in node.keywords)}


def live_figure_controls(source: str) -> list:
    """The keyword arguments of every ``live_figure(draw, name=control, ...)`` call: ``(name, node)``."""
    return [(k.arg, k.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and _name(node.func) == "live_figure" for k in node.keywords]


def _sources():
    """(where, source) of every notebook code cell and every library module."""
    for nb in NOTEBOOKS:
        cells = [c for c in json.loads(nb.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
        for i, cell in enumerate(cells):
            src = "".join(cell["source"])
            if not src.lstrip().startswith(("%", "!")):
                yield f"{nb.name} code cell {i}", src
    for py in sorted((REPO / "retrieval_lib").rglob("*.py")):
        yield str(py.relative_to(REPO)), py.read_text(encoding="utf-8")


def test_the_scan_finds_controls_and_their_labels():
    src = ('display(live_figure(draw, p=FloatLogSlider(value=3, description="p (GeM exponent)"),\n'
           '                    side=widgets.ToggleButtons(options=["a", "b"]), k=k_slider))\n'
           'IntSlider(description=f"{name} (px)")\n')
    assert control_calls(src) == [("FloatLogSlider", "p (GeM exponent)", 1), ("ToggleButtons", None, 2),
                                  ("IntSlider", "f'{name} (px)'", 3)]
    assert [name for name, _ in live_figure_controls(src)] == ["p", "side", "k"]
    assert computed_lines(src) == {3}
    for good in ("p (GeM exponent)", "w / h (aspect ratio)", "k (rank in that list, 0 = biggest)"):
        assert LABEL.match(good), good
    for bad in ("p", "rank", "L ()", "(levels)", "pair index"):
        assert not LABEL.match(bad), bad


def test_every_control_says_what_it_changes():
    seen, problems = 0, []
    for where, src in _sources():
        for kind, desc, line in control_calls(src):
            seen += 1
            if desc is None or not (LABEL.match(desc) or line in computed_lines(src)):
                problems.append(f"{where}, line {line}: {kind}(description={desc!r}) -- write "
                                f"description=\"name (unit)\", e.g. \"p (GeM exponent)\"")
        for name, node in live_figure_controls(src):
            if not isinstance(node, ast.Call):
                problems.append(f"{where}: live_figure's control {name!r} is not built in the call, so its "
                                "description cannot be checked here; build it inline")
    assert seen >= 6, f"found only {seen} widget controls in the notebooks and the library; is the scan broken?"
    assert not problems, "\n".join(problems)


def test_live_figure_refuses_a_control_without_description():
    from ipywidgets import IntSlider, ToggleButtons

    from retrieval_lib.book.viz import live_figure

    with pytest.raises(ValueError, match=r"control for 'k' \(IntSlider\) has no description.*name and unit"):
        live_figure(lambda k: None, k=IntSlider(value=1, min=0, max=3))
    with pytest.raises(ValueError, match="'side' .*no description"):
        live_figure(lambda side, k: None, k=IntSlider(description="k (rank)"),
                    side=ToggleButtons(options=["a", "b"], description="   "))
    with pytest.raises(ValueError, match="at least one control"):
        live_figure(lambda: None)


def test_live_figure_shows_whole_labels_and_redraws_on_change():
    from ipywidgets import IntSlider, Output

    from retrieval_lib.book.viz import live_figure

    calls = []
    k = IntSlider(value=1, min=0, max=3, description="k (rank, 0 = top)")
    box = live_figure(lambda k: calls.append(k), k=k)
    assert calls == []  # not drawn when built: the notebook draws the static figure itself
    assert box.children[0] is k and isinstance(box.children[-1], Output)
    assert k.style.description_width == "initial"  # the whole label, not cut after ~12 characters
    k.value = 3
    assert calls == [3]
