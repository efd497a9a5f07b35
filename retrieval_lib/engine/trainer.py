"""One training engine for every head: reduced (frozen backbone, cached maps) and full (end to end).

The pieces are arguments, so one loop trains GeM, wGeM and the later heads:

* a model, :class:`~retrieval_lib.models.retrieval_net.RetrievalNet` -- ``backbone`` (``None`` in reduced
  mode: the inputs are feature maps) -> ``pooling`` -> L2 -> optional ``whiten`` (an FC layer,
  as cirtorch's end-to-end whitening) -> L2, plus an optional ``classifier`` on the descriptor;
* a source of inputs (:mod:`retrieval_lib.engine.sources`): feature maps extracted once
  (reduced mode), decoded images or random crops (full mode);
* a miner (:mod:`retrieval_lib.engine.mining`) that plans each epoch's batches, re-mining
  with the current model when it needs to;
* an objective (:mod:`retrieval_lib.engine.objectives`) that turns a batch's descriptors
  into a loss;
* the settings, a :class:`TrainerConfig`: an optimizer (a name or a factory) over parameter
  groups and a schedule (:mod:`retrieval_lib.engine.optim`), epochs, device, checkpoints.

:class:`Trainer` adds a progress bar with the running loss, checkpoints written atomically
with their configuration (:mod:`retrieval_lib.engine.checkpoint`), resume from the newest
readable checkpoint (a file cut short while being written is skipped), a stop with a message
naming the step when the loss is NaN or infinite, AMP and channels_last on CUDA, and
DistributedDataParallel when started by ``torchrun --nproc_per_node=N`` (each process takes
an equal share of every batch; the result equals one process with the whole batch; the
process group is opened by :func:`retrieval_lib.engine.distributed.init_process_group`).
Ready-made setups (the papers' recipes, the reduced CPU mode) are in
:mod:`retrieval_lib.engine.recipes`; early stopping on a validation mAP in
:mod:`retrieval_lib.engine.validation`. Taught in ``notebooks/05_wgem.ipynb``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from retrieval_lib.engine.checkpoint import (CHECKPOINT_FORMAT, clear_unfinished, config_diff, jsonable,
                                             latest_checkpoint, load_checkpoint, write_checkpoint)
from retrieval_lib.engine.distributed import close_process_group, dist_env, init_process_group
from retrieval_lib.engine.optim import OPTIMIZERS, SCHEDULES, param_groups

__all__ = ["TrainerConfig", "Trainer", "shard_batch"]


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Trainer: {name} must be an integer >= 1, got {value!r}")


def _result(default=None, **kw):
    """A setting that decides the run's numbers: recorded by ``config()``, checked on resume."""
    return dataclasses.field(default=default, metadata={"result": True}, **kw)


