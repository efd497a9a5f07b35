"""Every notebook's ``parameters`` cell as papermill reads it (``papermill --help-notebook``).

papermill infers a notebook's parameters line by line with a pattern (one ``NAME = value  #
help`` per line); a line it cannot read is skipped with a warning ("Unable to parse line
...") and a tuple assignment (``A, B = 1, 2``) is skipped silently, so ``--help-notebook``
would not list it. The cell is parsed here with Python's own parser as the reference: every
name it assigns must be listed by papermill with the same default and with its comment as the
help, and the inference must log no warning.
"""
import ast
import json
import logging
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def parameters_cell(path: Path) -> str:
    doc = json.loads(path.read_text(encoding="utf-8"))
    cells = [c for c in doc["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters' (one is expected)"
    src = cells[0]["source"]
    return "".join(src) if isinstance(src, list) else src


def assignments(source: str) -> dict:
    """``{name: (default source, comment on its last line)}`` of every top-level assignment, by Python's parser."""
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
        last = lines[node.end_lineno - 1]
        comment = last.split("#", 1)[1].strip() if "#" in last[node.value.end_col_offset:] else ""
        for name in names:
            found[name.id] = (ast.get_source_segment(source, node.value), comment)
    return found


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 10


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_lists_every_parameter_with_its_default_and_help(path, caplog):
    import papermill as pm

    expected = assignments(parameters_cell(path))
    assert {"SCALE", "OUT_DIR", "DATA_ROOT"} <= set(expected), f"{path.name}: the run's parameters are missing"
    with caplog.at_level(logging.DEBUG, logger="papermill"):
        inferred = pm.inspect_notebook(str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, f"{path.name}: papermill warned while reading the parameters: {warnings}"
    assert sorted(inferred) == sorted(expected), \
        f"{path.name}: papermill lists {sorted(inferred)}, the cell assigns {sorted(expected)}"
    for name, (default, comment) in expected.items():
        assert inferred[name]["default"] == default, (name, inferred[name]["default"], default)
        assert inferred[name]["help"] == comment, (name, inferred[name]["help"], comment)


def test_the_check_catches_what_papermill_cannot_read(tmp_path, caplog):
    """A tuple assignment and an '=' inside a comment: papermill lists neither, and warns about the second."""
    import nbformat
    import papermill as pm
    from nbformat.v4 import new_code_cell, new_notebook

    source = "A, B = 1, 2   # two at once\nC = 0.25   # exponent (0.5 = full)\nD = 3   # fine\n"
    nb = new_notebook(cells=[new_code_cell(source, metadata={"tags": ["parameters"]})],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    assert sorted(assignments(source)) == ["A", "B", "C", "D"]
    with caplog.at_level(logging.DEBUG, logger="papermill"):
        inferred = pm.inspect_notebook(str(path))
    assert sorted(inferred) == ["D"] and inferred["D"]["default"] == "3" and inferred["D"]["help"] == "fine"
    assert any("Unable to parse line 2" in r.getMessage() for r in caplog.records)
