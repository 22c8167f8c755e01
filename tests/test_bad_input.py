"""Bad input: a clear ValueError/TypeError naming the argument, raised before any kernel runs
(in-place arguments untouched); labels out of range: a RuntimeError from the CPU kernel.

The "other device" is 'meta', so these run on any machine."""
import math
import re

import pytest
import torch
import torch.nn as nn

import nrrdd_ext


def assert_names(exc_info, name):
    msg = str(exc_info.value)
    assert re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w])", msg), f"{name!r} not named in: {msg}"


META = torch.device("meta")


# ----------------------------------------------------------- masked_refine_step
def step_problem(B=2, C=3, H=8, W=8, K=4, classes=5, head="pooled"):
    return dict(
        x=torch.randn(B, C, H, W), grad=torch.randn(B, C, H, W),
        features=torch.randn(B, K, 3, 3),
        fc_weight=torch.randn(classes, K) if head == "pooled" else torch.randn(classes, K, 3, 3),
        labels=torch.randint(0, classes, (B,)),
        exp_avg=0.1 * torch.randn(B, C, H, W), exp_avg_sq=0.1 * torch.rand(B, C, H, W) + 0.01,
        step=torch.full((1,), 2.0))


def _set(**changes):
    def edit(p, kw):
        for k, v in changes.items():
            (kw if k in ("lr", "betas", "eps", "cam_eps", "clamp_min", "clamp_max", "lr_scale") else p)[k] = (
                v(p) if callable(v) else v)
    return edit


