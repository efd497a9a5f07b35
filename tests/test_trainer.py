"""retrieval_lib.engine.trainer: the model, parameter groups, one step against a plain loop,
schedules, NaN stops, atomic checkpoints, kill-and-resume (SIGKILL of a real process) and
2-process DistributedDataParallel on CPU; reduced and full mode end to end on tiny data.
"""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _train_problem import C, build, model, problem  # noqa: E402

from retrieval_lib.data.datasets import GroupDataset  # noqa: E402
from retrieval_lib.engine.mining import PKMiner, TupleMiner  # noqa: E402
from retrieval_lib.engine.objectives import BatchHardLoss, ClassificationLoss, CombinedLoss, TupleLoss  # noqa: E402
from retrieval_lib.engine.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from retrieval_lib.engine.optim import param_groups  # noqa: E402
from retrieval_lib.engine.recipes import reduced_source  # noqa: E402
from retrieval_lib.engine.sources import ImageSource, MapSource  # noqa: E402
from retrieval_lib.engine.trainer import Trainer, TrainerConfig, shard_batch  # noqa: E402
from retrieval_lib.models.retrieval_net import RetrievalNet  # noqa: E402
from retrieval_lib.layers import functional  # noqa: E402
from retrieval_lib.layers.losses import contrastive_loss  # noqa: E402
from retrieval_lib.layers.pooling import GeM, WGeM  # noqa: E402
from retrieval_lib.models.backbones import Backbone  # noqa: E402

