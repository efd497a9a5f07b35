"""One process of the 2-process sharded-extraction test (run by torchrun, gloo on CPU).

usage: torchrun --standalone --nproc_per_node=2 tests/_shard_child.py OUT_DIR N_IMAGES
Rank 0 saves the gathered descriptors (GeM and MAC at two scales) and feature maps to
OUT_DIR/gathered.pt; every rank records what it extracted in OUT_DIR/rank<r>.json.
"""
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # two processes on the test machine's cores

from retrieval_lib.data.datasets import default_benchmark  # noqa: E402
from retrieval_lib.data.images import ImageList  # noqa: E402
from retrieval_lib.engine.distributed import dist_env, extract_sharded, process_group  # noqa: E402
from retrieval_lib.layers.pooling import GeM, MAC  # noqa: E402
from retrieval_lib.models.backbones import load_backbone  # noqa: E402

out, n = Path(sys.argv[1]), int(sys.argv[2])
db = default_benchmark().database
images = ImageList(db.paths[:n], name="offline_default")
model = load_backbone("efficientnet_lite0").eval()
opts = dict(image_size=224, batch_size=2, num_workers=0, progress=False)
with process_group() as env:
    X = extract_sharded(model, images, {"gem": GeM(p=3.0, learn_p=False), "mac": MAC()}, out / "shards",
                        scales=(1, 0.5), **opts)
    fmaps = extract_sharded(model, images, out_dir=out / "shards", what="fmaps", **opts)
    (out / f"rank{env['rank']}.json").write_text(json.dumps(
        {"env": env, "pid": os.getpid(), "backend": torch.distributed.get_backend(),
         "got_result": X is not None}))
    if env["rank"] == 0:
        torch.save({"X": X, "fmaps": fmaps}, out / "gathered.pt")
assert dist_env()["world_size"] == 2 and not torch.distributed.is_initialized()
