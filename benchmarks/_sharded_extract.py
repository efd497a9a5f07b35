"""One extraction run of the scale-out benchmark (``benchmarks/cpu.py``), alone or under torchrun.

usage: python benchmarks/_sharded_extract.py OUT.pt N_IMAGES IMAGE_SIZE THREADS
       torchrun --standalone --nproc_per_node=P benchmarks/_sharded_extract.py OUT.pt N_IMAGES IMAGE_SIZE THREADS

Extracts GeM descriptors of the first N_IMAGES database images of the default benchmark
with ``extract_sharded`` (the plain ``extract_descriptors`` call in a single process) and
THREADS torch threads per process. The clock starts after the model is loaded and every
process has reached a barrier, and stops when rank 0 holds every descriptor in order;
rank 0 saves ``{"X", "seconds", "world_size", "threads"}`` to OUT.pt.
"""
import sys
import time
from pathlib import Path

import torch

out, n, image_size, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)

from retrieval_lib.data.datasets import default_benchmark  # noqa: E402
from retrieval_lib.engine.allocator import tune_allocator  # noqa: E402
from retrieval_lib.engine.distributed import extract_sharded, process_group  # noqa: E402
from retrieval_lib.layers.pooling import GeM  # noqa: E402
from retrieval_lib.models.backbones import load_backbone  # noqa: E402

tune_allocator()
bench = default_benchmark()
images = bench.database
if n < len(images):
    from retrieval_lib.engine.distributed import ShardedImages

    images = ShardedImages(images, range(n))
model = load_backbone("efficientnet_lite0").eval()
pooling = GeM(p=3.0, learn_p=False)
shards = out.parent / f"{out.stem}-shards"  # the same folder for every rank; rank 0 empties it
with process_group() as env:
    if env["world_size"] > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    X = extract_sharded(model, images, pooling, shards, image_size=image_size, batch_size=8, progress=False)
    seconds = time.perf_counter() - t0
    if env["rank"] == 0:
        torch.save({"X": X, "seconds": seconds, "world_size": env["world_size"], "threads": threads,
                    "dataset": bench.name}, out)