STEP_CASES = [  # (id, edit, exception, name)
    ("x-3d", _set(x=lambda p: p["x"][0]), ValueError, "x"),
    ("x-int", _set(x=lambda p: p["x"].long()), TypeError, "x"),
    ("x-not-tensor", _set(x=lambda p: p["x"].tolist()), TypeError, "x"),
    ("grad-shape", _set(grad=lambda p: p["grad"][:, :2]), ValueError, "grad"),
    ("grad-dtype", _set(grad=lambda p: p["grad"].double()), TypeError, "grad"),
    ("grad-device", _set(grad=lambda p: p["grad"].to(META)), ValueError, "grad"),
    ("features-3d", _set(features=lambda p: p["features"][0]), ValueError, "features"),
    ("features-batch", _set(features=lambda p: p["features"][:1], labels=lambda p: p["labels"][:1]),
     ValueError, "features"),
    ("features-device", _set(features=lambda p: p["features"].to(META), fc_weight=lambda p: p["fc_weight"].to(META),
                             labels=lambda p: p["labels"].to(META)), ValueError, "features"),
    ("features-empty-spatial", _set(features=lambda p: p["features"][:, :, :0]), ValueError, "features"),
    ("fc_weight-3d", _set(fc_weight=lambda p: p["fc_weight"][:, :, None]), ValueError, "fc_weight"),
    ("fc_weight-K", _set(fc_weight=lambda p: p["fc_weight"][:, :3]), ValueError, "fc_weight"),
    ("fc_weight-spatial", _set(fc_weight=lambda p: torch.randn(5, 4, 2, 3)), ValueError, "fc_weight"),
    ("fc_weight-no-class", _set(fc_weight=lambda p: p["fc_weight"][:0]), ValueError, "fc_weight"),
    ("fc_weight-device", _set(fc_weight=lambda p: p["fc_weight"].to(META)), ValueError, "fc_weight"),
    ("labels-float", _set(labels=lambda p: p["labels"].float()), TypeError, "labels"),
    ("labels-int32", _set(labels=lambda p: p["labels"].int()), TypeError, "labels"),
    ("labels-length", _set(labels=lambda p: p["labels"][:1]), ValueError, "labels"),
    ("labels-2d", _set(labels=lambda p: p["labels"][:, None]), ValueError, "labels"),
    ("labels-device", _set(labels=lambda p: p["labels"].to(META)), ValueError, "labels"),
    ("exp_avg-shape", _set(exp_avg=lambda p: p["exp_avg"][..., :4]), ValueError, "exp_avg"),
    ("exp_avg-dtype", _set(exp_avg=lambda p: p["exp_avg"].half()), TypeError, "exp_avg"),
    ("exp_avg-device", _set(exp_avg=lambda p: p["exp_avg"].to(META)), ValueError, "exp_avg"),
    ("exp_avg_sq-shape", _set(exp_avg_sq=lambda p: p["exp_avg_sq"][:1]), ValueError, "exp_avg_sq"),
    ("exp_avg_sq-device", _set(exp_avg_sq=lambda p: p["exp_avg_sq"].to(META)), ValueError, "exp_avg_sq"),
    ("step-numel", _set(step=torch.ones(2)), ValueError, "step"),
    ("step-int", _set(step=torch.ones(1, dtype=torch.long)), TypeError, "step"),
    ("step-device", _set(step=torch.ones(1, device=META)), ValueError, "step"),
    ("lr_scale-numel", _set(lr_scale=torch.ones(3)), ValueError, "lr_scale"),
    ("lr_scale-device", _set(lr_scale=torch.ones(1, device=META)), ValueError, "lr_scale"),
    ("lr-nan", _set(lr=math.nan), ValueError, "lr"),
    ("lr-inf", _set(lr=math.inf), ValueError, "lr"),
    ("lr-negative", _set(lr=-0.1), ValueError, "lr"),
    ("lr-string", _set(lr="fast"), TypeError, "lr"),
    ("eps-negative", _set(eps=-1e-8), ValueError, "eps"),
    ("eps-nan", _set(eps=math.nan), ValueError, "eps"),
    ("cam_eps-negative", _set(cam_eps=-0.5), ValueError, "cam_eps"),
    ("cam_eps-inf", _set(cam_eps=math.inf), ValueError, "cam_eps"),
    ("beta1-one", _set(betas=(1.0, 0.9)), ValueError, "betas[0]"),
    ("beta2-above-one", _set(betas=(0.5, 1.5)), ValueError, "betas[1]"),
    ("beta1-negative", _set(betas=(-0.1, 0.9)), ValueError, "betas[0]"),
    ("beta2-nan", _set(betas=(0.5, math.nan)), ValueError, "betas[1]"),
    ("betas-length", _set(betas=(0.5,)), ValueError, "betas"),
    ("clamp_min-length", _set(clamp_min=torch.zeros(2)), ValueError, "clamp_min"),
    ("clamp_max-length", _set(clamp_max=[1.0, 1.0, 1.0, 1.0]), ValueError, "clamp_max"),
    ("clamp_min-2d", _set(clamp_min=torch.zeros(1, 3)), ValueError, "clamp_min"),
    ("clamp_max-device", _set(clamp_max=torch.ones(3, device=META)), ValueError, "clamp_max"),
]


def _snapshot(p):
    return {k: p[k].clone() for k in ("x", "exp_avg", "exp_avg_sq", "step")
            if isinstance(p[k], torch.Tensor) and p[k].device.type != "meta"}


def _assert_untouched(p, snap):
    for k, v in snap.items():
        if p[k].shape == v.shape and p[k].dtype == v.dtype:
            assert torch.equal(p[k], v), f"{k} was modified"


