"""`torchrun -m retrieval_lib reproduce`: the off-the-shelf extraction shared by 2 CPU processes gives the
table one process gives; only process 0 writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from retrieval_lib.book.reproduce import offtheshelf

REPO = Path(__file__).resolve().parents[1]


def _training_notebook(path):
    """A numbered notebook whose one cell trains (Trainer.fit), as 05-07 do, and records the world it saw."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('SCALE = "cpu"\nOUT_DIR = "x"\nDATA_ROOT = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from _train_problem import build, problem\n"
        "from retrieval_lib.book.report import write_metrics\n"
        "from retrieval_lib.engine.distributed import dist_env\n"
        "fmaps, labels = problem()\n"
        "history = build(fmaps, labels, epochs=1).fit()\n"
        "write_metrics(OUT_DIR, '00_train', {'world_size': dist_env()['world_size']}, scale=SCALE)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_two_processes_write_the_table_one_process_computes(tmp_path, monkeypatch):
    from retrieval_lib.data.datasets import default_benchmark

    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    default_benchmark()  # the offline default, built once before the two processes read it
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "RETRIEVAL_DATA")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               RETRIEVAL_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="")
    # with a notebook that trains: its kernel, started by process 0 after the others exited, must not
    # try to rejoin torchrun's process group (it would block in init_process_group)
    (tmp_path / "nbs").mkdir()
    _training_notebook(tmp_path / "nbs" / "00_train.ipynb")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "retrieval_lib",
           "reproduce", "--scale", "smoke", "--notebooks-dir", str(tmp_path / "nbs"), "--out", str(tmp_path / "out"),
           "--quiet"]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shared = json.loads((tmp_path / "out" / "offtheshelf.json").read_text())
    assert shared["device"] == "2 processes (cpu)"
    assert run.stdout.count("Off-the-shelf descriptors on") == 1  # process 1 printed and wrote nothing
    assert not list((tmp_path / "cache" / "features" / "shards").glob("*.pt"))  # shares removed after gathering
    trained = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(d["notebook"], d.get("failed", False), d["ours"]) for d in trained] == [
        ("00_train", False, {"world_size": 1})]

    single = offtheshelf("smoke", progress=False)  # one process, no feature cache
    assert shared["benchmark"] == single["benchmark"] and shared["n_database"] == single["n_database"]
    assert set(shared["rows"]) == set(single["rows"])
    for name, metrics in single["rows"].items():
        for key, value in metrics.items():
            assert shared["rows"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