HERE = Path(__file__).parent
REPO = HERE.parent


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture
def one_thread():
    """Bit-identical comparisons with the child processes, which run on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------- the model
def test_retrieval_net_on_mixed_sizes_matches_one_image_at_a_time():
    fmaps, _ = problem()
    net = model()
    idx = [4, 0, 3, 1]  # sizes (4, 5), (5, 4), (4, 5), (4, 5): two groups, order mixed
    got = net([fmaps[i] for i in idx])
    for row, i in zip(got, idx):
        d = functional.l2n(net.pooling(fmaps[i][None]))
        want = functional.l2n(net.whiten(d))[0]
        assert torch.allclose(row, want, atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(4))
    net.classifier = nn.Linear(C, 3)
    desc, logits = net([fmaps[i] for i in idx])
    assert desc.shape == (4, C) and logits.shape == (4, 3)
    assert torch.allclose(logits, net.classifier(desc))


def test_retrieval_net_errors():
    with pytest.raises(TypeError, match="pooling must be an nn.Module"):
        RetrievalNet("gem")
    with pytest.raises(TypeError, match=r"\.features"):
        RetrievalNet(GeM(), backbone=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no inputs"):
        RetrievalNet(GeM())([])


# ------------------------------------------------------------------------- parameter groups
def test_param_groups_put_p_at_ten_times_the_rate_without_decay():
    net = RetrievalNet(WGeM(C, p=3.0), whiten=nn.Linear(C, C))
    groups = param_groups(net, lr=1e-3, weight_decay=1e-4)
    by = {g["name"]: g for g in groups}
    assert [q for q in by["p"]["params"]] == [net.pooling.p]
    assert by["p"]["lr"] == pytest.approx(1e-2) and by["p"]["weight_decay"] == 0.0
    assert by["weights"]["lr"] == 1e-3 and by["weights"]["weight_decay"] == 1e-4
    assert {id(q) for q in by["weights"]["params"]} == {id(net.pooling.conv.weight), id(net.pooling.conv.bias),
                                                         id(net.whiten.weight), id(net.whiten.bias)}
    net.whiten.requires_grad_(False)  # frozen parameters are left out
    assert len(param_groups(net, 1e-3)[0]["params"]) == 2
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(RetrievalNet(GeM(learn_p=False)), 1e-3)


def test_adams_first_step_moves_p_ten_times_further():
    # Adam's first step moves every parameter with a non-zero gradient by about its learning rate
    fmaps, labels = problem()
    net = RetrievalNet(WGeM(C, p=2.0))
    opt = torch.optim.Adam(param_groups(net, lr=1e-3))
    before = _clone(net.state_dict())
    D = net(fmaps)
    i, j = torch.tensor([0, 0, 3]), torch.tensor([1, 3, 4])
    contrastive_loss(D[i], D[j], torch.tensor([1, 0, 1])).backward()
    opt.step()
    dp = (net.pooling.p - before["pooling.p"]).abs().item()
    # (the conv's bias gets no gradient: a softmax ignores a constant shift)
    dconv = (net.pooling.conv.weight - before["pooling.conv.weight"]).abs().max().item()
    assert dp == pytest.approx(1e-2, rel=1e-3) and dconv == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------------------- the loop
def test_trainer_steps_equal_a_plain_loop():
    fmaps, labels = problem()
    trainer = build(fmaps, labels, epochs=2)
    hist = trainer.fit()

    # the same run by hand: plan an epoch with the current model, one Adam step per batch
    net = model()
    opt = torch.optim.Adam(param_groups(net, lr=0.01, weight_decay=1e-4))
    miner = TupleMiner(labels, n_neg=2, n_queries=6, pool_size=18, batch_size=2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for epoch in range(2):
        with torch.no_grad():
            plan = miner.plan(lambda idx: net([fmaps[k] for k in idx.tolist()]), gen)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * math.exp(-0.01 * epoch)
        for batch in plan:
            t = batch["images"]  # (2, 4): q, p, n1, n2
            D = net([fmaps[k] for k in t.flatten().tolist()]).view(2, 4, -1)
            x1 = D[:, :1].expand(-1, 3, -1).reshape(-1, C)
            y = torch.tensor([1, 0, 0] * 2)
            loss = contrastive_loss(x1, D[:, 1:].reshape(-1, C), y, 0.7)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert hist["loss"] == pytest.approx(losses, rel=1e-5)
    assert hist["epoch"] == [0, 0, 0, 1, 1, 1]
    assert hist["lr"] == pytest.approx([0.01] * 3 + [0.01 * math.exp(-0.01)] * 3)
    for k, v in net.state_dict().items():
        assert torch.allclose(trainer.model.state_dict()[k], v, atol=1e-6), k


def test_trainer_learns_the_tiny_problem():
    fmaps, labels = problem()
    trainer = build(fmaps, labels, epochs=8)
    fixed = TupleMiner(labels, n_neg=2, n_queries=12, pool_size=18, batch_size=12)
    plan = fixed.plan(lambda idx: trainer.model([fmaps[k] for k in idx.tolist()]).detach(),
                      torch.Generator().manual_seed(1))[0]

    def loss_on_plan():
        with torch.no_grad():
            D = trainer.model([fmaps[k] for k in plan["images"].flatten().tolist()]).view(12, 4, -1)
            return TupleLoss("contrastive", 0.7)(D, plan).item()

    before, p0 = loss_on_plan(), trainer.model.pooling.p.item()
    trainer.fit()
    assert loss_on_plan() < 0.7 * before
    assert trainer.model.pooling.p.item() != p0


@pytest.mark.parametrize("schedule, want", [
    ("constant", lambda step, epoch, total: 1.0),
    ("exponential", lambda step, epoch, total: math.exp(-0.01 * epoch)),
    ("cosine", lambda step, epoch, total: 0.5 * (1 + math.cos(math.pi * step / total))),
    (lambda step, epoch, total: 1.0 / (1 + step), lambda step, epoch, total: 1.0 / (1 + step)),
])
def test_schedules_scale_every_group(schedule, want):
    fmaps, labels = problem()
    trainer = build(fmaps, labels, epochs=2, schedule=schedule)
    hist = trainer.fit()
    expect = [0.01 * want(s, e, 6) for s, e in zip(range(6), hist["epoch"])]
    assert hist["lr"] == pytest.approx(expect)
    by = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert by["weights"] == pytest.approx(expect[-1]) and by["p"] == pytest.approx(10 * expect[-1])


def test_amp_on_cpu_describes_in_bfloat16_and_trains_in_float32():
    fmaps, labels = problem()
    full = build(fmaps, labels, epochs=1)
    amp = build(fmaps, labels, epochs=1, amp=True)  # bfloat16 autocast on the CPU
    assert amp.amp and amp.amp_dtype == torch.bfloat16 and not full.amp
    idx = torch.arange(len(fmaps))
    a, f = amp.describe(idx), full.describe(idx)
    assert a.dtype == torch.float32 and torch.allclose(a, f, atol=3e-2)
    assert not torch.equal(a, f)  # it did run in reduced precision
    hist = amp.fit()
    assert all(math.isfinite(v) for v in hist["loss"])
    assert all(v.dtype == torch.float32 for v in amp.model.state_dict().values())


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    fmaps, labels = problem()
    calls = {"n": 0}
    base = TupleLoss("contrastive", 0.7)

    def poisoned(outputs, batch):
        calls["n"] += 1
        loss = base(outputs, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    trainer = build(fmaps, labels, checkpoint_dir=tmp_path, epochs=3)
    trainer.objective = poisoned
    seen = []
    trainer.on_step = lambda tr, step, loss: seen.append(_clone(tr.model.state_dict()))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5 \(epoch 2, batch 2 of 3\)"):
        trainer.fit()
    assert trainer.step == 4 and len(trainer.history["loss"]) == 4
    assert _same_state(trainer.model.state_dict(), seen[-1])  # the NaN step was not applied
    assert latest_checkpoint(tmp_path).name == "ckpt-000000004.pt"


def test_an_infinite_loss_stops_the_run():
    fmaps, labels = problem()
    trainer = build(fmaps, labels)
    trainer.objective = lambda outputs, batch: outputs.sum() * float("inf")
    with pytest.raises(FloatingPointError, match="loss is inf at step 1"):
        trainer.fit()


def test_trainer_argument_errors():
    fmaps, labels = problem()
    for kw, match in [(dict(epochs=0), "epochs"), (dict(optimizer="lbfgs"), "unknown optimizer"),
                      (dict(schedule="warm"), "unknown schedule"), (dict(checkpoint_every=0), "checkpoint_every"),
                      (dict(keep_checkpoints=0), "keep_checkpoints")]:
        with pytest.raises(ValueError, match=match):
            build(fmaps, labels, **kw)


def test_trainer_config_checks_once_and_records_the_settings_that_decide_the_result():
    cfg = TrainerConfig(lr=1, seed=3.0, checkpoint_dir="ck", user_config={"a": (1, 2)})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.seed == 3 and cfg.checkpoint_dir == Path("ck")
    assert cfg.user_config == {"a": [1, 2]}  # as JSON gives it back, so a resumed run compares equal
    assert cfg.record() == {"optimizer": "adam", "lr": 1.0, "weight_decay": 0.0, "p_lr_mult": 10.0,
                            "schedule": "constant", "seed": 3, "freeze_batchnorm": True}
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainerConfig(lr=0)
    with pytest.raises(ValueError, match="epochs must be an integer"):
        TrainerConfig(epochs=True)
    with pytest.raises(TypeError, match="optimizer must be a name or a callable"):
        TrainerConfig(optimizer=3)
    with pytest.raises(TypeError):
        TrainerConfig(learning_rate=0.1)  # a misspelt setting is refused, not ignored


def test_trainer_takes_a_config_keywords_or_both():
    fmaps, labels = problem()
    by_kw = build(fmaps, labels, epochs=1)
    net, obj, miner, src = by_kw.model, by_kw.objective, by_kw.miner, by_kw.source
    by_cfg = Trainer(net, obj, miner, src, by_kw.settings)
    both = Trainer(net, obj, miner, src, by_kw.settings, lr=0.5, epochs=2)
    assert by_cfg.config() == by_kw.config()
    assert both.settings.lr == 0.5 and both.settings.epochs == 2 and by_kw.settings.lr == 0.01  # a copy is changed
    assert both.config()["trainer"]["lr"] == 0.5
    with pytest.raises(ValueError, match="unknown schedule"):
        Trainer(net, obj, miner, src, by_kw.settings, schedule="warm")


def test_the_step_schedule_is_in_the_table_and_named_by_its_milestones():
    from retrieval_lib.engine.optim import SCHEDULES, StepSchedule

    assert [SCHEDULES["step"](0, e, 100) for e in (0, 11, 12, 15, 16, 19)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert TrainerConfig(schedule="step").record()["schedule"] == "step"
    assert TrainerConfig(schedule=StepSchedule((2,), 0.5)).record()["schedule"] == \
        "StepSchedule(milestones=(2,), gamma=0.5)"


def test_objectives_share_one_base_forward_of_outputs_and_labels():
    from retrieval_lib.engine.objectives import BranchBatchHardLoss, Objective, RankLoss

    torch.manual_seed(0)
    X = F.normalize(torch.randn(8, 5), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for obj in (BatchHardLoss(0.2), RankLoss("smoothap", tau=0.1),
                CombinedLoss([(BatchHardLoss(0.2), 1.0), (RankLoss("nra", tau=0.1), 0.5)])):
        assert isinstance(obj, Objective)
        assert float(obj(X, {"images": torch.arange(8), "labels": labels})) == float(obj.forward(X, labels))
    assert BatchHardLoss(1).config() == {"objective": "batch_hard", "margin": 1.0}
    assert TupleLoss("triplet", 0.5).config() == {"objective": "tuple", "loss": "triplet", "margin": 0.5,
                                                  "squared": False}
    assert ClassificationLoss().config() == {"objective": "classification", "smoothing": 0.1, "temperature": 0.5}
    assert BranchBatchHardLoss().config() == {"objective": "branch_batch_hard", "margin": 0.1}
    assert repr(BatchHardLoss(0.2)) == "BatchHardLoss(margin=0.2)"


def test_paper_trainer_names_its_recipes_and_sends_cgd_to_cgd_trainer():
    from retrieval_lib.engine.recipes import paper_trainer

    for name, match in (("cgd", "cgd_trainer"), ("vlad", r"choose one of \['gem', 'wgem'\]")):
        with pytest.raises(ValueError, match=match):
            paper_trainer(name, None, GeM(), None)


def test_optimizer_factory_and_sgd():
    import functools

    fmaps, labels = problem()
    trainer = build(fmaps, labels, epochs=1)
    trainer.settings.optimizer = functools.partial(torch.optim.SGD, momentum=0.5)
    before = _clone(trainer.model.state_dict())
    trainer.fit()
    assert not _same_state(before, trainer.model.state_dict())
    assert trainer.config()["trainer"]["optimizer"].startswith("functools.partial(<class 'torch.optim.sgd.SGD'>")


# ------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_atomic_pruned_and_carry_their_configuration(tmp_path):
    fmaps, labels = problem()
    trainer = build(fmaps, labels, checkpoint_dir=tmp_path, epochs=2, keep_checkpoints=2)
    trainer.fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000000004.pt", "ckpt-000000006.pt"]  # every 2 steps and the last; 2 kept
    ck = load_checkpoint(tmp_path / "ckpt-000000006.pt")
    assert ck["config"]["user"] == {"problem": "tiny"}
    assert ck["config"]["trainer"]["lr"] == 0.01 and ck["config"]["miner"]["n_neg"] == 2
    assert ck["config"]["objective"] == {"objective": "tuple", "loss": "contrastive", "margin": 0.7,
                                         "squared": False}
    assert ck["step"] == 6 and ck["epoch"] == 2 and ck["plan"] is None
    assert _same_state(ck["model"], trainer.model.state_dict())


def test_resume_refuses_other_settings(tmp_path):
    fmaps, labels = problem()
    build(fmaps, labels, checkpoint_dir=tmp_path, epochs=1).fit()
    other = build(fmaps, labels, checkpoint_dir=tmp_path, epochs=2)
    other.settings.lr = 0.02
    with pytest.raises(ValueError, match=r"other settings \(trainer.lr: 0.01 -> 0.02\)"):
        other.fit()


def test_latest_checkpoint_skips_files_that_do_not_read(tmp_path):
    fmaps, labels = problem()
    build(fmaps, labels, checkpoint_dir=tmp_path, epochs=1, checkpoint_every=1, keep_checkpoints=5).fit()
    good = (tmp_path / "ckpt-000000003.pt").read_bytes()
    (tmp_path / "ckpt-000000009.pt").write_bytes(good[: len(good) // 2])  # cut short
    (tmp_path / "ckpt-000000008.pt").write_bytes(b"not a checkpoint")
    torch.save({"format": "something else"}, tmp_path / "ckpt-000000007.pt")
    with pytest.warns(UserWarning, match="skipping a checkpoint") as rec:
        assert latest_checkpoint(tmp_path).name == "ckpt-000000003.pt"
    assert len(rec) == 3
    with pytest.raises(ValueError, match="cut short"):
        load_checkpoint(tmp_path / "ckpt-000000009.pt")
    assert latest_checkpoint(tmp_path / "absent") is None


def test_resume_at_an_epoch_boundary_after_a_stop(tmp_path):
    """A run stopped (here by an exception) after step 7 resumes from the end of epoch 2."""
    fmaps, labels = problem()
    reference = build(fmaps, labels, epochs=4)
    reference.fit()

    class Stop(Exception):
        pass

    def stop_at_7(trainer, step, loss):
        if step == 7:
            raise Stop

    with pytest.raises(Stop):
        build(fmaps, labels, checkpoint_dir=tmp_path, epochs=4, checkpoint_every=3, on_step=stop_at_7).fit()
    resumed = build(fmaps, labels, checkpoint_dir=tmp_path, epochs=4, checkpoint_every=3)
    hist = resumed.fit()
    assert resumed.resumed_from.name == "ckpt-000000006.pt"
    assert hist["loss"] == reference.history["loss"]
    assert _same_state(resumed.model.state_dict(), reference.model.state_dict())


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, one_thread):
    """SIGKILL a real training process after step 5; add a checkpoint cut short while being
    written and a half-written temporary file; the resumed run skips both, restarts from
    step 4 and ends bit-identical to an uninterrupted run with the same seed."""
    ckpt, flag = tmp_path / "ckpt", tmp_path / "at-step"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(HERE / "_train_child.py"), str(ckpt), "5", str(flag)],
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        fmaps, labels = problem()
        reference = build(fmaps, labels)  # uninterrupted, computed while the child starts
        reference.fit()
        deadline = time.monotonic() + 240
        while not flag.exists():
            if child.poll() is not None:
                pytest.fail(f"the training child exited early:\n{child.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("the training child did not reach step 5 in 240 s")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert flag.read_text() == "5"
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt-000000002.pt", "ckpt-000000004.pt"]

    # what a kill during a write leaves: a newer checkpoint cut short (a non-atomic copy, a
    # full disk) and the writer's temporary file
    good = (ckpt / "ckpt-000000004.pt").read_bytes()
    (ckpt / "ckpt-000000006.pt").write_bytes(good[: len(good) * 2 // 3])
    (ckpt / ".ckpt-000000006.pt.k2j3.tmp").write_bytes(good[:1000])

    resumed = build(fmaps, labels, checkpoint_dir=ckpt)
    with pytest.warns(UserWarning) as rec:
        hist = resumed.fit()
    messages = " | ".join(str(w.message) for w in rec)
    assert "skipping a checkpoint" in messages and "ckpt-000000006.pt" in messages
    assert "removed 1 unfinished checkpoint" in messages
    assert resumed.resumed_from.name == "ckpt-000000004.pt"
    assert not (ckpt / ".ckpt-000000006.pt.k2j3.tmp").exists()
    assert len(hist["loss"]) == 9
    assert hist["loss"] == reference.history["loss"]
    assert _same_state(resumed.model.state_dict(), reference.model.state_dict())


# ------------------------------------------------------------------------- several processes
def test_two_processes_end_with_the_weights_of_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "_ddp_child.py"), str(tmp_path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert _same_state(r0["state"], r1["state"])  # the ranks agree bit for bit
    # each process computed its loss on its own half of every global batch of 4 tuples
    assert [len(t) for t in r0["tuples"]] == [len(t) for t in r1["tuples"]] == [2] * 4
    assert all(not set(map(tuple, a)) & set(map(tuple, b)) for a, b in zip(r0["tuples"], r1["tuples"]))
    assert r0["loss"] == r1["loss"]

    fmaps, labels = problem(dtype=torch.float64)
    single = build(fmaps, labels, epochs=2, batch_size=4, n_queries=8, dtype=torch.float64)
    single.fit()
    assert r0["loss"] == pytest.approx(single.history["loss"], rel=1e-10)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(r0["state"][k], v, rtol=1e-9, atol=1e-12), k
    assert not torch.equal(r0["state"]["pooling.p"], model(torch.float64).pooling.p.detach())  # it trained
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["ckpt-000000003.pt", "ckpt-000000004.pt"]


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(ValueError, match="multiple of 2"):
        shard_batch({"images": torch.zeros(5, 4, dtype=torch.int64)}, 0, 2)
    half = shard_batch({"images": torch.arange(8).view(4, 2), "labels": torch.arange(4)}, 1, 2)
    assert half["images"].tolist() == [[4, 5], [6, 7]] and half["labels"].tolist() == [2, 3]


# ------------------------------------------------------------------------- other objectives
def test_pk_batches_with_batch_hard_and_classification():
    fmaps, labels = problem(groups=6, per=3)
    torch.manual_seed(0)
    net = RetrievalNet(GeM(p=2.0), whiten=nn.Linear(C, C), classifier=nn.Linear(C, 6))
    objective = CombinedLoss([(BatchHardLoss(0.2), 1.0), (ClassificationLoss(0.1, 0.5), 0.5)])
    trainer = Trainer(net, objective, PKMiner(labels, P=3, K=2), MapSource(fmaps, labels), lr=0.02, epochs=6,
                      device="cpu", progress=False)
    before = _clone(net.state_dict())
    hist = trainer.fit()
    assert len(hist["loss"]) == 12 and all(math.isfinite(v) for v in hist["loss"])
    assert np.mean(hist["loss"][-4:]) < np.mean(hist["loss"][:4])
    assert not torch.equal(before["classifier.weight"], net.classifier.weight)
    assert trainer.config()["objective"]["terms"][1][0]["objective"] == "classification"


def test_classification_loss_needs_a_classifier():
    with pytest.raises(ValueError, match="needs logits"):
        ClassificationLoss()(torch.zeros(4, 3), {"labels": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(ValueError, match="needs negatives"):
        TupleLoss("triplet")(torch.zeros(2, 2, 3), {})
    with pytest.raises(ValueError, match="tuple batches"):
        TupleLoss()(torch.zeros(4, 3), {})
    with pytest.raises(ValueError, match="'contrastive' or 'triplet'"):
        TupleLoss("hinge")


def test_tuple_triplet_loss_matches_its_triplets():
    g = torch.Generator().manual_seed(0)
    D = functional.l2n(torch.randn(3, 4, 5, generator=g, dtype=torch.float64))  # 3 tuples, 2 negatives
    got = TupleLoss("triplet", margin=0.3)(D, {})
    terms = [max(0.0, (D[t, 0] - D[t, 1]).norm().item() - (D[t, 0] - D[t, n]).norm().item() + 0.3)
             for t in range(3) for n in (2, 3)]
    assert got.item() == pytest.approx(sum(terms) / 6, rel=1e-12)


# ------------------------------------------------------------------------- full and reduced mode
class TinyBackbone(Backbone):
    name = "tiny-test"
    out_channels = 6
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def features(self, x):
        return F.relu(self.bn(self.conv(x))) + 1e-3

    def forward(self, x):
        return self.features(x).mean((2, 3))


def _image_groups(folder: Path, groups=4, per=3, seed=0) -> GroupDataset:
    rng = np.random.default_rng(seed)
    for g in range(groups):
        base = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        (folder / f"g{g}").mkdir(parents=True)
        for k in range(per):
            noisy = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"g{g}" / f"{k}.png")
    return GroupDataset.from_folder(folder)


def test_full_mode_fine_tunes_backbone_and_head_end_to_end(tmp_path):
    ds = _image_groups(tmp_path / "imgs")
    bb = TinyBackbone()
    bn_stats = bb.bn.running_mean.clone()
    net = RetrievalNet(GeM(p=3.0), backbone=bb)
    source = ImageSource(ds.database, image_size=48, mean=bb.mean, std=bb.std, workers=2)
    miner = TupleMiner(ds.labels, n_neg=1, n_queries=4, pool_size=12, batch_size=2)
    trainer = Trainer(net, TupleLoss("contrastive", 0.7), miner, source, lr=1e-2, epochs=1, device="cpu",
                      channels_last=True, progress=False)
    before = _clone(net.state_dict())
    hist = trainer.fit()
    assert len(hist["loss"]) == 2 and all(math.isfinite(v) for v in hist["loss"])
    assert not torch.equal(before["backbone.conv.weight"], net.backbone.conv.weight)  # the backbone learned
    assert not torch.equal(before["pooling.p"], net.pooling.p)
    assert torch.equal(bn_stats, bb.bn.running_mean)  # BatchNorm frozen, as cirtorch trains
    assert net.channels_last
    x = source.load([0])[0]
    assert x.shape[0] == 3 and max(x.shape[1:]) == 48
    want = (torch.from_numpy(np.array(ds.database[0].resize((48, 34), Image.BICUBIC))).permute(2, 0, 1) / 255
            - 0.5) / 0.25
    assert torch.allclose(x, want, atol=1e-6)


def test_reduced_mode_extracts_views_once_and_trains_the_head(tmp_path):
    ds = _image_groups(tmp_path / "imgs")
    bb = TinyBackbone().eval()
    source, views = reduced_source(bb, ds, n_views=2, n_composites=1, image_size=64, cache_dir=tmp_path / "cache",
                                   progress=False)
    assert len(source) == len(views) == 12 * 4
    assert (source.labels == views.labels).all()
    assert sorted(set(views.kind.tolist())) == ["composite", "original", "view"]

    cached = {f: f.stat().st_mtime_ns for f in (tmp_path / "cache" / "features").iterdir()}
    assert len(cached) == 1
    again, _ = reduced_source(bb, ds, n_views=2, n_composites=1, image_size=64, cache_dir=tmp_path / "cache",
                              progress=False)
    assert all(torch.equal(a, b) for a, b in zip(source.fmaps, again.fmaps))
    # read back, not extracted and written again
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "cache" / "features").iterdir()} == cached

    net = RetrievalNet(WGeM(6, p=3.0))
    trainer = Trainer(net, TupleLoss("contrastive", 0.7),
                      TupleMiner(source.labels, n_neg=2, n_queries=8, pool_size=48, batch_size=4), source,
                      lr=1e-2, epochs=1, device="cpu", progress=False)
    before = _clone(net.state_dict())
    trainer.fit()
    assert not torch.equal(before["pooling.conv.weight"], net.pooling.conv.weight)
    assert not torch.equal(before["pooling.p"], net.pooling.p)


def test_map_source_errors():
    with pytest.raises(ValueError, match="every image needs a feature map"):
        MapSource([torch.zeros(2, 2, 2), None])
    with pytest.raises(ValueError, match="2 labels for 1 maps"):
        MapSource([torch.zeros(2, 2, 2)], labels=[0, 1])


def test_a_time_budget_trains_in_chunks_that_end_where_one_run_ends(tmp_path):
    """fit(max_seconds=...) stops after the first step past the budget, checkpointed; fresh trainers
    (a new Colab session each) resume chunk by chunk and end bit-identical to an uninterrupted run."""
    fmaps, labels = problem()
    reference = build(fmaps, labels, epochs=3)
    reference.fit()
    assert reference.finished
    n_steps = len(reference.history["loss"])
    chunks, resumed_at = 0, []
    while True:
        t = build(fmaps, labels, checkpoint_dir=tmp_path, epochs=3, checkpoint_every=1000)
        t.fit(max_seconds=1e-9)  # every step is past the budget: one step per chunk
        chunks += 1
        resumed_at.append(t.step)
        if t.finished:
            break
        assert chunks < 100
    assert chunks == n_steps and resumed_at == list(range(1, n_steps + 1))
    assert t.history["loss"] == reference.history["loss"]
    assert _same_state(t.model.state_dict(), reference.model.state_dict())


@pytest.mark.parametrize("budget, where, match", [(0, True, "positive number"), (-1.0, True, "positive number"),
                                                   (True, True, "positive number"), ("10", True, "positive number"),
                                                   (5.0, False, "give the Trainer a checkpoint_dir")])
def test_a_time_budget_that_cannot_work_is_refused(tmp_path, budget, where, match):
    fmaps, labels = problem()
    t = build(fmaps, labels, checkpoint_dir=tmp_path if where else None)
    with pytest.raises(ValueError, match=match):
        t.fit(max_seconds=budget)
