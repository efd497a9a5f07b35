"""Moving every live widget once in a headless run, so a redraw that breaks is seen.

papermill executes a notebook without a front end: nothing moves its sliders, so a
``draw`` that fails for any value but the first would pass unnoticed. When the environment
variable ``RETRIEVAL_WIDGET_CHECK`` names a file, :func:`~retrieval_lib.book.viz.live_figure`
hands its controls to :func:`check_controls` as soon as it has built them. For each control,
``draw`` is called once with that control at another value (a slider's other end, the next
option, a flipped box) and the others as they are -- outside any ``Output`` widget, with
``plt.show`` silenced and the new figures closed, so the notebook's outputs stay as they
were -- and one JSON line is appended to the file: the notebook (``RETRIEVAL_NOTEBOOK``,
which ``reproduce`` sets for each notebook it runs), the control's description, the value
tried, whether a figure with something drawn on it came out, and the error if ``draw``
raised. The README test's run sets the variable and ``tests/test_notebooks.py`` reads the
file: every control of every notebook has been redrawn once, at no extra notebook run.
"""
from __future__ import annotations

import json
import os
import traceback

ENV_FILE = "RETRIEVAL_WIDGET_CHECK"
ENV_NOTEBOOK = "RETRIEVAL_NOTEBOOK"

__all__ = ["ENV_FILE", "ENV_NOTEBOOK", "other_value", "check_controls", "read_checks"]

_NOT_MOVED = object()


def other_value(widget):
    """A value of ``widget`` other than its current one (``_NOT_MOVED`` for a free-text box).

    Selections (``options``) take the next option, a checkbox flips, a slider goes to its
    other end (the maximum, or the minimum when already there).
    """
    if hasattr(widget, "options"):
        options = widget.options
        pairs = list(options.items()) if isinstance(options, dict) else list(options)
        values = [o[1] if isinstance(o, tuple) and len(o) == 2 else o for o in pairs]
        if len(values) < 2:
            return _NOT_MOVED
        index = values.index(widget.value) if widget.value in values else -1
        return values[(index + 1) % len(values)]
    if isinstance(widget.value, bool):
        return not widget.value
    if hasattr(widget, "min") and hasattr(widget, "max"):
        return widget.max if widget.value != widget.max else widget.min
    return _NOT_MOVED


def _drew_something(fig) -> bool:
    return any(ax.has_data() or ax.images or ax.texts for ax in fig.axes)


def check_controls(draw, controls: dict, path: str | None = None) -> list:
    """Redraw ``draw`` once per control at another value; append and return one record each.

    ``path`` defaults to ``$RETRIEVAL_WIDGET_CHECK``; without either nothing is done.
    """
    path = path if path is not None else os.environ.get(ENV_FILE)
    if not path:
        return []
    import matplotlib.pyplot as plt

    current = {name: w.value for name, w in controls.items()}
    records = []
    for name, widget in controls.items():
        value = other_value(widget)
        record = {"notebook": os.environ.get(ENV_NOTEBOOK, ""), "control": str(widget.description),
                  "kind": type(widget).__name__, "value": None if value is _NOT_MOVED else repr(value),
                  "moved": value is not _NOT_MOVED, "drew": False, "error": None}
        if value is not _NOT_MOVED:
            before = set(plt.get_fignums())
            show = plt.show
            plt.show = lambda *args, **kwargs: None
            try:
                draw(**{**current, name: value})
                new = [plt.figure(n) for n in plt.get_fignums() if n not in before]
                record["drew"] = any(_drew_something(fig) for fig in new)
            except Exception as exc:  # the point is to record it, not to stop the notebook
                record["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            finally:
                plt.show = show
                for n in plt.get_fignums():
                    if n not in before:
                        plt.close(n)
        records.append(record)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return records


def read_checks(path) -> list:
    """The records a run appended to ``path`` (none when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
