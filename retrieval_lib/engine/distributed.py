"""Several processes (CPU processes or GPUs) from ``torchrun``, and extraction sharded across them.

``torchrun --nproc_per_node=N script.py`` starts N copies of a script with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous address in their environment. The helpers
here read that environment, open the process group once (``gloo`` on CPU, ``nccl`` when
every process has a GPU) and close it, so that extraction, and later training, share
one way of doing it::

    # torchrun --nproc_per_node=2 extract.py
    from retrieval_lib.engine.distributed import extract_sharded, process_group
    with process_group():
        X = extract_sharded(model, images, "gem", out_dir="shards/", image_size=512)
    if X is not None:  # rank 0: the descriptors of every image, in the list's order
        torch.save(X, "X.pt")

:func:`extract_sharded` gives rank r the images ``r, r + N, r + 2N, ...`` (strided, so
that the large and small photos of a folder spread over the ranks), extracts them with
:func:`~retrieval_lib.engine.extract.extract_descriptors` (or ``extract_fmaps``) on its
device, writes its share atomically (a temporary file, then a rename), and after a
barrier rank 0 reads every share back and puts the rows in the original order. Every
image is computed by exactly the same code as in one process; the result is the same
as a single-process run (``tests/test_distributed.py`` checks it with 2 CPU processes).
"""
from __future__ import annotations

import datetime
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from retrieval_lib.engine.extract import extract_descriptors, extract_fmaps
from retrieval_lib.files import save_atomic

__all__ = [
    "dist_env",
    "init_process_group",
    "close_process_group",
    "process_group",
    "rank_device",
    "shard_indices",
    "ShardedImages",
    "extract_sharded",
]