@pytest.mark.parametrize("case", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_masked_refine_step(case):
    _, edit, exc, name = case
    p = step_problem()
    kw = dict(lr=0.1)
    edit(p, kw)
    snap = _snapshot(p)
    with pytest.raises(exc) as e:
        nrrdd_ext.masked_refine_step(p["x"], p["grad"], p["features"], p["fc_weight"], p["labels"],
                                     p["exp_avg"], p["exp_avg_sq"], p["step"], **kw)
    assert_names(e, name)
    _assert_untouched(p, snap)


SGD_CASES = [c for c in STEP_CASES if c[3] in ("x", "grad", "features", "fc_weight", "labels", "lr", "cam_eps",
                                                "clamp_min", "clamp_max")]


@pytest.mark.parametrize("case", SGD_CASES, ids=[c[0] for c in SGD_CASES])
def test_masked_sgd_step(case):
    _, edit, exc, name = case
    p = step_problem()
    kw = dict(lr=0.1)
    edit(p, kw)
    x0 = p["x"].clone() if isinstance(p["x"], torch.Tensor) else None
    with pytest.raises(exc) as e:
        nrrdd_ext.masked_sgd_step(p["x"], p["grad"], p["features"], p["fc_weight"], p["labels"], **kw)
    assert_names(e, name)
    if x0 is not None and p["x"].shape == x0.shape and p["x"].dtype == x0.dtype:
        assert torch.equal(p["x"], x0)


@pytest.mark.parametrize("bad", [5, -1], ids=["too-big", "negative"])
@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_masked_steps_labels_out_of_range(bad, head):
    p = step_problem(head=head)
    p["labels"][1] = bad
    snap = _snapshot(p)
    with pytest.raises(RuntimeError, match="labels"):
        nrrdd_ext.masked_refine_step(p["x"], p["grad"], p["features"], p["fc_weight"], p["labels"],
                                     p["exp_avg"], p["exp_avg_sq"], p["step"], lr=0.1)
    _assert_untouched(p, snap)
    with pytest.raises(RuntimeError, match="labels"):
        nrrdd_ext.masked_sgd_step(p["x"], p["grad"], p["features"], p["fc_weight"], p["labels"], lr=0.1)
    _assert_untouched(p, snap)


def test_masked_adam_optimizer_bad_input():
    with pytest.raises(ValueError) as e:
        nrrdd_ext.MaskedAdam([nn.Parameter(torch.randn(2, 3, 4, 4))], lr=-1.0)
    assert_names(e, "lr")
    with pytest.raises(ValueError) as e:
        nrrdd_ext.MaskedAdam([nn.Parameter(torch.randn(2, 3, 4, 4))], cam_eps=math.nan)
    assert_names(e, "cam_eps")
    a, b = nn.Parameter(torch.randn(2, 3, 4, 4)), nn.Parameter(torch.randn(2, 3, 4, 4))
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = nrrdd_ext.MaskedAdam([a, b], lr=0.1)
    with pytest.raises(ValueError) as e:  # two image tensors, one features tensor
        opt.step(features=torch.randn(2, 4, 3, 3), fc_weight=torch.randn(5, 4), labels=torch.tensor([0, 1]))
    assert_names(e, "features")
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)
    opt = nrrdd_ext.MaskedAdam([a], lr=0.1, clamp_min=[0.0, 0.0])
    with pytest.raises(ValueError) as e:
        opt.step(features=torch.randn(2, 4, 3, 3), fc_weight=torch.randn(5, 4), labels=torch.tensor([0, 1]))
    assert_names(e, "clamp_min")
    assert torch.equal(a.detach(), a0)


# -------------------------------------------------------------- cam and mask
CAM_CASES = [c for c in STEP_CASES if c[3] in ("features", "fc_weight", "labels") and c[0] != "features-batch"]


