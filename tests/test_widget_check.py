"""The headless widget check (``book/widget_check.py``): each control moved once, each redraw recorded."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from ipywidgets import Checkbox, Dropdown, FloatSlider, IntSlider, Text, ToggleButtons  # noqa: E402

from retrieval_lib.book import widget_check  # noqa: E402
from retrieval_lib.book.viz import live_figure  # noqa: E402


def test_other_value_moves_each_kind_of_control():
    assert widget_check.other_value(IntSlider(value=1, min=0, max=3)) == 3
    assert widget_check.other_value(IntSlider(value=3, min=0, max=3)) == 0
    assert widget_check.other_value(FloatSlider(value=0.5, min=0.0, max=2.0)) == 2.0
    assert widget_check.other_value(Checkbox(value=True)) is False
    assert widget_check.other_value(ToggleButtons(options=["a", "b", "c"], value="c")) == "a"
    assert widget_check.other_value(Dropdown(options=[("one", 1), ("two", 2)], value=1)) == 2
    assert widget_check.other_value(Dropdown(options={"x": 10, "y": 20}, value=20)) == 10
    assert widget_check.other_value(Text(value="q")) is widget_check._NOT_MOVED
    assert widget_check.other_value(Dropdown(options=["only"])) is widget_check._NOT_MOVED


def _draw(k, side="left"):
    if k == 3:
        raise ValueError("k = 3 breaks this figure")
    fig, ax = plt.subplots()
    if side == "left":
        ax.plot([0, k], [0, 1])
    plt.show()


def test_check_records_each_control_and_leaves_no_figure(tmp_path, monkeypatch):
    log = tmp_path / "widgets.jsonl"
    monkeypatch.setenv(widget_check.ENV_NOTEBOOK, "99_test")
    k = IntSlider(value=1, min=0, max=3, description="k (rank)")
    side = ToggleButtons(options=["left", "right"], value="left", description="side (of the plot)")
    figures = set(plt.get_fignums())
    records = widget_check.check_controls(_draw, {"k": k, "side": side}, path=str(log))
    assert set(plt.get_fignums()) == figures  # nothing left for the inline backend to show
    assert (k.value, side.value) == (1, "left")  # the controls are where they were
    by_control = {r["control"]: r for r in records}
    assert by_control["k (rank)"]["error"] == "ValueError: k = 3 breaks this figure"
    assert not by_control["k (rank)"]["drew"]
    assert by_control["side (of the plot)"]["error"] is None
    assert not by_control["side (of the plot)"]["drew"]  # a figure came out, with nothing on it
    assert widget_check.read_checks(log) == records
    assert {r["notebook"] for r in records} == {"99_test"}


def test_a_working_redraw_is_recorded_as_drawn(tmp_path):
    log = tmp_path / "widgets.jsonl"
    k = IntSlider(value=3, min=0, max=3, description="k (rank)")
    (record,) = widget_check.check_controls(_draw, {"k": k}, path=str(log))
    assert record["value"] == "0" and record["drew"] and record["error"] is None


def test_nothing_happens_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(widget_check.ENV_FILE, raising=False)
    calls = []
    assert widget_check.check_controls(lambda k: calls.append(k), {"k": IntSlider(description="k (rank)")}) == []
    assert calls == []
    assert widget_check.read_checks(tmp_path / "absent.jsonl") == []


def test_live_figure_runs_the_check_when_asked(tmp_path, monkeypatch):
    log = tmp_path / "widgets.jsonl"
    monkeypatch.setenv(widget_check.ENV_FILE, str(log))
    calls = []

    def draw(k):
        calls.append(k)
        plt.subplots()[1].plot([0, 1], [k, k])

    live_figure(draw, k=IntSlider(value=0, min=0, max=2, description="k (rank)"))
    assert calls == [2]
    assert [(r["control"], r["drew"]) for r in widget_check.read_checks(log)] == [("k (rank)", True)]


@pytest.mark.parametrize("value", [0, 2])
def test_live_figure_does_not_draw_without_the_variable(value, monkeypatch):
    monkeypatch.delenv(widget_check.ENV_FILE, raising=False)
    calls = []
    live_figure(calls.append, k=IntSlider(value=value, min=0, max=2, description="k (rank)"))
    assert calls == []
