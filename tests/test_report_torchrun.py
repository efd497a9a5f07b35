"""`torchrun -m retrieval_lib reproduce`: the off-the-shelf extraction shared by 2 CPU processes gives the
table one process gives; only process 0 writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval_lib.book.reproduce import offtheshelf

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_write_the_table_one_process_computes(tmp_path, monkeypatch):
    from retrieval_lib.data.datasets import default_benchmark

    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    default_benchmark()  # the offline default, built once before the two processes read it
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "RETRIEVAL_DATA")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               RETRIEVAL_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "retrieval_lib",
           "reproduce", "--scale", "smoke", "--notebooks", "none", "--out", str(tmp_path / "out"), "--quiet"]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shared = json.loads((tmp_path / "out" / "offtheshelf.json").read_text())
    assert shared["device"] == "2 processes (cpu)"
    assert run.stdout.count("Off-the-shelf descriptors on") == 1  # process 1 printed and wrote nothing
    assert not list((tmp_path / "cache" / "features" / "shards").glob("*.pt"))  # shares removed after gathering

    single = offtheshelf("smoke", progress=False)  # one process, no feature cache
    assert shared["benchmark"] == single["benchmark"] and shared["n_database"] == single["n_database"]
    assert set(shared["rows"]) == set(single["rows"])
    for name, metrics in single["rows"].items():
        for key, value in metrics.items():
            assert shared["rows"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