@dataclasses.dataclass
class TrainerConfig:
    """The settings of a :class:`Trainer`, checked once here.

    Args:
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` (momentum 0.9), or a factory
            ``groups -> torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, momentum=0.9)``).
        lr, weight_decay, p_lr_mult: see :func:`~retrieval_lib.engine.optim.param_groups`.
        schedule: a name in :data:`~retrieval_lib.engine.optim.SCHEDULES` or
            ``f(step, epoch, total_steps) -> factor`` of the base rates.
        seed: seeds the miner's generator (queries, pools, P x K draws).
        freeze_batchnorm: keep BatchNorm layers in eval mode while training (cirtorch does).
        epochs: epochs to train in all (a resumed run continues up to this number).
        device: where to train; default CUDA (this process's GPU under torchrun) when present, else CPU.
        amp, channels_last: default on for CUDA, off elsewhere (AMP: bfloat16 where supported,
            else float16 with gradient scaling).
        checkpoint_dir: where ``ckpt-<step>.pt`` files go (``None``: no checkpoints, no resume).
        checkpoint_every: write a checkpoint every this many steps, and after the last step.
        keep_checkpoints: how many of the newest checkpoints to keep.
        user_config: your own settings (JSON-able) stored in every checkpoint and checked on resume.
        describe_batch: images per forward when the miner describes its pool (no gradient).
        find_unused_parameters: passed to DistributedDataParallel (a model with parameters the
            objective does not use, e.g. a classifier under a ranking loss alone).
        progress: show a progress bar with the running mean loss of the epoch.

    The fields marked as deciding the result (optimizer to freeze_batchnorm) make the
    ``"trainer"`` part of :meth:`Trainer.config`; :meth:`record` gives it.
    """

    optimizer: Union[str, Callable] = _result("adam")
    lr: float = _result(1e-3)
    weight_decay: float = _result(0.0)
    p_lr_mult: float = _result(10.0)
    schedule: Union[str, Callable] = _result("constant")
    seed: int = _result(0)
    freeze_batchnorm: bool = _result(True)
    epochs: int = 1
    device: Any = None
    amp: Optional[bool] = None
    channels_last: Optional[bool] = None
    checkpoint_dir: Any = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    user_config: Optional[dict] = None
    describe_batch: int = 32
    find_unused_parameters: bool = False
    progress: bool = True

    def __post_init__(self):
        _positive_int(self.epochs, "epochs")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"Trainer: lr must be a positive number, got {self.lr!r}")
        _positive_int(self.checkpoint_every, "checkpoint_every")
        _positive_int(self.keep_checkpoints, "keep_checkpoints")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Trainer: unknown optimizer {self.optimizer!r}; use one of {sorted(OPTIMIZERS)} "
                             "or pass a factory groups -> torch.optim.Optimizer")
        if not (isinstance(self.optimizer, str) or callable(self.optimizer)):
            raise TypeError("Trainer: optimizer must be a name or a callable groups -> Optimizer")
        if isinstance(self.schedule, str) and self.schedule not in SCHEDULES:
            raise ValueError(f"Trainer: unknown schedule {self.schedule!r}; use one of {sorted(SCHEDULES)} or "
                             "pass f(step, epoch, total_steps) -> factor")
        self.lr, self.seed = float(self.lr), int(self.seed)
        self.freeze_batchnorm, self.describe_batch = bool(self.freeze_batchnorm), int(self.describe_batch)
        self.find_unused_parameters, self.progress = bool(self.find_unused_parameters), bool(self.progress)
        self.checkpoint_dir = None if self.checkpoint_dir is None else Path(self.checkpoint_dir)
        self.user_config = {} if self.user_config is None else jsonable(self.user_config)

    @property
    def schedule_fn(self) -> Callable:
        """The schedule as a function ``(step, epoch, total_steps) -> factor``."""
        return SCHEDULES[self.schedule] if isinstance(self.schedule, str) else self.schedule

    @property
    def schedule_name(self) -> str:
        s = self.schedule
        return s if isinstance(s, str) else getattr(s, "__qualname__", repr(s))

    @property
    def optimizer_name(self) -> str:
        o = self.optimizer
        if callable(o) and hasattr(o, "__qualname__"):
            return o.__qualname__
        return o if isinstance(o, str) else repr(o)

    def record(self) -> dict:
        """The settings that decide the result, by name (optimizer and schedule by their names)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("result")}
        out.update(optimizer=self.optimizer_name, schedule=self.schedule_name)
        return out


def shard_batch(batch: dict, rank: int, world: int) -> dict:
    """This process's equal share of every tensor of ``batch`` (its rows ``rank * n .. (rank + 1) * n``)."""
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

# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Train ``model`` on ``source`` with ``miner``'s batches, ``objective`` and the settings.

    ``Trainer(model, objective, miner, source, settings)`` with a :class:`TrainerConfig`, or
    with its fields as keywords: ``Trainer(model, objective, miner, source, lr=1e-4, epochs=5)``
    (keywords given with ``settings`` replace those fields of it).

    Args:
        model: an ``nn.Module`` mapping a list of inputs to descriptors (``RetrievalNet``).
        objective: ``objective(outputs, batch) -> scalar`` (:mod:`~retrieval_lib.engine.objectives`).
        miner: plans each epoch (:class:`~retrieval_lib.engine.mining.TupleMiner`, ``PKMiner``).
        source: a source of :mod:`~retrieval_lib.engine.sources` (``load(indices) -> list of tensors``).
        settings: a :class:`TrainerConfig` (default: its defaults, with ``overrides``).
        on_step: ``f(trainer, step, loss)`` called after every step (after its checkpoint).

    ``fit()`` returns the history ``{"loss", "lr", "epoch"}`` (one entry per step; the loss is
    the whole batch's, averaged over processes; ``lr`` is the base group's rate) and leaves the
    trained weights in ``model`` and the optimizer in ``trainer.optimizer``. A checkpoint
    records :meth:`config` (settings, miner, objective, model shapes, number of processes);
    resuming with other values is refused -- except ``epochs``, which may grow to train on.
    """

    def __init__(self, model: nn.Module, objective: Callable, miner, source,
                 settings: Optional[TrainerConfig] = None, on_step: Optional[Callable] = None, **overrides):
        if settings is None:
            settings = TrainerConfig(**overrides)
        elif overrides:
            settings = dataclasses.replace(settings, **overrides)
        self.settings = settings
        self.model, self.objective, self.miner, self.source = model, objective, miner, source
        self.on_step = on_step
        self.step = 0
        self.epoch = 0
        self.history = {"loss": [], "lr": [], "epoch": []}
        self.resumed_from: Optional[Path] = None
        self.finished = False  # fit() trained every epoch (False after a stop at max_seconds)
        self.rank, self.world_size = 0, 1
        self.optimizer: Optional[torch.optim.Optimizer] = None  # built by fit()
        self._settle_device(int(os.environ.get("LOCAL_RANK", 0)))

    # -- settings
    def _resolve_device(self, local_rank: int) -> torch.device:
        if self.settings.device is not None:
            return torch.device(self.settings.device)
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")

    def config(self) -> dict:
        """Everything that decides the run's result; stored in each checkpoint, compared on resume."""
        obj = self.objective.config() if hasattr(self.objective, "config") else repr(self.objective)
        miner = self.miner.config() if hasattr(self.miner, "config") else repr(self.miner)
        source = self.source.config() if hasattr(self.source, "config") else type(self.source).__name__
        model = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        return jsonable({
            "trainer": {**self.settings.record(), "world_size": self.world_size},
            "objective": obj, "miner": miner, "source": source, "model": model, "user": self.settings.user_config,
        })

    # -- pieces
    def _make_optimizer(self):
        s = self.settings
        groups = param_groups(self.model, s.lr, s.weight_decay, s.p_lr_mult)
        if isinstance(s.optimizer, str):
            return OPTIMIZERS[s.optimizer](groups)
        opt = s.optimizer(groups)
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
        return opt

    def _set_lr(self, opt, epoch: int, total: int) -> float:
        factor = float(self.settings.schedule_fn(self.step, epoch, total))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        return opt.param_groups[0]["lr"]

    def _train_mode(self) -> None:
        self.model.train()
        if self.settings.freeze_batchnorm:
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
            for chunk in idx.split(self.settings.describe_batch):
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
        write_checkpoint(payload, self.settings.checkpoint_dir, self.step, self.settings.keep_checkpoints)

    def _find_resume(self) -> Optional[Path]:
        """Rank 0 picks the checkpoint (and clears unfinished temporary files); all ranks agree."""
        path, folder = None, self.settings.checkpoint_dir
        if self.rank == 0 and folder is not None and folder.is_dir():
            stale = clear_unfinished(folder)
            if stale:
                warnings.warn(f"removed {stale} unfinished checkpoint file(s) in {folder} "
                              "(a run stopped while writing one)", stacklevel=3)
            path = latest_checkpoint(folder)
        if self.world_size > 1:
            box = [None if path is None else str(path)]
            dist.broadcast_object_list(box, src=0)
            path = None if box[0] is None else Path(box[0])
        return path

    def _restore(self, path: Path, opt, scaler, generator):
        ck = load_checkpoint(path)
        diffs = config_diff(ck["config"], self.config())
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
    def fit(self, resume: bool = True, max_seconds: Optional[float] = None) -> dict:
        """Train up to ``epochs`` epochs; with ``resume`` continue from the newest readable checkpoint.

        ``max_seconds``: a time budget for this call (a chunk of a long training, e.g. one Colab
        session): after the first step that ends past it, a checkpoint is written (with a
        ``checkpoint_dir``) and ``fit`` returns with ``finished`` False; calling ``fit()`` again
        (in a new process too) resumes there and ends where an uninterrupted run ends. Without a
        ``checkpoint_dir`` a budget is refused (the stop would lose the work).

        Raises ``FloatingPointError`` naming the step when the loss is NaN or infinite (the
        step is not applied; the last checkpoint stays the one to resume from).
        """
        if max_seconds is not None:
            if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not max_seconds > 0:
                raise ValueError(f"Trainer.fit: max_seconds must be a positive number of seconds or None, "
                                 f"got {max_seconds!r}")
            if self.settings.checkpoint_dir is None:
                raise ValueError("Trainer.fit: max_seconds stops training part way and resumes from a checkpoint; "
                                 "give the Trainer a checkpoint_dir")
        owns_group = init_process_group()
        env = dist_env()
        self.rank, self.world_size = env["rank"], env["world_size"]
        finished = False
        try:
            history = self._fit(resume, env["local_rank"], max_seconds)
            finished = True
            return history
        finally:
            if owns_group and finished:
                close_process_group()  # after a last barrier, so no rank leaves early
            elif owns_group and dist.is_initialized():
                dist.destroy_process_group()  # a failed rank leaves at once: its error is the one to see

    def _settle_device(self, local_rank: int) -> None:
        self.device = self._resolve_device(local_rank)
        cuda = self.device.type == "cuda"
        self.amp = cuda if self.settings.amp is None else bool(self.settings.amp)
        self.amp_dtype = torch.bfloat16
        if cuda and not torch.cuda.is_bf16_supported():
            self.amp_dtype = torch.float16  # older GPUs: float16 with gradient scaling

    def _out_of_time(self, started: float, max_seconds: Optional[float]) -> bool:
        if max_seconds is None:
            return False
        stop = torch.tensor([float(time.monotonic() - started > max_seconds)])
        if self.world_size > 1:  # every process stops after the same step: rank 0's clock decides
            dist.broadcast(stop, src=0)
        return bool(stop.item())

    def _fit(self, resume: bool, local_rank: int, max_seconds: Optional[float] = None) -> dict:
        started = time.monotonic()
        self.finished = False
        self._settle_device(local_rank)
        cuda = self.device.type == "cuda"
        s = self.settings
        channels_last = cuda if s.channels_last is None else bool(s.channels_last)
        self.model.to(self.device)
        if channels_last and getattr(self.model, "backbone", None) is not None:
            self.model.backbone.to(memory_format=torch.channels_last)
            self.model.channels_last = True
        opt = self.optimizer = self._make_optimizer()
        scaler = torch.amp.GradScaler("cuda") if (self.amp and cuda and self.amp_dtype == torch.float16) else None
        generator = torch.Generator().manual_seed(s.seed)
        plan, next_batch = None, 0
        if resume and s.checkpoint_dir is not None:
            path = self._find_resume()
            if path is not None:
                plan, next_batch = self._restore(path, opt, scaler, generator)
        net = self.model
        if self.world_size > 1:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None,
                find_unused_parameters=s.find_unused_parameters)
        per_epoch = self.miner.batches_per_epoch()
        total = s.epochs * per_epoch
        bar = tqdm(total=total, initial=min(self.step, total), desc="train", unit="step",
                   disable=not s.progress or self.rank != 0)
        try:
            while self.epoch < s.epochs:
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
                    if s.checkpoint_dir is not None and (
                            self.step % s.checkpoint_every == 0 or (last and self.epoch + 1 == s.epochs)):
                        self._checkpoint(opt, scaler, generator, b + 1, plan, last)
                    if self.on_step is not None:
                        self.on_step(self, self.step, loss_value)
                    if self._out_of_time(started, max_seconds) and not (last and self.epoch + 1 == s.epochs):
                        if self.step % s.checkpoint_every != 0:  # not just written above
                            self._checkpoint(opt, scaler, generator, b + 1, plan, last)
                        return self.history
                plan, next_batch = None, 0
                self.epoch += 1
        finally:
            bar.close()
        self.finished = True
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
        batch = shard_batch(plan[b], self.rank, self.world_size)
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
                + (f" in {self.settings.checkpoint_dir}" if self.settings.checkpoint_dir is not None else ""))
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
