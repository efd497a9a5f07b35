"""The full scale's dry run: ``reproduce --scale full`` runs every notebook on a CPU stand-in of its setting.

The stand-in (``tests/_standin.py``) is revisited Oxford in its download layout (the real ground
truth cut to 3 queries and 14 images when ``../shared/data/revisited_gnd`` is there), random
ResNet-101 weights where torch.hub looks for the ImageNet ones (``TORCH_HOME``), and -- in the second
run -- tiny rSfM-120k and CUB-200-2011. ``RETRIEVAL_MAX_SIZE`` (the documented dry run of
:mod:`retrieval_lib.book.config`) caps every image size at :data:`MAX_SIZE` px and cuts the end-to-end
recipes to one short epoch, so the ``full`` code path of all eleven notebooks runs in minutes.

What is checked is what a GPU user meets, not numbers (they mean nothing here): every notebook runs or is
recorded as not runnable with the command that fixes it; the exit code; results.md lists every notebook,
also after a rerun of some; each notebook says what it measures at ``full``; without rSfM-120k and CUB,
05 and 07 run their other sections and print the ``download`` command; with them, 05's and 07's
end-to-end cells train, checkpoint under the run's output, and a rerun resumes.

A dry run also gives every per-scale setting of a notebook its ``smoke`` value at ``full``
(:data:`~retrieval_lib.book.config.DRY_RUN_SETTINGS_CELL`, added by ``reproduce``), so the runs take
minutes, not the hour the notebooks' own full settings took. They are part of ``pytest`` (and so of
CI), marked ``fullscale``: ``python -m pytest -m fullscale tests/test_fullscale.py`` runs them alone,
``-m "not fullscale"`` leaves them out while working.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval_lib.book.config import (DRY_RUN_SETTINGS_CELL, MAX_SIZE_ENV, capped_sizes, dry_run_recipe, max_size,
                                      scale_config)
from retrieval_lib.book.needs import NOTEBOOKS
from retrieval_lib.book.reproduce import with_dry_run_cell
from retrieval_lib.errors import UsageError
from retrieval_lib.engine.recipes import CGD_RECIPE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _standin import add_extra, build_standin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_SIZE = 96
RUN_TIMEOUT_S = 3600


def test_the_dry_run_caps_every_size_of_a_scale_and_cuts_the_recipes(monkeypatch):
    monkeypatch.delenv(MAX_SIZE_ENV, raising=False)
    full = scale_config("full")
    assert max_size() is None and full.image_size == 1024 and full.capped_from is None
    assert capped_sizes([512, 768, 1024], "full") == [512, 768, 1024] and dry_run_recipe(CGD_RECIPE) == {}
    monkeypatch.setenv(MAX_SIZE_ENV, "64")
    cfg = scale_config("full")
    assert (cfg.image_size, cfg.capped_from, cfg.scales, cfg.data) == (64, 1024, full.scales, "roxford5k")
    assert "a dry run" in cfg.summary() and "a dry run" not in full.summary()
    assert capped_sizes([512, 768, 1024], "full") == [32, 48, 64]  # 02's IMAGE_SIZES keeps its shape
    assert capped_sizes((224, 448, 672, 896, 1120), cfg) == [32, 42, 56, 70]  # 06's SIZES: 14 px -> 32, once
    assert capped_sizes([160, 224], "smoke") == [46, 64]  # a cap below smoke's 224 px scales it too
    assert capped_sizes([256, 512], "cpu") == [32, 64]
    assert dry_run_recipe(CGD_RECIPE) == {"train_size": 32, "crop": 32, "test_size": 32, "epochs": 1, "P": 4}
    gem = {"epochs": 100, "n_queries": 2000, "pool_size": 22000, "batch_size": 5, "image_size": 362, "lr": 5e-7}
    assert dry_run_recipe(gem) == {"image_size": 32, "epochs": 1, "n_queries": 4, "pool_size": 16, "batch_size": 2}
    monkeypatch.setenv(MAX_SIZE_ENV, "2048")  # above the scale's size: nothing changes
    assert scale_config("full") == full and capped_sizes([512, 1024], "full") == [512, 1024]


def test_the_dry_run_cell_gives_every_per_scale_setting_its_smoke_value_at_the_running_scale(capsys):
    space = {"SCALE": "full", "EPOCHS": {"smoke": 2, "cpu": 6, "full": 30}, "SIZES": {"smoke": (128, 224),
             "cpu": (224,), "full": (224, 1120)}, "LR": {"gordo": 1e-4, "darac": 1e-2}, "CAP": {"smoke": 12, "full": None},
             "P_INIT": 3.0}
    exec(DRY_RUN_SETTINGS_CELL, space)
    assert space["EPOCHS"] == {"smoke": 2, "cpu": 6, "full": 2}
    assert space["SIZES"] == {"smoke": (128, 224), "cpu": (224,), "full": (128, 224)}
    # dicts not keyed by the three scales, and plain values, are left alone
    assert space["LR"] == {"gordo": 1e-4, "darac": 1e-2} and space["CAP"] == {"smoke": 12, "full": None}
    assert space["P_INIT"] == 3.0
    assert "dry run: EPOCHS['full'] = 2 (smoke's), not 30" in capsys.readouterr().out


def test_reproduce_adds_the_dry_run_cell_after_the_parameters_only_in_a_dry_run(monkeypatch, tmp_path):
    nb = REPO / "notebooks" / "05_wgem.ipynb"
    monkeypatch.delenv(MAX_SIZE_ENV, raising=False)
    plain = with_dry_run_cell(nb)
    at = next(i for i, c in enumerate(plain.cells) if "parameters" in c.metadata.get("tags", []))
    assert all("dry-run-settings" not in c.metadata.get("tags", []) for c in plain.cells)
    monkeypatch.setenv(MAX_SIZE_ENV, "96")
    dry = with_dry_run_cell(nb)
    assert len(dry.cells) == len(plain.cells) + 1 and dry.cells[at + 1].source == DRY_RUN_SETTINGS_CELL
    assert dry.cells[at + 1].metadata["tags"] == ["dry-run-settings"]
    bare = tmp_path / "bare.ipynb"  # no parameters cell: the dry run says it cannot set the settings
    bare.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {}, "id": "c0", "source": "x = 1", "outputs": [],
                                           "execution_count": None}], "metadata": {}, "nbformat": 4,
                                "nbformat_minor": 5}))
    with pytest.raises(UsageError, match="no cell tagged 'parameters'"):
        with_dry_run_cell(bare)


@pytest.mark.parametrize("value", ["abc", "16", "-5", "64px"])
def test_a_dry_run_size_that_is_not_understood_is_refused(monkeypatch, value):
    monkeypatch.setenv(MAX_SIZE_ENV, value)
    with pytest.raises(ValueError, match=f"{MAX_SIZE_ENV}=.*at least 32"):
        scale_config("full")


@pytest.fixture(scope="module")
def standin(tmp_path_factory, data_root):
    where = tmp_path_factory.mktemp("fullscale")
    found = build_standin(where, data_root)
    found["cache"] = where / "cache"
    return found


def _reproduce(standin, out: Path, notebooks: str = "all", data=None, **extra_env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RETRIEVAL_DATA", "RETRIEVAL_SCALE", "RETRIEVAL_TRAIN_MINUTES")}
    env.update(TORCH_HOME=str(standin["torch_home"]), RETRIEVAL_CACHE=str(standin["cache"]),
               **{MAX_SIZE_ENV: str(MAX_SIZE)}, **extra_env)
    cmd = [sys.executable, "-m", "retrieval_lib", "reproduce", "--scale", "full", "--data",
           str(data or standin["data"]), "--out", str(out), "--notebooks", notebooks, "--quiet"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _outputs(out: Path, notebook: str) -> str:
    """Every text the executed copy of ``notebook`` shows (stream, markdown and plain outputs)."""
    doc = json.loads((out / "notebooks" / notebook / f"{notebook}.ipynb").read_text())
    texts = []
    for cell in doc["cells"]:
        for o in cell.get("outputs", []):
            if "text" in o:
                texts.append("".join(o["text"]))
            for kind in ("text/markdown", "text/plain"):
                if kind in o.get("data", {}):
                    texts.append("".join(o["data"][kind]))
    return "\n".join(texts)


def _results(out: Path) -> tuple[list, str]:
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


@pytest.mark.fullscale
def test_without_rsfm_and_cub_every_notebook_runs_and_says_what_to_fetch(standin, tmp_path):
    """The Colab-like data root (revisited Oxford only): all eleven notebooks run, exit 0."""
    out = tmp_path / "r"
    run = _reproduce(standin, out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    docs, md = _results(out)
    assert [d["notebook"] for d in docs] == list(NOTEBOOKS)
    assert [d["notebook"] for d in docs if d.get("failed")] == []
    for nb in NOTEBOOKS:
        assert f"| {nb} | full |" in md, nb
    shelf = json.loads((out / "offtheshelf.json").read_text())
    assert shelf["benchmark"] == "roxford5k" and shelf["image_size"] == MAX_SIZE and "a dry run" in shelf["setting"]
    data = standin["data"]
    for nb in NOTEBOOKS:
        text = _outputs(out, nb)
        # each says up front what it measures at full: revisited Oxford, or what instead and why
        assert (f"**roxford5k** -- the benchmark every section measures; present" in text
                or "At this scale it measures" in text), nb
    text05, text07 = _outputs(out, "05_wgem"), _outputs(out, "07_cgd")
    assert f"python -m retrieval_lib download rsfm120k --data {data}" in text05
    assert "the paper's recipe is skipped" in text05
    assert f"python -m retrieval_lib download cub --data {data}" in text07 and "section 6 is skipped" in text07
    for nb in ("05_wgem", "08_whitening"):  # the released network is not in the cache: the command, no download
        assert "python -m retrieval_lib download " in _outputs(out, nb) and "then rerun this cell" in _outputs(out, nb)
    assert not (out / "notebooks" / "05_wgem" / "checkpoints").exists()


@pytest.mark.fullscale
def test_with_rsfm_and_cub_the_end_to_end_cells_train_in_resumable_chunks(standin, tmp_path):
    """rSfM-120k and CUB added: 05's and 07's end-to-end cells state their cost and train under a time budget
    (``TRAIN_MINUTES``, here from ``RETRIEVAL_TRAIN_MINUTES``), stop checkpointed and say to rerun; a rerun
    without a budget resumes from the checkpoints and finishes; results accumulate over reruns."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "roxford5k").symlink_to(standin["data"] / "roxford5k", target_is_directory=True)
    add_extra(data, standin["torch_home"])
    out = tmp_path / "r"
    run = _reproduce(standin, out, "05,07", data=data, RETRIEVAL_TRAIN_MINUTES="1e-6")  # one step, then stop
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text05, text07 = _outputs(out, "05_wgem"), _outputs(out, "07_cgd")
    assert "the paper's recipe, per head: 1 epochs" in text05 and "Time on a GPU: not measured" in text05
    assert "CGD's recipe, per configuration" in text07 and "Time on a GPU: not measured" in text07
    for text, names in ((text05, ("gem", "wgem")), (text07, ("MG", "SG", "SMG"))):
        for name in names:
            assert f"{name}: stopped at step 1 when TRAIN_MINUTES = 1e-06 ran out, checkpointed" in text, name
    for name in ("gem", "wgem"):
        assert [p.name for p in (out / "notebooks" / "05_wgem" / "checkpoints" / name).glob("ckpt-*.pt")] == \
            ["ckpt-000000001.pt"], name
    docs, _ = _results(out)
    assert not any(k.startswith("R@1/cub200/") for k in next(d for d in docs if d["notebook"] == "07_cgd")["ours"])
    rerun = _reproduce(standin, out, "07", data=data)  # a new session without a budget: resumes and finishes
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    text07 = _outputs(out, "07_cgd")
    for name in ("MG", "SG", "SMG"):
        assert f"{name}: resumed from " in text07 and "stopped at step" not in text07, name
    docs, md = _results(out)
    assert [d["notebook"] for d in docs] == ["05_wgem", "07_cgd"]  # this folder's runs only, both kept
    assert any(k.startswith("R@1/cub200/") for k in docs[1]["ours"])


def test_without_revisited_oxford_nothing_runs_and_the_command_is_named(tmp_path):
    """Refused before anything runs (no weights needed): exit 3 and the command that fetches the benchmark."""
    empty = tmp_path / "data"
    empty.mkdir()
    run = _reproduce({"torch_home": tmp_path / "torch", "cache": tmp_path / "cache"}, tmp_path / "r", data=empty)
    assert run.returncode == 3 and f"python -m retrieval_lib download roxford5k --data {empty}" in run.stderr
    assert not (tmp_path / "r" / "results.md").exists()
