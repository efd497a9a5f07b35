"""Sharded extraction under torchrun: 2 CPU processes (gloo) give what one process gives.

The offline default benchmark (no RETRIEVAL_DATA) at smoke size: a few images at 224 px.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval_lib.engine import distributed as D

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 7  # odd: the two shares differ in size


@pytest.fixture
def offline_images(monkeypatch):
    """The first images of the offline default (built here once, so the ranks only read it)."""
    from retrieval_lib.data.datasets import default_benchmark
    from retrieval_lib.data.images import ImageList

    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    db = default_benchmark().database
    assert db.name == "offline_default" or "offline" in repr(db)
    return ImageList(db.paths[:N_IMAGES], name="offline_default")


@pytest.fixture(scope="module")
def lite0():
    from retrieval_lib.models.backbones import load_backbone

    return load_backbone("efficientnet_lite0").eval()


def _single_process(model, images):
    from retrieval_lib.engine.extract import extract_descriptors, extract_fmaps
    from retrieval_lib.layers.pooling import MAC, GeM

    opts = dict(image_size=224, batch_size=2, num_workers=0, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each rank
    try:
        X = extract_descriptors(model, images, {"gem": GeM(p=3.0, learn_p=False), "mac": MAC()},
                                scales=(1, 0.5), **opts)
        fmaps = extract_fmaps(model, images, **opts)
    finally:
        torch.set_num_threads(threads)
    return X, fmaps


def test_two_processes_match_one(tmp_path, offline_images, lite0):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "RETRIEVAL_DATA")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "_shard_child.py"), str(tmp_path), str(N_IMAGES)]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["env"]["rank"] for r in ranks] == [0, 1] and {r["env"]["world_size"] for r in ranks} == {2}
    assert ranks[0]["pid"] != ranks[1]["pid"] and {r["backend"] for r in ranks} == {"gloo"}
    assert [r["got_result"] for r in ranks] == [True, False]  # only rank 0 gathers
    assert list((tmp_path / "shards").iterdir()) == []  # the share files were removed after gathering

    got = torch.load(tmp_path / "gathered.pt", weights_only=True)
    X, fmaps = _single_process(lite0, offline_images)
    assert set(got["X"]) == {"gem", "mac"}
    for label in X:
        assert got["X"][label].shape == X[label].shape == (N_IMAGES, 1280)
        assert torch.equal(got["X"][label], X[label]), (label, (got["X"][label] - X[label]).abs().max())
    assert len(got["fmaps"]) == N_IMAGES
    for a, b in zip(got["fmaps"], fmaps):
        assert torch.equal(a, b)


def test_one_process_is_the_plain_call(offline_images, lite0, monkeypatch, tmp_path):
    from retrieval_lib.engine.extract import extract_descriptors

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    images = D.ShardedImages(offline_images, [0, 1, 2])
    opts = dict(image_size=96, batch_size=2, num_workers=0, progress=False)
    with D.process_group() as env:
        assert env == {"rank": 0, "world_size": 1, "local_rank": 0}
        X = D.extract_sharded(lite0, images, "gem", tmp_path, **opts)
    assert torch.equal(X, extract_descriptors(lite0, images, "gem", **opts))
    assert list(tmp_path.iterdir()) == []  # nothing written for a single process


def test_shards_cover_every_index_once():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3):
            shares = [D.shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert D.shard_indices(7, 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        D.shard_indices(5, 2, 2)


def test_place_restores_the_original_order():
    parts = [([0, 2, 4], torch.tensor([[0.0], [2.0], [4.0]])), ([1, 3], torch.tensor([[1.0], [3.0]]))]
    assert D._place(parts, 5).flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    as_dict = [(idx, {"a": d, "b": -d}) for idx, d in parts]
    placed = D._place(as_dict, 5)
    assert placed["b"].flatten().tolist() == [0.0, -1.0, -2.0, -3.0, -4.0]
    maps = [([1], [torch.ones(2)]), ([0, 2], [torch.zeros(2), None])]
    out = D._place(maps, 3)
    assert out[0].sum() == 0 and out[1].sum() == 2 and out[2] is None


def test_sharded_view_keeps_paths_and_boxes():
    class _List:
        paths = ["a.jpg", "b.jpg", "c.jpg"]
        boxes = [None, (0, 0, 5, 5), None]
        name = "three"

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return f"image {self.paths[i]}"

    view = D.ShardedImages(_List(), [2, 1])
    assert len(view) == 2 and view.paths == ["c.jpg", "b.jpg"] and view.boxes == [None, (0, 0, 5, 5)]
    assert view[0] == "image c.jpg" and "shard of 2" in view.name


def test_environment_errors(monkeypatch, lite0):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 is not within WORLD_SIZE=2"):
        D.dist_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="must be integers"):
        D.dist_env()
    monkeypatch.setenv("RANK", "1")
    assert D.dist_env() == {"rank": 1, "world_size": 2, "local_rank": 0}
    with pytest.raises(RuntimeError, match="no process group is open"):
        D.extract_sharded(lite0, [], "gem", device="cpu")
    with pytest.raises(ValueError, match="needs a pooling"):
        D.extract_sharded(lite0, [], None)
    with pytest.raises(ValueError, match="'descriptors' or 'fmaps'"):
        D.extract_sharded(lite0, [], "gem", what="maps")


def test_rank_device_is_cpu_without_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.rank_device(0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.rank_device(1) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=2 but this machine has 2 GPU"):
        D.rank_device(2)  # more processes than GPUs
