"""retrieval_lib.data.sfm120k: rSfM-120k download and reading against a loopback HTTP server
(a stand-in with cirtorch's file layout; nothing is fetched from the internet), then the
paper recipe trained end to end on it for a step with a tiny backbone."""
import io
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _http import Route, serve, tgz  # noqa: E402

from retrieval_lib.data.sfm120k import SFM_NAME, cid2filename, download_sfm120k, load_sfm120k  # noqa: E402


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _stand_in(prefix: str = ""):
    """A tiny rSfM-120k: 12 train and 6 val images, clusters of 3; the archive and the db."""
    cids = {m: [f"{m}{k:02d}aabbccdd{k:04d}" for k in range(n)] for m, n in (("train", 12), ("val", 6))}
    db = {}
    for m, ids in cids.items():
        cluster = [k // 3 for k in range(len(ids))]
        q = [k for k in range(len(ids)) if k % 3 == 0]
        db[m] = {"cids": ids, "cluster": cluster, "qidxs": q, "pidxs": [k + 1 for k in q]}
    files = {cid2filename(c, prefix).lstrip("/"): _jpeg(i) for i, c in enumerate(cids["train"] + cids["val"])}
    return db, tgz(files), cids


def _serve(db, archive, whiten=b"whiten"):
    return serve({
        f"/train/dbs/{SFM_NAME}.pkl": Route(pickle.dumps(db)),
        f"/train/dbs/{SFM_NAME}-whiten.pkl": Route(whiten),
        "/train/ims/ims.tar.gz": Route(archive),
    })


def test_cid2filename_is_cirtorchs_layout():
    assert cid2filename("abcdef123456", "/ims") == "/ims/56/34/12/abcdef123456"


@pytest.mark.parametrize("prefix", ["", "ims"])  # images at the archive's top, or under one folder
def test_download_then_load(tmp_path, prefix):
    db, archive, cids = _stand_in(prefix)
    srv = _serve(db, archive)
    try:
        base = download_sfm120k(tmp_path, base_url=srv.url(""), progress=False)
        assert base == tmp_path / "train" / SFM_NAME
        assert not (base / "ims.tar.gz").exists() and not (base / "ims.unpacked").exists()
        requests = len(srv.log)
        again = download_sfm120k(tmp_path, base_url=srv.url(""), progress=False)  # everything there
        assert again == base
        assert not [p for p, _ in srv.log[requests:] if p.endswith("ims.tar.gz")]
    finally:
        srv.shutdown()
    train = load_sfm120k(tmp_path, "train")
    assert len(train) == 12 and train.labels.tolist() == [k // 3 for k in range(12)]
    assert train.queries.tolist() == [0, 3, 6, 9] and train.positives.tolist() == [1, 4, 7, 10]
    assert train.images.paths[5] == cid2filename(cids["train"][5], base / "ims")
    assert np.array_equal(np.asarray(train.images[2]),
                          np.asarray(Image.open(io.BytesIO(_jpeg(2))).convert("RGB")))
    val = load_sfm120k(tmp_path, "val")
    assert len(val) == 6 and val.name.endswith("/val")


def test_an_archive_missing_images_is_reported(tmp_path):
    db, _, cids = _stand_in()
    files = {cid2filename(c, "").lstrip("/"): _jpeg(i) for i, c in enumerate(cids["train"])}  # no val images
    srv = _serve(db, tgz(files))
    try:
        with pytest.raises(FileNotFoundError, match="6 images listed"):
            download_sfm120k(tmp_path, base_url=srv.url(""), progress=False)
    finally:
        srv.shutdown()
    with pytest.raises(FileNotFoundError, match="6 rSfM-120k images are missing"):
        load_sfm120k(tmp_path, "val")
    assert len(load_sfm120k(tmp_path, "val", check_files=False)) == 6


def test_a_database_that_would_run_code_is_refused(tmp_path):
    base = tmp_path / "train" / SFM_NAME
    base.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (base / f"{SFM_NAME}.pkl").write_bytes(pickle.dumps({"train": Evil(), "val": {}}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_sfm120k(tmp_path)
    (base / f"{SFM_NAME}.pkl").write_bytes(pickle.dumps({"train": {"cids": []}}))
    with pytest.raises(ValueError, match="lacks db"):
        load_sfm120k(tmp_path)


def test_numpy_arrays_in_the_database_are_read(tmp_path):
    db, _, cids = _stand_in()
    db["train"]["cluster"] = np.array(db["train"]["cluster"])
    base = tmp_path / "train" / SFM_NAME
    base.mkdir(parents=True)
    (base / f"{SFM_NAME}.pkl").write_bytes(pickle.dumps(db))
    assert load_sfm120k(tmp_path, check_files=False).labels.tolist() == [k // 3 for k in range(12)]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        load_sfm120k(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="download_sfm120k"):
        load_sfm120k(tmp_path)
    db, _, _ = _stand_in()
    db["train"]["pidxs"][0] = 99
    base = tmp_path / "train" / SFM_NAME
    base.mkdir(parents=True)
    (base / f"{SFM_NAME}.pkl").write_bytes(pickle.dumps(db))
    with pytest.raises(ValueError, match=r"pairs point outside 0..11"):
        load_sfm120k(tmp_path, check_files=False)


def test_no_data_root(monkeypatch):
    monkeypatch.delenv("RETRIEVAL_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="no data root"):
        load_sfm120k()


def test_the_gem_recipe_trains_end_to_end_on_the_stand_in(tmp_path):
    from test_trainer import TinyBackbone

    from retrieval_lib.engine.recipes import RECIPES, paper_trainer
    from retrieval_lib.layers.pooling import GeM

    db, archive, _ = _stand_in()
    srv = _serve(db, archive)
    try:
        download_sfm120k(tmp_path, base_url=srv.url(""), progress=False)
    finally:
        srv.shutdown()
    data = load_sfm120k(tmp_path, "train")
    bb = TinyBackbone()
    trainer = paper_trainer("gem", bb, GeM(p=3.0), data, checkpoint_dir=tmp_path / "ckpt", epochs=1,
                            n_queries=4, pool_size=12, n_neg=2, batch_size=2, image_size=40, lr=1e-3,
                            device="cpu", progress=False, workers=1)
    assert trainer.settings.lr == 1e-3 and trainer.miner.n_neg == 2 and trainer.objective.margin == RECIPES["gem"]["margin"]
    assert trainer.settings.schedule_name == "exponential" and trainer.settings.optimizer == "adam"
    before = bb.conv.weight.detach().clone()
    hist = trainer.fit()
    assert len(hist["loss"]) == 2 and all(math.isfinite(v) for v in hist["loss"])
    assert not torch.equal(before, bb.conv.weight)
    assert trainer.config()["user"]["recipe"] == "gem"
    assert (tmp_path / "ckpt" / "ckpt-000000002.pt").is_file()
    with pytest.raises(ValueError, match="unknown recipe"):
        paper_trainer("netvlad", bb, GeM(), data)
