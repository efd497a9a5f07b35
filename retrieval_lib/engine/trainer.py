"""One training engine for every head: reduced (frozen backbone, cached maps) and full (end to end).

The pieces are arguments, so one loop trains GeM, wGeM and the later heads:

* a model, :class:`~retrieval_lib.models.retrieval_net.RetrievalNet` -- ``backbone`` (``None`` in reduced mode: the inputs are
  feature maps) -> ``pooling`` -> L2 -> optional ``whiten`` (an FC layer, as cirtorch's
  end-to-end whitening) -> L2, plus an optional ``classifier`` on the descriptor;
* a source of inputs: :class:`MapSource` (feature maps extracted once, reduced mode) or
  :class:`ImageSource` (decoded images, full mode);
* a miner (:mod:`retrieval_lib.engine.mining`) that plans each epoch's batches, re-mining
  with the current model when it needs to;
* an objective (:mod:`retrieval_lib.engine.objectives`) that turns a batch's descriptors
  into a loss;
* an optimizer (a name or a factory) over parameter groups (:func:`param_groups`: GeM's and
  wGeM's ``p`` at 10x the base learning rate and no weight decay, as cirtorch trains ``p``)
  and a schedule (:data:`SCHEDULES`).

:class:`Trainer` adds a progress bar with the running loss, checkpoints written atomically
with their configuration, resume from the newest readable checkpoint (a file cut short
while being written is skipped), a stop with a message naming the step when the loss is
NaN or infinite, AMP and channels_last on CUDA, and DistributedDataParallel when started by
``torchrun --nproc_per_node=N`` (each process takes an equal share of every batch; the
result equals one process with the whole batch). Taught in ``notebooks/05_wgem.ipynb``.

Reduced (CPU) mode: :func:`reduced_source` makes augmented views of the training images
(:func:`retrieval_lib.engine.views.make_views`), extracts their maps once through the
extraction cache and returns a :class:`MapSource`. Full (GPU) mode: :func:`paper_trainer`
wires a backbone and a pooling to rSfM-120k (:mod:`retrieval_lib.data.sfm120k`) with
cirtorch's mining and the papers' settings (:data:`RECIPES`).
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from retrieval_lib.models.retrieval_net import RetrievalNet
from retrieval_lib.layers.pooling import GeM, WGeM

__all__ = ["RetrievalNet", "MapSource", "ImageSource", "param_groups", "Trainer", "SCHEDULES", "RECIPES",
           "latest_checkpoint", "load_checkpoint", "reduced_source", "paper_trainer", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "retrieval_lib.trainer/1"
_CKPT = re.compile(r"^ckpt-(\d{9})\.pt$")


# --------------------------------------------------------------------------- inputs
class MapSource:
    """Reduced-mode inputs: feature maps computed once, a list of ``(C, h, w)`` tensors.

    ``labels`` (optional, ``(N,)``) are kept for the miner. ``load(indices)`` returns the maps.
    """

    kind = "maps"

    def __init__(self, fmaps: Sequence[torch.Tensor], labels=None):
        if len(fmaps) == 0 or any(f is None for f in fmaps):
            raise ValueError("MapSource: every image needs a feature map (no empty list, no None: "
                             "drop unreadable images before training)")
        self.fmaps = list(fmaps)
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and len(self.labels) != len(self.fmaps):
            raise ValueError(f"MapSource: {len(self.labels)} labels for {len(self.fmaps)} maps")

    def __len__(self) -> int:
        return len(self.fmaps)

    def load(self, indices) -> list:
        return [self.fmaps[i] for i in torch.as_tensor(indices).tolist()]

    def config(self) -> dict:
        return {"kind": self.kind, "n": len(self), "channels": int(self.fmaps[0].shape[0])}


class ImageSource:
    """Full-mode inputs: images decoded, resized (longer side ``image_size``, bicubic, as in
    extraction), scaled to ``[0, 1]`` and normalised with ``mean``/``std`` (the backbone's).

    ``load(indices)`` decodes with ``workers`` threads; returns ``(3, h, w)`` float tensors.
    """

    kind = "images"

    def __init__(self, images, image_size: int, mean, std, labels=None, workers: int = 4):
        self.images = images
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.labels = None if labels is None else np.asarray(labels)
        self.workers = max(1, int(workers))

    def __len__(self) -> int:
        return len(self.images)

    def _one(self, i: int) -> torch.Tensor:
        from retrieval_lib.engine.extract import resize_longer_side

        img = self.images[i]
        if img is None:
            raise ValueError(f"ImageSource: image {i} could not be read; drop it from the training set")
        arr = np.asarray(resize_longer_side(img, self.image_size), dtype=np.uint8)  # (h, w, 3)
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)
        return (x - self.mean) / self.std

    def load(self, indices) -> list:
        idx = torch.as_tensor(indices).tolist()
        if self.workers == 1 or len(idx) == 1:
            return [self._one(i) for i in idx]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._one, idx))

    def config(self) -> dict:
        return {"kind": self.kind, "n": len(self), "image_size": self.image_size}


# --------------------------------------------------------------------------- optimisation
def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, p_lr_mult: float = 10.0) -> list:
    """Parameter groups as cirtorch trains them.

    * ``"p"``: the exponents ``p`` of every :class:`GeM` and :class:`WGeM` layer, at
      ``lr * p_lr_mult`` and no weight decay (cirtorch: ``lr * 10``, ``weight_decay=0``).
    * ``"weights"``: every other trainable parameter (backbone, wGeM's attention conv,
      whitening, classifier) at ``lr`` and ``weight_decay``.

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    Each group carries ``base_lr``, the rate the schedule scales.
    """
    p_ids = {id(m.p) for m in model.modules() if isinstance(m, (GeM, WGeM)) and isinstance(m.p, nn.Parameter)}
    ps = [q for q in model.parameters() if q.requires_grad and id(q) in p_ids]
    rest = [q for q in model.parameters() if q.requires_grad and id(q) not in p_ids]
    groups = [
        {"params": rest, "lr": lr, "base_lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": ps, "lr": lr * p_lr_mult, "base_lr": lr * p_lr_mult, "weight_decay": 0.0, "name": "p"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameter (a learnable GeM p, "
                         "wGeM's conv, a whitening layer or an unfrozen backbone)")
    return groups


_OPTIMIZERS = {
    "adam": lambda groups: torch.optim.Adam(groups),
    "adamw": lambda groups: torch.optim.AdamW(groups),
    "sgd": lambda groups: torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9),  # cirtorch's momentum
}


def _constant(step: int, epoch: int, total: int) -> float:
    return 1.0


def _exponential(step: int, epoch: int, total: int) -> float:
    return math.exp(-0.01 * epoch)


def _cosine(step: int, epoch: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


SCHEDULES = {
    "constant": _constant,
    # cirtorch: ExponentialLR(gamma=exp(-0.01)) stepped once per epoch
    "exponential": _exponential,
    # half a cosine over the whole run, per step
    "cosine": _cosine,
}


# --------------------------------------------------------------------------- checkpoints
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_atomic(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``:
    ``path`` is either absent or complete, never half written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _checkpoints(folder: Path) -> list:
    """``(step, path)`` of the checkpoint files in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return sorted(found, reverse=True)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :class:`Trainer` (tensors and plain data only: no code runs).

    Raises ``ValueError`` when the file is cut short, corrupt, or not a trainer checkpoint.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: never trust it
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it was "
                         "probably cut short while being written") from err
    need = {"format", "step", "epoch", "next_batch", "plan", "model", "optimizer", "config", "history"}
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT or not need <= set(obj):
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return obj