@pytest.mark.parametrize("case", CAM_CASES, ids=[c[0] for c in CAM_CASES])
def test_cam_and_mask(case):
    _, edit, exc, name = case
    p = step_problem()
    edit(p, {})
    if case[0] == "features-device":  # all three on meta is consistent for the CAM; mix instead
        p["fc_weight"] = torch.randn(p["fc_weight"].shape)
        name = "fc_weight"
    with pytest.raises(exc) as e:
        nrrdd_ext.class_activation_map(p["features"], p["fc_weight"], p["labels"])
    assert_names(e, name)
    with pytest.raises(exc) as e:
        nrrdd_ext.non_critical_mask(p["features"], p["fc_weight"], p["labels"], (8, 8))
    assert_names(e, name)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(size=(0, 8)), ValueError, "size"),
    (dict(size=(8,)), ValueError, "size"),
    (dict(size=(8, 8, 8)), ValueError, "size"),
    (dict(size=8), TypeError, "size"),
    (dict(size=None), TypeError, "size"),
    (dict(size=(8, 8), eps=-0.1), ValueError, "eps"),
    (dict(size=(8, 8), eps=math.nan), ValueError, "eps"),
    (dict(size=(8, 8), eps=math.inf), ValueError, "eps"),
], ids=["size-zero", "size-short", "size-long", "size-int", "size-none", "eps-neg", "eps-nan", "eps-inf"])
def test_mask_size_and_eps(kw, exc, name):
    p = step_problem()
    with pytest.raises(exc) as e:
        nrrdd_ext.non_critical_mask(p["features"], p["fc_weight"], p["labels"], **kw)
    assert_names(e, name)


@pytest.mark.parametrize("bad", [5, -1])
def test_cam_labels_out_of_range(bad):
    p = step_problem()
    p["labels"][0] = bad
    with pytest.raises(RuntimeError, match="labels"):
        nrrdd_ext.class_activation_map(p["features"], p["fc_weight"], p["labels"])
    with pytest.raises(RuntimeError, match="labels"):
        nrrdd_ext.non_critical_mask(p["features"], p["fc_weight"], p["labels"], (8, 8))


# ------------------------------------------------------------ bn_stat_loss
BN_CASES = [
    ("x-1d", dict(x=torch.randn(5)), ValueError, "x"),
    ("x-6d", dict(x=torch.randn(2, 3, 1, 1, 1, 2)), ValueError, "x"),
    ("x-int", dict(x=torch.randint(0, 5, (2, 3, 4, 4))), TypeError, "x"),
    ("x-not-tensor", dict(x=[[1.0, 2.0, 3.0]]), TypeError, "x"),
    ("running_mean-channels", dict(running_mean=torch.zeros(4)), ValueError, "running_mean"),
    ("running_var-channels", dict(running_var=torch.ones(2)), ValueError, "running_var"),
    ("running_mean-2d", dict(running_mean=torch.zeros(1, 3)), ValueError, "running_mean"),
    ("running_var-int", dict(running_var=torch.ones(3, dtype=torch.long)), TypeError, "running_var"),
    ("running_mean-not-tensor", dict(running_mean=[0.0, 0.0, 0.0]), TypeError, "running_mean"),
    ("running_mean-device", dict(running_mean=torch.zeros(3, device=META)), ValueError, "running_mean"),
    ("running_var-device", dict(running_var=torch.ones(3, device=META)), ValueError, "running_var"),
]


@pytest.mark.parametrize("case", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_bn_stat_loss(case):
    _, kw, exc, name = case
    args = dict(x=torch.randn(2, 3, 4, 4), running_mean=torch.zeros(3), running_var=torch.ones(3))
    args.update(kw)
    with pytest.raises(exc) as e:
        nrrdd_ext.bn_stat_loss(args["x"], args["running_mean"], args["running_var"])
    assert_names(e, name)


def test_bn_stat_hooks_bad_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError) as e:
            nrrdd_ext.BNStatHooks(model, first_multiplier=bad)
        assert_names(e, "first_multiplier")
    with pytest.raises(ValueError, match="BatchNorm"):
        nrrdd_ext.BNStatHooks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running"):
        with nrrdd_ext.BNStatHooks(untracked):
            pass


# -------------------------------------------------------------------- DBR
def dbr_args(B=4, V=6):
    return dict(logits=torch.randn(B, V), y_org=torch.randint(0, V, (B,)), y_aug=torch.randint(0, V, (B,)),
                d_org_t=torch.rand(B), d_aug_t=torch.rand(B))