def dist_env() -> dict:
    """``rank``, ``world_size``, ``local_rank`` of this process.

    From the open process group when there is one, else from torchrun's environment
    variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process (0, 1, 0).
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "local_rank": local}
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE must be integers (torchrun sets them), got "
                         f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}") from err
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not within WORLD_SIZE={world}; start the processes with torchrun "
                         "(e.g. `torchrun --nproc_per_node=2 script.py`) or unset both variables")
    return {"rank": rank, "world_size": world, "local_rank": local}


def rank_device(local_rank: int | None = None) -> torch.device:
    """The device of this process: GPU ``local_rank`` when CUDA is available, else the CPU.

    Raises ``RuntimeError`` when there are GPUs but fewer than the processes on this machine
    (two processes on one GPU would break NCCL).
    """
    local = dist_env()["local_rank"] if local_rank is None else int(local_rank)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local >= count:
        raise RuntimeError(f"LOCAL_RANK={local} but this machine has {count} GPU(s); start at most one process "
                           f"per GPU (torchrun --nproc_per_node={count}), or hide the GPUs "
                           "(CUDA_VISIBLE_DEVICES=) to run every process on the CPU")
    return torch.device("cuda", local)


def init_process_group(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Open the process group from torchrun's environment when there are several processes.

    Does nothing (returns False) for a single process or when a group is already open
    (e.g. by a trainer); otherwise opens it and returns True: the caller then owns it
    and closes it with :func:`close_process_group`. ``backend`` defaults to ``nccl``
    when this process has a GPU (and binds it to GPU ``LOCAL_RANK``), else ``gloo``.
    """
    env = dist_env()
    if env["world_size"] == 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process "
                           "or install a torch build with distributed support")
    device = rank_device(env["local_rank"])
    if backend is None:
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def close_process_group() -> None:
    """Close the process group if one is open (after a last barrier, so no rank leaves early)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(backend: str | None = None, timeout_s: float = 1800.0):
    """``with process_group() as env:`` opens the group if needed (see :func:`init_process_group`),
    yields :func:`dist_env`, and closes the group on exit only if it opened it."""
    opened = init_process_group(backend, timeout_s)
    try:
        yield dist_env()
    finally:
        if opened:
            close_process_group()


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The indices of rank ``rank``'s share of ``n`` items: ``rank, rank + world_size, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, n, world_size))


class ShardedImages:
    """A view of some items of an image list, in the order of ``indices``.

    Keeps what extraction reads from an ``ImageList``: ``paths`` and ``boxes`` (for the
    size-grouped batching and the cache key), indexing and ``len``.
    """

    def __init__(self, images, indices):
        self.images = images
        self.indices = [int(i) for i in indices]
        paths = getattr(images, "paths", None)
        boxes = getattr(images, "boxes", None)
        if paths is not None:
            self.paths = [paths[i] for i in self.indices]
        if boxes is not None:
            self.boxes = [boxes[i] for i in self.indices]
        self.name = f"{getattr(images, 'name', '') or 'images'}[shard of {len(self.indices)}]"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.images[self.indices[i]]


def _run_token(world: int) -> str:
    """One random name shared by every rank of this call (rank 0 draws it), so that shares of
    an earlier or concurrent run in the same folder are never gathered by mistake."""
    box = [uuid.uuid4().hex[:12]]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _place(parts: list, n: int):
    """Put the rows of every rank's share back in the original order.

    ``parts``: ``(indices, data)`` per rank, where data is a tensor ``(k, D)``, a dict of
    such tensors, or a list of ``k`` feature maps.
    """
    kind = parts[0][1]
    if isinstance(kind, dict):
        return {label: _place([(idx, d[label]) for idx, d in parts], n) for label in kind}
    if isinstance(kind, torch.Tensor):
        out = kind.new_zeros((n,) + tuple(kind.shape[1:]))
        for idx, d in parts:
            out[torch.as_tensor(idx, dtype=torch.long)] = d
        return out
    out = [None] * n
    for idx, d in parts:
        for i, item in zip(idx, d):
            out[i] = item
    return out


def extract_sharded(model, images, pooling=None, out_dir: str | os.PathLike = "shards", what: str = "descriptors",
                    device=None, keep_shards: bool = False, **kwargs):
    """Extract a large image list with every process of the group; rank 0 returns the whole result.

    Args:
        model: a backbone (moved to this rank's device, :func:`rank_device`, unless
            ``device`` is given).
        images: an indexable image list (``ImageList``).
        pooling: as in :func:`~retrieval_lib.engine.extract.extract_descriptors`
            (a name, a module, or a dict of them); ignored for ``what="fmaps"``.
        out_dir: a folder every rank can read and write (a shared file system across
            machines); each rank writes ``<token>-rank<r>-of<N>.pt`` there.
        what: ``"descriptors"`` (``extract_descriptors``) or ``"fmaps"`` (``extract_fmaps``).
        keep_shards: keep the share files after gathering (default: rank 0 deletes them).
        **kwargs: passed on (``image_size``, ``scales``, ``batch_size``, ``cache_dir``, ...).

    Returns, on rank 0, what the single-process call returns for the whole list
    (``(N, D)`` descriptors, a dict of them, or N feature maps), in the list's order;
    ``None`` on the other ranks. Without a process group (one process) it is the
    single-process call.
    """
    if what not in ("descriptors", "fmaps"):
        raise ValueError(f"what must be 'descriptors' or 'fmaps', got {what!r}")
    if what == "descriptors" and pooling is None:
        raise ValueError("extract_sharded(what='descriptors') needs a pooling (e.g. 'gem'); "
                         "use what='fmaps' for the feature maps")
    env = dist_env()
    rank, world = env["rank"], env["world_size"]
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"WORLD_SIZE={world} but no process group is open; call it inside "
                           "`with process_group():` (or init_process_group() first)")
    device = torch.device(device) if device is not None else rank_device(env["local_rank"])
    model = model.to(device)

    def extract(subset):
        if what == "fmaps":
            return extract_fmaps(model, subset, device=device, **kwargs)
        return extract_descriptors(model, subset, pooling, device=device, **kwargs)

    if world == 1:
        return extract(images)
    n = len(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token = _run_token(world)
    idx = shard_indices(n, rank, world)
    data = extract(ShardedImages(images, idx)) if idx else None
    save_atomic({"indices": idx, "data": data, "n": n, "rank": rank, "world_size": world},
                 out / f"{token}-rank{rank}-of{world}.pt")
    dist.barrier()  # every share is on disk
    if rank != 0:
        return None
    parts = []
    for r in range(world):
        path = out / f"{token}-rank{r}-of{world}.pt"
        share = torch.load(path, map_location="cpu", weights_only=True)
        if share["n"] != n or share["rank"] != r:
            raise RuntimeError(f"share file {path} does not belong to this run (n={share['n']}, rank="
                               f"{share['rank']}); remove stale files from {out} and run again")
        if share["indices"]:
            parts.append((share["indices"], share["data"]))
        if not keep_shards:
            path.unlink()
    return _place(parts, n)