def latest_checkpoint(folder) -> Optional[Path]:
    """The newest checkpoint in ``folder`` that reads completely, or ``None``.

    Newer files that cannot be read (cut short while being written, corrupt) are skipped
    with a warning naming them.
    """
    for _, path in _checkpoints(Path(folder)):
        try:
            load_checkpoint(path)
        except ValueError as err:
            warnings.warn(f"skipping a checkpoint: {err}", stacklevel=2)
            continue
        return path
    return None


def _diff(old, new, prefix: str = "") -> list:
    """Readable differences between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _jsonable(value):
    return json.loads(json.dumps(value, default=repr))


# --------------------------------------------------------------------------- distributed
def _dist_state():
    """``(rank, world_size, local_rank)``; initialises the process group from torchrun's
    environment (``WORLD_SIZE`` > 1) when nobody has yet. Returns whether it did."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size(), local, True
    return 0, 1, 0, False


def _shard(batch: dict, rank: int, world: int) -> dict:
    rows = int(batch["images"].shape[0])
    if world == 1:
        return batch
    if rows % world:
        raise ValueError(f"a batch of {rows} rows cannot be split evenly over {world} processes; make the "
                         f"miner's batch size (tuples, or P for P x K batches) a multiple of {world}")
    n = rows // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def _index(outputs, inv: torch.Tensor):
    """Rows of the unique images' outputs laid out like the batch's ``images``; half-precision
    outputs (AMP) become float32 so the loss is computed in full precision."""
    def rows(o):
        o = o.float() if o.dtype in (torch.float16, torch.bfloat16) else o
        return o[inv.to(o.device)]

    return tuple(rows(o) for o in outputs) if isinstance(outputs, tuple) else rows(outputs)


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Train ``model`` on ``source`` with ``miner``'s batches, ``objective`` and ``optimizer``.

    Args:
        model: an ``nn.Module`` mapping a list of inputs to descriptors (:class:`RetrievalNet`).
        objective: ``objective(outputs, batch) -> scalar`` (:mod:`~retrieval_lib.engine.objectives`).
        miner: plans each epoch (:class:`~retrieval_lib.engine.mining.TupleMiner`, :class:`PKMiner`).
        source: :class:`MapSource` or :class:`ImageSource` (``load(indices) -> list of tensors``).
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` (momentum 0.9), or a factory
            ``groups -> torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, momentum=0.9)``).
        lr, weight_decay, p_lr_mult: see :func:`param_groups`.
        schedule: a name in :data:`SCHEDULES` or ``f(step, epoch, total_steps) -> factor`` of the base rates.
        epochs: epochs to train in all (a resumed run continues up to this number).
        device: where to train; default CUDA (this process's GPU under torchrun) when present, else CPU.
        amp, channels_last: default on for CUDA, off elsewhere (AMP: bfloat16 where supported,
            else float16 with gradient scaling).
        checkpoint_dir: where ``ckpt-<step>.pt`` files go (``None``: no checkpoints, no resume).
        checkpoint_every: write a checkpoint every this many steps, and after the last step.
        keep_checkpoints: how many of the newest checkpoints to keep.
        seed: seeds the miner's generator (queries, pools, P x K draws).
        config: your own settings (JSON-able) stored in every checkpoint and checked on resume.
        freeze_batchnorm: keep BatchNorm layers in eval mode while training (cirtorch does).
        describe_batch: images per forward when the miner describes its pool (no gradient).
        find_unused_parameters: passed to DistributedDataParallel (a model with parameters the
            objective does not use, e.g. a classifier under a ranking loss alone).
        on_step: ``f(trainer, step, loss)`` called after every step (after its checkpoint).
        progress: show a progress bar with the running mean loss of the epoch.

    ``fit()`` returns the history ``{"loss", "lr", "epoch"}`` (one entry per step; the loss is
    the whole batch's, averaged over processes; ``lr`` is the base group's rate) and leaves the
    trained weights in ``model`` and the optimizer in ``trainer.optimizer``. A checkpoint
    records :meth:`config` (settings, miner, objective, model shapes, number of processes);
    resuming with other values is refused -- except ``epochs``, which may grow to train on.
    """

    def __init__(self, model: nn.Module, objective: Callable, miner, source, optimizer="adam",
                 lr: float = 1e-3, weight_decay: float = 0.0, p_lr_mult: float = 10.0,
                 schedule="constant", epochs: int = 1, device=None, amp: Optional[bool] = None,
                 channels_last: Optional[bool] = None, checkpoint_dir=None, checkpoint_every: int = 50,
                 keep_checkpoints: int = 2, seed: int = 0, config: Optional[dict] = None,
                 freeze_batchnorm: bool = True, describe_batch: int = 32,
                 find_unused_parameters: bool = False, on_step: Optional[Callable] = None,
                 progress: bool = True):
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Trainer: epochs must be an integer >= 1, got {epochs!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"Trainer: lr must be a positive number, got {lr!r}")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"Trainer: checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
            raise ValueError(f"Trainer: keep_checkpoints must be an integer >= 1, got {keep_checkpoints!r}")
        if isinstance(optimizer, str) and optimizer not in _OPTIMIZERS:
            raise ValueError(f"Trainer: unknown optimizer {optimizer!r}; use one of {sorted(_OPTIMIZERS)} "
                             "or pass a factory groups -> torch.optim.Optimizer")
        if not (isinstance(optimizer, str) or callable(optimizer)):
            raise TypeError("Trainer: optimizer must be a name or a callable groups -> Optimizer")
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ValueError(f"Trainer: unknown schedule {schedule!r}; use one of {sorted(SCHEDULES)} or "
                             "pass f(step, epoch, total_steps) -> factor")
        self.model, self.objective, self.miner, self.source = model, objective, miner, source
        self.optimizer_spec, self.lr, self.weight_decay, self.p_lr_mult = optimizer, float(lr), weight_decay, p_lr_mult
        self.schedule = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
        self.schedule_name = schedule if isinstance(schedule, str) else getattr(schedule, "__qualname__", repr(schedule))
        self.epochs, self.seed = epochs, int(seed)
        self.device_spec, self.amp_spec, self.channels_last_spec = device, amp, channels_last
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self.user_config = {} if config is None else _jsonable(config)
        self.freeze_batchnorm, self.describe_batch = bool(freeze_batchnorm), int(describe_batch)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.on_step, self.progress = on_step, bool(progress)
        self.step = 0
        self.epoch = 0
        self.history = {"loss": [], "lr": [], "epoch": []}
        self.resumed_from: Optional[Path] = None
        self.rank, self.world_size = 0, 1
        self.optimizer: Optional[torch.optim.Optimizer] = None  # built by fit()
        self._settle_device(int(os.environ.get("LOCAL_RANK", 0)))

    # -- settings
    def _resolve_device(self, local_rank: int) -> torch.device:
        if self.device_spec is not None:
            return torch.device(self.device_spec)
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")

    def config(self) -> dict:
        """Everything that decides the run's result; stored in each checkpoint, compared on resume."""
        opt = self.optimizer_spec if isinstance(self.optimizer_spec, str) else repr(self.optimizer_spec)
        if callable(self.optimizer_spec) and hasattr(self.optimizer_spec, "__qualname__"):
            opt = self.optimizer_spec.__qualname__
        obj = self.objective.config() if hasattr(self.objective, "config") else repr(self.objective)
        miner = self.miner.config() if hasattr(self.miner, "config") else repr(self.miner)
        source = self.source.config() if hasattr(self.source, "config") else type(self.source).__name__
        model = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        return _jsonable({
            "trainer": {"optimizer": opt, "lr": self.lr, "weight_decay": self.weight_decay,
                        "p_lr_mult": self.p_lr_mult, "schedule": self.schedule_name, "seed": self.seed,
                        "world_size": self.world_size, "freeze_batchnorm": self.freeze_batchnorm},
            "objective": obj, "miner": miner, "source": source, "model": model, "user": self.user_config,
        })

    # -- pieces
    def _make_optimizer(self):
        groups = param_groups(self.model, self.lr, self.weight_decay, self.p_lr_mult)
        if isinstance(self.optimizer_spec, str):
            return _OPTIMIZERS[self.optimizer_spec](groups)
        opt = self.optimizer_spec(groups)
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
        return opt

    def _set_lr(self, opt, epoch: int, total: int) -> float:
        factor = float(self.schedule(self.step, epoch, total))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        return opt.param_groups[0]["lr"]

    def _train_mode(self) -> None:
        self.model.train()
        if self.freeze_batchnorm:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def describe(self, indices) -> torch.Tensor:
        """Descriptors ``(len(indices), D)`` of source images with the current model (no gradient)."""
        idx = torch.as_tensor(indices).reshape(-1)
        was_training = self.model.training
        self.model.eval()
        out = []
        with torch.no_grad(), self._autocast():
            for chunk in idx.split(self.describe_batch):
                d = self.model([x.to(self.device) for x in self.source.load(chunk)])
                d = d[0] if isinstance(d, tuple) else d
                out.append(d.float() if d.dtype in (torch.float16, torch.bfloat16) else d)
        if was_training:
            self._train_mode()
        return torch.cat(out)

    # -- checkpoints
    def _save(self, opt, scaler, generator, next_batch: int, plan) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch, "next_batch": next_batch,
            "plan": plan, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(), "history": self.history, "config": self.config(),
        }
        if self.device.type == "cuda":
            payload["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _save_atomic(payload, self.checkpoint_dir / f"ckpt-{self.step:09d}.pt")
        for _, old in _checkpoints(self.checkpoint_dir)[self.keep_checkpoints:]:
            old.unlink(missing_ok=True)

    def _find_resume(self) -> Optional[Path]:
        """Rank 0 picks the checkpoint (and clears unfinished temporary files); all ranks agree."""
        path = None
        if self.rank == 0 and self.checkpoint_dir is not None and self.checkpoint_dir.is_dir():
            stale = [p for p in self.checkpoint_dir.iterdir() if p.name.startswith(".ckpt-") and p.suffix == ".tmp"]
            for p in stale:
                p.unlink(missing_ok=True)
            if stale:
                warnings.warn(f"removed {len(stale)} unfinished checkpoint file(s) in {self.checkpoint_dir} "
                              "(a run stopped while writing one)", stacklevel=3)
            path = latest_checkpoint(self.checkpoint_dir)
        if self.world_size > 1:
            box = [None if path is None else str(path)]
            dist.broadcast_object_list(box, src=0)
            path = None if box[0] is None else Path(box[0])
        return path

    def _restore(self, path: Path, opt, scaler, generator):
        ck = load_checkpoint(path)
        diffs = _diff(ck["config"], self.config())
        if diffs:
            raise ValueError(f"checkpoint {path} was written by a run with other settings ("
                             + "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
                             + "). Resume with the same settings, or train into a new checkpoint_dir")
        self.model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler") is not None:
            scaler.load_state_dict(ck["scaler"])
        generator.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"], self.device)
        self.step, self.epoch = int(ck["step"]), int(ck["epoch"])
        self.history = {k: list(v) for k, v in ck["history"].items()}
        self.resumed_from = path
        return ck["plan"], int(ck["next_batch"])  # plan None: the epoch had ended, plan the next one

    # -- the loop
    def fit(self, resume: bool = True) -> dict:
        """Train up to ``epochs`` epochs; with ``resume`` continue from the newest readable checkpoint.

        Raises ``FloatingPointError`` naming the step when the loss is NaN or infinite (the
        step is not applied; the last checkpoint stays the one to resume from).
        """
        self.rank, self.world_size, local_rank, owns_group = _dist_state()
        try:
            return self._fit(resume, local_rank)
        finally:
            if owns_group and dist.is_initialized():
                dist.destroy_process_group()

    def _settle_device(self, local_rank: int) -> None:
        self.device = self._resolve_device(local_rank)
        cuda = self.device.type == "cuda"
        self.amp = cuda if self.amp_spec is None else bool(self.amp_spec)
        self.amp_dtype = torch.bfloat16
        if cuda and not torch.cuda.is_bf16_supported():
            self.amp_dtype = torch.float16  # older GPUs: float16 with gradient scaling

    def _fit(self, resume: bool, local_rank: int) -> dict:
        self._settle_device(local_rank)
        cuda = self.device.type == "cuda"
        channels_last = cuda if self.channels_last_spec is None else bool(self.channels_last_spec)
        self.model.to(self.device)
        if channels_last and getattr(self.model, "backbone", None) is not None:
            self.model.backbone.to(memory_format=torch.channels_last)
            self.model.channels_last = True
        opt = self.optimizer = self._make_optimizer()
        scaler = torch.amp.GradScaler("cuda") if (self.amp and cuda and self.amp_dtype == torch.float16) else None
        generator = torch.Generator().manual_seed(self.seed)
        plan, next_batch = None, 0
        if resume and self.checkpoint_dir is not None:
            path = self._find_resume()
            if path is not None:
                plan, next_batch = self._restore(path, opt, scaler, generator)
        net = self.model
        if self.world_size > 1:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None,
                find_unused_parameters=self.find_unused_parameters)
        per_epoch = self.miner.batches_per_epoch()
        total = self.epochs * per_epoch
        bar = tqdm(total=total, initial=min(self.step, total), desc="train", unit="step",
                   disable=not self.progress or self.rank != 0)
        try:
            while self.epoch < self.epochs:
                if plan is None:
                    plan = self.miner.plan(self.describe if self.miner.needs_descriptors else None, generator)
                    next_batch = 0
                running = [v for v, e in zip(self.history["loss"], self.history["epoch"]) if e == self.epoch]
                for b in range(next_batch, len(plan)):
                    loss_value = self._step(net, opt, scaler, plan, b, total)
                    running.append(loss_value)
                    bar.update(1)
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{sum(running) / len(running):.4f}")
                    last = b + 1 == len(plan)
                    if self.checkpoint_dir is not None and (
                            self.step % self.checkpoint_every == 0 or (last and self.epoch + 1 == self.epochs)):
                        self._checkpoint(opt, scaler, generator, b + 1, plan, last)
                    if self.on_step is not None:
                        self.on_step(self, self.step, loss_value)
                plan, next_batch = None, 0
                self.epoch += 1
        finally:
            bar.close()
        return self.history

    def _checkpoint(self, opt, scaler, generator, next_batch, plan, epoch_done: bool) -> None:
        # a checkpoint taken at the end of an epoch resumes at the start of the next one
        if epoch_done:
            self.epoch += 1
            next_batch, plan = 0, None
        if self.rank == 0:
            self._save(opt, scaler, generator, next_batch, plan)
        if epoch_done:
            self.epoch -= 1
        if self.world_size > 1:
            dist.barrier()

    def _step(self, net, opt, scaler, plan, b: int, total: int) -> float:
        batch = _shard(plan[b], self.rank, self.world_size)
        lr = self._set_lr(opt, self.epoch, total)
        self._train_mode()
        uniq, inv = torch.unique(batch["images"], return_inverse=True)
        inputs = [x.to(self.device, non_blocking=True) for x in self.source.load(uniq)]
        with self._autocast():
            outputs = net(inputs)
        loss = self.objective(_index(outputs, inv), batch)
        value = loss.detach().double().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(value)  # a NaN on any process stops every process
            value /= self.world_size
        value = float(value)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the loss is {value} at step {self.step + 1} (epoch {self.epoch + 1}, batch {b + 1} of "
                f"{len(plan)}); training stopped before applying that step. Lower the learning rate "
                f"(now {lr:.3g}), look for NaN/inf in the inputs, or resume from the last checkpoint"
                + (f" in {self.checkpoint_dir}" if self.checkpoint_dir is not None else ""))
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        self.step += 1
        self.history["loss"].append(value)
        self.history["lr"].append(lr)
        self.history["epoch"].append(self.epoch)
        return value


# --------------------------------------------------------------------------- ready-made setups
def reduced_source(backbone, dataset, n_views: int = 4, n_composites: int = 1, image_size: int = 512,
                   seed: int = 0, cache_dir=None, device=None, batch_size: int = 8, progress: bool = True):
    """Reduced-mode inputs: the feature maps of ``dataset``'s images, their augmented views
    and composites (:func:`~retrieval_lib.engine.views.make_views`), extracted once with the
    frozen ``backbone`` through the extraction cache (``<cache_dir>/features``;
    ``cache_dir`` defaults to :func:`~retrieval_lib.data.datasets.cache_root`).

    Returns ``(source, views)``: a :class:`MapSource` whose ``labels`` are the groups, and
    the :class:`~retrieval_lib.engine.views.ViewSet`. Pass training images only
    (``honest_split(...).train``).
    """
    from retrieval_lib.data.datasets import cache_root
    from retrieval_lib.engine.extract import extract_fmaps
    from retrieval_lib.engine.views import make_views

    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    views = make_views(dataset, n_views=n_views, n_composites=n_composites, seed=seed,
                       max_side=max(64, image_size), cache_dir=root, progress=progress)
    fmaps = extract_fmaps(backbone, views.images(), image_size=image_size, device=device,
                          batch_size=batch_size, cache_dir=root / "features", progress=progress)
    return MapSource(fmaps, labels=views.labels), views


# The papers' fine-tuning settings. GeM: cirtorch's README command for ResNet-101 GeM
# (Radenović et al., TPAMI 2018): contrastive loss, margin 0.85, Adam at 5e-7, 5 negatives,
# 2000 queries and a pool of 22000 per epoch, batches of 5 tuples, 362 px images, the
# learning rate times exp(-0.01) per epoch; weight decay 1e-6 and 100 epochs are
# cirtorch's train.py defaults. wGeM: the same recipe (our choice; the wGeM paper's
# optimiser settings are not restated here).
RECIPES = {
    "gem": dict(loss="contrastive", margin=0.85, optimizer="adam", lr=5e-7, weight_decay=1e-6, p_lr_mult=10.0,
                n_neg=5, n_queries=2000, pool_size=22000, batch_size=5, image_size=362,
                schedule="exponential", epochs=100),
}
RECIPES["wgem"] = dict(RECIPES["gem"])


def paper_trainer(recipe: str, backbone, pooling: nn.Module, data, whiten: Optional[nn.Module] = None,
                  checkpoint_dir=None, workers: int = 4, **overrides) -> Trainer:
    """Full-mode training as in the papers: ``backbone`` + ``pooling`` fine-tuned end to end
    on ``data`` (an :class:`~retrieval_lib.data.sfm120k.SfM120k`: rSfM-120k's query/positive
    pairs and clusters) with cirtorch's mining and the settings of :data:`RECIPES[recipe]`;
    keyword arguments override any of them (``epochs=2``, ``image_size=128``, ``device=...``,
    or any :class:`Trainer` argument). Call ``.fit()`` on the result.
    """
    from retrieval_lib.engine.mining import TupleMiner
    from retrieval_lib.engine.objectives import TupleLoss

    if recipe not in RECIPES:
        raise ValueError(f"paper_trainer: unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    s = {**RECIPES[recipe], **overrides}
    miner = TupleMiner(data.labels, n_neg=s.pop("n_neg"), n_queries=s.pop("n_queries"),
                       pool_size=s.pop("pool_size"), batch_size=s.pop("batch_size"),
                       queries=data.queries, positives=data.positives)
    objective = TupleLoss(s.pop("loss"), margin=s.pop("margin"))
    source = ImageSource(data.images, s.pop("image_size"), backbone.mean, backbone.std, labels=data.labels,
                         workers=workers)
    model = RetrievalNet(pooling, backbone=backbone, whiten=whiten)
    config = {"recipe": recipe, "data": getattr(data, "name", type(data).__name__)}
    return Trainer(model, objective, miner, source, checkpoint_dir=checkpoint_dir,
                   config={**config, **s.pop("config", {})}, **s)