LOGIT_CASES = [
    ("logits-1d", dict(logits=torch.randn(4)), ValueError, "logits"),
    ("logits-3d", dict(logits=torch.randn(4, 6, 1)), ValueError, "logits"),
    ("logits-int", dict(logits=torch.randint(0, 3, (4, 6))), TypeError, "logits"),
    ("logits-no-class", dict(logits=torch.randn(4, 0)), ValueError, "logits"),
    ("y_org-float", dict(y_org=torch.zeros(4)), TypeError, "y_org"),
    ("y_aug-int32", dict(y_aug=torch.zeros(4, dtype=torch.int32)), TypeError, "y_aug"),
    ("y_org-length", dict(y_org=torch.zeros(3, dtype=torch.long)), ValueError, "y_org"),
    ("y_aug-2d", dict(y_aug=torch.zeros(4, 1, dtype=torch.long)), ValueError, "y_aug"),
    ("y_org-device", dict(y_org=torch.zeros(4, dtype=torch.long, device=META)), ValueError, "y_org"),
    ("y_aug-device", dict(y_aug=torch.zeros(4, dtype=torch.long, device=META)), ValueError, "y_aug"),
    ("y_aug-not-tensor", dict(y_aug=[0, 1, 2, 3]), TypeError, "y_aug"),
]
TARGET_CASES = [
    ("d_org_t-length", dict(d_org_t=torch.rand(3)), ValueError, "d_org_t"),
    ("d_aug_t-2d", dict(d_aug_t=torch.rand(4, 1)), ValueError, "d_aug_t"),
    ("d_org_t-int", dict(d_org_t=torch.ones(4, dtype=torch.long)), TypeError, "d_org_t"),
    ("d_aug_t-device", dict(d_aug_t=torch.rand(4, device=META)), ValueError, "d_aug_t"),
    ("r-negative", dict(r=-0.1), ValueError, "r"),
    ("r-nan", dict(r=math.nan), ValueError, "r"),
    ("alpha-inf", dict(alpha=math.inf), ValueError, "alpha"),
    ("alpha-negative", dict(alpha=-1.0), ValueError, "alpha"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
]


@pytest.mark.parametrize("case", LOGIT_CASES + TARGET_CASES, ids=[c[0] for c in LOGIT_CASES + TARGET_CASES])
def test_dbr_loss(case):
    _, kw, exc, name = case
    a = dbr_args()
    a.update(kw)
    with pytest.raises(exc) as e:
        nrrdd_ext.dbr_loss(**a)
    assert_names(e, name)
    if not any(k in kw for k in ("d_org_t", "d_aug_t", "alpha")):
        la = {k: v for k, v in a.items() if k not in ("d_org_t", "d_aug_t")}
        with pytest.raises(exc) as e:
            nrrdd_ext.label_refine_loss(**la)
        assert_names(e, name)
    if not any(k in kw for k in ("d_org_t", "d_aug_t", "alpha", "r", "reduction")):
        with pytest.raises(exc) as e:
            nrrdd_ext.dbr_distances(a["logits"], a["y_org"], a["y_aug"])
        assert_names(e, name)


@pytest.mark.parametrize("kw,name", [(dict(r=-1.0), "r"), (dict(alpha=math.nan), "alpha"),
                                     (dict(reduction="max"), "reduction")], ids=["r", "alpha", "reduction"])
def test_dbr_module_bad_input(kw, name):
    with pytest.raises(ValueError) as e:
        nrrdd_ext.DBRLoss(**kw)
    assert_names(e, name)


@pytest.mark.parametrize("which", ["y_org", "y_aug"])
@pytest.mark.parametrize("bad", [6, -1, 10**12])
def test_dbr_labels_out_of_range(which, bad):
    a = dbr_args()
    a[which][2] = bad
    with pytest.raises(RuntimeError, match=which):
        nrrdd_ext.dbr_distances(a["logits"], a["y_org"], a["y_aug"])
    with pytest.raises(RuntimeError, match=which):
        nrrdd_ext.dbr_loss(**a)
    with pytest.raises(RuntimeError, match=which):
        nrrdd_ext.label_refine_loss(a["logits"], a["y_org"], a["y_aug"])
