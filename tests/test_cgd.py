"""CGD (Jun et al. 2019): the head, its variants, its losses and the plumbing of notebook 07.

Every number is checked against a plain reference: loops over the map for the poolings,
the equations written out for the per-branch FC + L2 and the combination, a hand-worked
2-channel map, and a loop for the held-out Recall@K.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from retrieval_lib.book.cgd import (compare, comparison_table, describe, heldout_scores, loss_change, pool_branches,
                                    summarize, take_branches, train_and_score, train_head)
from retrieval_lib.engine.objectives import BranchBatchHardLoss, ClassificationLoss, cgd_objective
from retrieval_lib.engine.optim import SCHEDULES, StepSchedule
from retrieval_lib.engine.recipes import RECIPES, CGD_RECIPE, cgd_trainer, describe_images, remap_labels
from retrieval_lib.search.compare import paired_comparison
from retrieval_lib.engine.sources import CropSource, MapSource
from retrieval_lib.models.cgd_net import CGDNet, build_head
from retrieval_lib.layers.cgd import CGD, CGD_CONFIGS, parse_config, unit
from retrieval_lib.models.backbones import resnet50_cgd


# ------------------------------------------------------------------ plain references
def ref_pool(x, letter, p=3.0, eps=1e-6):
    """SPoC / MAC / GeM of one map (C, H, W) by loops over the cells."""
    C, H, W = x.shape
    out = torch.zeros(C, dtype=x.dtype)
    for c in range(C):
        vals = [float(x[c, i, j]) for i in range(H) for j in range(W)]
        if letter == "S":
            out[c] = sum(vals) / len(vals)
        elif letter == "M":
            out[c] = max(vals)
        else:
            out[c] = (sum(max(v, eps) ** p for v in vals) / len(vals)) ** (1 / p)
    return out


def ref_norm(v):
    return v / math.sqrt(sum(float(a) ** 2 for a in v))


def ref_cgd(head, x):
    """CGD written out for one map (C, H, W): per-branch pool, W_i f_i, L2, concatenate (or sum), L2."""
    pooled = [ref_pool(x, b, head.gem_p) for b in head.config_name]
    if head.arch == "B":
        return ref_norm(head.fc.weight.detach() @ torch.cat(pooled))
    blocks = [ref_norm(fc.weight.detach() @ f) for fc, f in zip(head.fcs, pooled)]
    return ref_norm(sum(blocks)) if head.combine == "sum" else ref_norm(torch.cat(blocks))


def fmap(B=3, C=6, H=4, W=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 3


# ------------------------------------------------------------------ the head
@pytest.mark.parametrize("config", ["S", "M", "G", "SM", "MG", "SG", "SMG", "GMS"])
def test_cgd_equals_the_written_out_equations_and_blocks_have_norm_one_over_sqrt_n(config):
    n = len(config)
    head = CGD(config, in_channels=6, dim=12, n_classes=4).double().eval()
    x = fmap()
    d = head(x)
    assert d.shape == (3, 12) and head.k == 12 // n
    for b in range(3):
        assert torch.allclose(d[b], ref_cgd(head, x[b]), atol=1e-12, rtol=0)
    blocks = d.view(3, n, 12 // n)
    assert torch.allclose(blocks.norm(dim=-1), torch.full((3, n), 1 / math.sqrt(n), dtype=torch.float64),
                          atol=1e-14, rtol=0)
    assert torch.allclose(d.norm(dim=-1), torch.ones(3, dtype=torch.float64), atol=1e-14, rtol=0)


def test_hand_worked_two_channel_map():
    # channel 0 = [[1, 2], [3, 4]], channel 1 = [[0, 0], [0, 4]]; FCs are the identity (k = C = 2)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 4.0]]]], dtype=torch.float64)
    head = CGD("SMG", in_channels=2, dim=6).double().eval()
    with torch.no_grad():
        for fc in head.fcs:
            fc.weight.copy_(torch.eye(2, dtype=torch.float64))
    f64 = dict(dtype=torch.float64)
    spoc = torch.tensor([2.5, 1.0], **f64)  # means
    mac = torch.tensor([4.0, 4.0], **f64)  # maxima
    gem = torch.tensor([25.0 ** (1 / 3), 16.0 ** (1 / 3)], **f64)  # (1 + 8 + 27 + 64) / 4 = 25 and 64 / 4 = 16
    want = torch.cat([spoc / math.sqrt(7.25), mac / math.sqrt(32.0), gem / math.sqrt(25 ** (2 / 3) + 16 ** (2 / 3))])
    want = want / math.sqrt(3)
    assert torch.allclose(head.pool(x)[0], torch.stack([spoc, mac, gem]), atol=1e-9, rtol=0)
    assert torch.allclose(head(x)[0], want, atol=1e-9, rtol=0)


def test_sum_combination_and_architectures_a_b_against_references():
    x = fmap(seed=1)
    for kw in (dict(combine="sum"), dict(arch="A"), dict(arch="B")):
        head = CGD("SMG", in_channels=6, dim=12, **kw).double().eval()
        d = head(x)
        assert d.shape == (3, 12), kw
        for b in range(3):
            assert torch.allclose(d[b], ref_cgd(head, x[b]), atol=1e-12, rtol=0), kw
    assert CGD("SMG", 6, 12, combine="sum").k == 12 and CGD("SMG", 6, 12, arch="B").fc.in_features == 18


def test_training_outputs_follow_the_objectives_layout():
    x = fmap(B=4)
    head = CGD("MG", in_channels=6, dim=8, n_classes=5).double().train()
    d, logits = head(x)
    assert d.shape == (4, 8) and logits.shape == (4, 5)
    # the classifier reads the FIRST branch's pooled vector (here MAC) through BN + Linear
    assert torch.allclose(logits, head.classifier(x.amax(dim=(-2, -1))), atol=1e-12)
    x = x.float()
    assert isinstance(CGD("MG", 6, 8).train()(x), torch.Tensor)  # no classifier: the descriptor alone
    d, logits, blocks = CGD("SMG", 6, 9, n_classes=5, arch="A").train()(x)
    assert blocks.shape == (4, 3, 3) and torch.allclose(blocks.norm(dim=-1), torch.ones(4, 3), atol=1e-6)
    assert torch.allclose(d, blocks.flatten(1) / math.sqrt(3), atol=1e-6)
    assert CGD("SMG", 6, 9, n_classes=5).eval()(x).shape == (4, 9)  # eval: the descriptor only


def test_config_names():
    assert len(CGD_CONFIGS) == 15 and len(set(CGD_CONFIGS)) == 15
    assert {"S", "M", "G", "SM", "MG", "SG", "SMG", "GS"} <= set(CGD_CONFIGS)
    assert parse_config(" smg ") == "SMG"
    head = CGD("gs", in_channels=6, dim=8)
    assert head.config_name == "GS" and [type(p).__name__ for p in head.pools] == ["GeM", "SPoC"]
    assert not head.pools[0].learn_p and float(head.pools[0].p) == 3.0  # GeM's p fixed at 3
    assert "config='GS'" in repr(head) and "k=4" in repr(head)


@pytest.mark.parametrize("bad, match", [("SX", "unknown branch"), ("SS", "twice"), ("", "empty"), (3, "string")])
def test_bad_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        CGD(bad, in_channels=6, dim=6)


def test_bad_arguments_errors():
    with pytest.raises(ValueError, match="not divisible"):
        CGD("SMG", in_channels=6, dim=8)
    with pytest.raises(ValueError, match="combine"):
        CGD("SG", in_channels=6, dim=8, combine="mean")
    with pytest.raises(ValueError, match="arch"):
        CGD("SG", in_channels=6, dim=8, arch="C")
    with pytest.raises(ValueError, match="ablation of arch='cgd'"):
        CGD("SG", in_channels=6, dim=8, arch="A", combine="sum")
    with pytest.raises(ValueError, match="n_classes"):
        CGD("SG", in_channels=6, dim=8, n_classes=1)
    with pytest.raises(ValueError, match="gem_p"):
        CGD("SG", in_channels=6, dim=8, gem_p=0.5)
    with pytest.raises(ValueError, match="in_channels=6"):
        CGD("SG", in_channels=4, dim=8)(fmap())
    with pytest.raises(ValueError, match="pooled vectors"):
        CGD("SG", in_channels=6, dim=8).embed(torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match="no per-branch FC"):
        CGD("SG", in_channels=6, dim=8, arch="B").blocks(torch.zeros(2, 2, 6))


# ------------------------------------------------------------------ losses and gradients
def _batch(P=3, K=2):
    return {"images": torch.arange(P * K), "labels": torch.arange(P).repeat_interleave(K)}


@pytest.mark.parametrize("arch", ["cgd", "A", "B"])
def test_gradients_reach_every_branch_and_the_classifier(arch):
    torch.manual_seed(0)
    head = CGD("SMG", in_channels=6, dim=12, n_classes=3, arch=arch).train()
    loss = cgd_objective(arch=arch, margin=0.5)(head(fmap(B=6, seed=2).float()), _batch())
    loss.backward()
    fcs = [head.fc] if arch == "B" else list(head.fcs)
    for fc in fcs:
        assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    bn, linear = head.classifier
    for p in (bn.weight, bn.bias, linear.weight, linear.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_without_the_auxiliary_loss_the_classifier_gets_no_gradient():
    head = CGD("SG", in_channels=6, dim=8, n_classes=3).train()
    cgd_objective(aux=False, margin=0.5)(head(fmap(B=6).float()), _batch()).backward()
    assert head.classifier[1].weight.grad is None and head.fcs[0].weight.grad.abs().sum() > 0


def test_branch_loss_is_the_sum_of_per_branch_batch_hard_losses():
    from retrieval_lib.layers.losses import batch_hard_triplet_loss

    head = CGD("SMG", in_channels=6, dim=12, n_classes=3, arch="A").train()
    out = head(fmap(B=6, seed=3).float())
    lab = _batch()["labels"]
    want = sum(batch_hard_triplet_loss(out[2][:, i], lab, 0.5) for i in range(3))
    assert torch.allclose(BranchBatchHardLoss(0.5)(out, _batch()), want)
    with pytest.raises(ValueError, match="arch='A'"):
        BranchBatchHardLoss()(out[:2], _batch())


def test_objective_terms_follow_the_flags():
    terms = [type(o).__name__ for o, _ in cgd_objective().terms]
    assert terms == ["BatchHardLoss", "ClassificationLoss"]
    assert [type(o).__name__ for o, _ in cgd_objective(arch="A", aux=False).terms] == ["BranchBatchHardLoss"]
    cls = cgd_objective(smoothing=0.0, temperature=1.0).terms[1][0]
    assert (cls.smoothing, cls.temperature) == (0.0, 1.0)


class TinyBackbone(nn.Module):
    out_channels = 4
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def features(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_backbone_batchnorm_frozen_in_train_mode_head_batchnorm_learns():
    torch.manual_seed(0)
    net = CGDNet(CGD("SG", in_channels=4, dim=4, n_classes=3), backbone=TinyBackbone()).train()
    assert not net.backbone.bn.training and net.head.classifier[0].training
    before_bb = net.backbone.bn.running_mean.clone()
    before_head = net.head.classifier[0].running_mean.clone()
    net(torch.rand(4, 3, 8, 8) + 1)
    assert torch.equal(net.backbone.bn.running_mean, before_bb)  # frozen statistics
    assert not torch.equal(net.head.classifier[0].running_mean, before_head)
    unfrozen = CGDNet(CGD("SG", in_channels=4, dim=4), backbone=TinyBackbone(), freeze_backbone_bn=False).train()
    assert unfrozen.backbone.bn.training
    with pytest.raises(ValueError, match="pooled_inputs"):
        CGDNet(CGD("SG", 4, 4), backbone=TinyBackbone(), pooled_inputs=True)
    with pytest.raises(TypeError, match="CGD"):
        CGDNet(nn.Identity())


def test_cgdnet_lists_of_maps_keep_order_and_every_output():
    head = CGD("SMG", in_channels=6, dim=6, n_classes=3, arch="A").train()
    head.classifier[0].eval()  # batch statistics would differ between the grouped and the whole batch
    x = fmap(B=3, seed=4).float()
    maps = [x[0], x[1, :, :3, :4], x[2]]  # two sizes
    out = CGDNet(head)(maps)
    assert len(out) == 3 and out[2].shape == (3, 3, 2)
    for i, m in enumerate(maps):
        one = head(m[None])
        for a, b in zip(out, one):
            assert torch.allclose(a[i], b[0], atol=1e-6)


# ------------------------------------------------------------------ plumbing of the notebook
def test_pool_branches_and_take_branches():
    x = fmap(B=2, seed=5).float()
    maps = [x[0], x[1, :, :2, :3]]
    pooled = pool_branches(maps)
    assert pooled.shape == (2, 3, 6)
    for i, m in enumerate(maps):
        for j, b in enumerate("SMG"):
            assert torch.allclose(pooled[i, j], ref_pool(m.double(), b).float(), atol=1e-5)
    gs = take_branches(pooled, "GS")
    assert torch.equal(gs[:, 0], pooled[:, 2]) and torch.equal(gs[:, 1], pooled[:, 0])
    with pytest.raises(ValueError, match="pool_branches"):
        take_branches(pooled[:, :2], "S")


def test_training_on_pooled_vectors_equals_training_on_maps():
    g = torch.Generator().manual_seed(6)
    maps = [torch.rand(6, 3, 4, generator=g) for _ in range(12)]
    labels = np.repeat(np.arange(4), 3)
    pooled = take_branches(pool_branches(maps), "MG")
    runs = []
    for inputs, is_pooled in ((list(pooled), True), (maps, False)):
        head = build_head("MG", 6, 8, n_classes=4, seed=1)
        head, hist = train_head(head, MapSource(inputs, labels), cgd_objective(margin=0.5), epochs=3, lr=1e-2,
                                P=2, K=3, milestones=(2,), pooled_inputs=is_pooled)
        runs.append((head, hist))
    (h1, hist1), (h2, hist2) = runs
    assert len(hist1["loss"]) == 6 and np.allclose(hist1["loss"], hist2["loss"], atol=1e-5)
    assert hist1["lr"] == [1e-2] * 4 + [pytest.approx(1e-3)] * 2  # x0.1 from epoch 2 on
    for a, b in zip(h1.state_dict().values(), h2.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert torch.allclose(describe(h1, pooled), describe(h2, maps, pooled_inputs=False), atol=1e-5)
    assert hist1["loss"][-1] != hist1["loss"][0]  # it trained


def test_build_head_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_head("SG", 6, 8, seed=3), build_head("SG", 6, 8, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.fcs[0].weight, b.fcs[0].weight)
    assert not torch.equal(a.fcs[0].weight, build_head("SG", 6, 8, seed=4).fcs[0].weight)


def test_step_schedule():
    s = StepSchedule((12, 16))
    assert [SCHEDULES["step"](0, e, 0) for e in range(20)] == [s(0, e, 0) for e in range(20)]  # the paper's
    assert RECIPES["cgd"] is CGD_RECIPE and (CGD_RECIPE["milestones"], CGD_RECIPE["gamma"]) == ((12, 16), 0.1)
    assert [s(0, e, 0) for e in (0, 11, 12, 15, 16, 19)] == [1, 1, pytest.approx(0.1), pytest.approx(0.1),
                                                             pytest.approx(0.01), pytest.approx(0.01)]
    with pytest.raises(ValueError, match="gamma"):
        StepSchedule((3,), gamma=2)
    with pytest.raises(ValueError, match="milestones"):
        StepSchedule((0,))


def test_remap_labels():
    assert remap_labels([7, 3, 7, 9]).tolist() == [1, 0, 1, 2]
    with pytest.raises(ValueError, match="1-D"):
        remap_labels([])


def ref_recall(X, lab, k):
    """Loop: among queries whose label has another image, the share with a match in their k nearest others."""
    S = X @ X.T
    hits, n = 0, 0
    for q in range(len(lab)):
        if (lab == lab[q]).sum() < 2:
            continue
        others = [i for i in sorted(range(len(lab)), key=lambda i: (-float(S[q, i]), i)) if i != q]
        hits += any(lab[i] == lab[q] for i in others[:k])
        n += 1
    return hits / n


def test_heldout_scores_against_a_loop():
    g = torch.Generator().manual_seed(7)
    X = unit(torch.randn(15, 4, generator=g, dtype=torch.float64))
    lab = np.array([0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 5, 5, 5, 6, 7])  # 3, 6, 7 are single-image distractors
    s = heldout_scores(X, lab)
    for k in (1, 2, 4, 8):
        assert s[f"R@{k}"] == pytest.approx(ref_recall(X, lab, k), abs=1e-12)
        assert s["hits"][k].mean() == pytest.approx(s[f"R@{k}"], abs=1e-12)
    assert s["queries"].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    assert len(s["aps"]) == 12 and s["mAP"] == pytest.approx(float(np.mean(s["aps"])))
    perfect = heldout_scores(torch.eye(3, dtype=torch.float64)[[0, 0, 1, 1, 2]], np.array([0, 0, 1, 1, 2]))
    assert perfect["R@1"] == 1.0 and perfect["mAP"] == 1.0
    with pytest.raises(ValueError, match="no label has two images"):
        heldout_scores(X[:3], np.array([0, 1, 2]))


# ------------------------------------------------------------------ the full path
def test_resnet50_cgd_map_is_14_by_14_at_224_px():
    bb = resnet50_cgd(weights=None)
    assert bb.config["last_stride"] == 1 and bb.config["weights"] is None and bb.out_channels == 2048
    with torch.inference_mode():
        assert bb.features(torch.rand(1, 3, 224, 224)).shape == (1, 2048, 14, 14)


class _Images:
    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_crop_source_sizes_and_flip():
    src = CropSource(_Images(4), [0, 0, 1, 1], (0.5,) * 3, (0.5,) * 3, train_size=20, crop=16, seed=0)
    xs = src.load([0, 1, 3])
    assert [tuple(x.shape) for x in xs] == [(3, 16, 16)] * 3
    with pytest.raises(ValueError, match="larger"):
        CropSource(_Images(2), [0, 1], (0.5,) * 3, (0.5,) * 3, train_size=10, crop=16)


def test_cgd_trainer_runs_end_to_end_on_a_tiny_set():
    class Data:
        database = _Images(6)
        labels = np.array([5, 5, 8, 8, 9, 9])

    bb = resnet50_cgd(weights=None)
    trainer = cgd_trainer(Data(), backbone=bb, config="MG", dim=8, P=2, K=2, train_size=40, crop=32, epochs=1,
                          milestones=(1,), device="cpu", progress=False)
    hist = trainer.fit(resume=False)
    assert len(hist["loss"]) == 1 and np.isfinite(hist["loss"]).all()
    assert not trainer.model.backbone.bn1.training or not trainer.model.training
    X = describe_images(trainer.model, Data.database, size=32, batch=4)
    assert X.shape == (6, 8) and torch.allclose(X.norm(dim=1), torch.ones(6), atol=1e-5)


def test_summarize_means_spreads_and_per_query_averages():
    a = {"queries": np.array([0, 2]), "R@1": 0.5, "mAP": 0.4, "aps": np.array([0.2, 0.6]),
         "hits": {1: np.array([1.0, 0.0])}}
    b = {"queries": np.array([0, 2]), "R@1": 1.0, "mAP": 0.8, "aps": np.array([0.6, 1.0]),
         "hits": {1: np.array([1.0, 1.0])}}
    s = summarize([a, b], ks=(1,))
    assert (s["R@1"], s["R@1/min"], s["R@1/max"], s["n_runs"]) == (0.75, 0.5, 1.0, 2)
    assert s["mAP"] == pytest.approx(0.6) and s["aps"].tolist() == pytest.approx([0.4, 0.8])
    assert s["hits"][1].tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="different queries"):
        summarize([a, dict(b, queries=np.array([0, 1]))], ks=(1,))


def test_train_and_score_compare_and_table():
    g = torch.Generator().manual_seed(8)
    centres = torch.randn(4, 3, 6, generator=g).abs()
    lab = np.repeat(np.arange(4), 4)
    train = centres[lab] + 0.3 * torch.rand(16, 3, 6, generator=g)
    test_lab = np.repeat(np.arange(3), 3)
    test = torch.randn(3, 3, 6, generator=g).abs()[test_lab] + 0.3 * torch.rand(9, 3, 6, generator=g)
    kw = dict(dim=6, epochs=2, lr=1e-2, P=2, K=2)
    res = {"SMG": train_and_score("SMG", train, lab, test, test_lab, seeds=(0, 1), **kw),
           "G": train_and_score("G", train, lab, test, test_lab, aux=False, **kw)}
    assert res["SMG"]["n_runs"] == 2 and res["SMG"]["R@1/min"] <= res["SMG"]["R@1"] <= res["SMG"]["R@1/max"]
    assert res["G"]["head"].classifier is None and res["SMG"]["head"].config_name == "SMG"
    assert len(res["SMG"]["history"]["loss"]) == 4 == res["SMG"]["steps"] and res["SMG"]["seconds"] > 0
    # the seeds' own scores: their summary is the setting's, the first alone pairs with a one-seed setting
    runs = res["SMG"]["runs"]
    assert len(runs) == 2 and summarize(runs)["R@1"] == res["SMG"]["R@1"]
    assert np.array_equal(summarize(runs[:1])["aps"], runs[0]["aps"])
    same = compare(res, "SMG", "SMG")
    assert same["R@1"]["delta"] == 0 and not same["mAP"]["significant"]
    table, cmps = comparison_table(res, [("SMG", "G")], names={"SMG": "CGD SMG"})
    assert "CGD SMG − G" in table and cmps[("SMG", "G")]["R@1"]["n"] == 9
    # the queries of one class are resampled together: the comparison is the group bootstrap's
    assert np.array_equal(res["SMG"]["groups"], test_lab) and np.array_equal(res["G"]["groups"], test_lab)
    by_class = paired_comparison(res["SMG"]["aps"], res["G"]["aps"], seed=0, groups=test_lab)
    assert cmps[("SMG", "G")]["mAP"]["ci"] == by_class["ci"]
    res["G"]["groups"] = test_lab[::-1].copy()
    with pytest.raises(ValueError, match="different queries"):
        compare(res, "SMG", "G")


def test_loss_change_against_a_plain_mean():
    loss = [5.0, 4.0, 3.0, 2.0, 1.8, 1.6, 1.5, 1.4, 1.2, 1.0]
    # share 0.2 of 10 steps: the last 2 (1.2, 1.0) against the 2 before (1.5, 1.4)
    assert loss_change({"loss": loss}) == pytest.approx(((1.2 + 1.0) / 2 - (1.5 + 1.4) / 2) / ((1.5 + 1.4) / 2))
    assert loss_change({"loss": [2.0] * 10}, share=0.5) == 0.0
    with pytest.raises(ValueError, match="share"):
        loss_change({"loss": loss}, share=0.7)
    with pytest.raises(ValueError, match="steps"):
        loss_change({"loss": [1.0, 2.0]}, share=0.2)


def test_channel_scale_equals_scaling_the_map_before_pooling():
    x = fmap(seed=9) + 0.1  # no value below GeM's clamp
    head = CGD("SMG", in_channels=6, dim=12, n_classes=3, channel_scale=True).double().eval()
    with torch.no_grad():
        head.log_scale.copy_(torch.linspace(-1, 1, 6, dtype=torch.float64))
    scaled = x * head.log_scale.detach().exp()[:, None, None]
    plain = CGD("SMG", in_channels=6, dim=12).double().eval()
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if k != "log_scale"}, strict=False)
    d = head(x)
    for b in range(3):
        assert torch.allclose(d[b], ref_cgd(plain, scaled[b]), atol=1e-12, rtol=0)
    assert "channel_scale=True" in repr(head)


def test_auxiliary_loss_reaches_the_descriptor_only_through_the_channel_scale():
    x, batch = fmap(B=6, seed=10).float(), _batch()
    for scale in (False, True):
        torch.manual_seed(0)
        head = CGD("SG", in_channels=6, dim=8, n_classes=3, channel_scale=scale).train()
        ClassificationLoss()(head(x), batch).backward()
        assert head.fcs[0].weight.grad is None  # the classifier never sees the FCs' output
        if scale:
            assert head.log_scale.grad is not None and head.log_scale.grad.abs().sum() > 0


def test_without_channel_scale_the_auxiliary_loss_cannot_change_the_descriptor():
    g = torch.Generator().manual_seed(11)
    lab = np.repeat(np.arange(4), 4)
    train = torch.rand(16, 3, 6, generator=g) + 0.1 * torch.from_numpy(lab).float()[:, None, None]
    test, test_lab = torch.rand(6, 3, 6, generator=g), np.repeat(np.arange(3), 2)
    kw = dict(dim=6, epochs=3, lr=1e-2, P=2, K=2)
    X = {(scale, aux): train_and_score("SG", train, lab, test, test_lab, aux=aux, channel_scale=scale, **kw)["X"]
         for scale in (False, True) for aux in (False, True)}
    assert torch.equal(X[(False, False)], X[(False, True)])  # the classifier's gradient stops at the fixed f_1
    assert not torch.allclose(X[(True, False)], X[(True, True)], atol=1e-6)  # through the shared scales it acts
