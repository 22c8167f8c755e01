"""masked_refine_step / masked_sgd_step / MaskedAdam (Eq. 5) against the float64 reference."""
import pytest
import torch

import nrrdd_ext
from nrrdd_ext import reference as R

F64 = torch.float64
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Half the relative spacing of each dtype's values: a result rounded once.
HALF_ULP = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# The CAM (in [0, 1]) is computed in the features' dtype; the mask inherits its rounding.
CAM_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_problem(B, C, H, W, K=6, h=7, w=7, classes=10, head="pooled", dtype=torch.float32,
                 device="cpu", layout="contiguous"):
    """Images, teacher head, labels and a non-trivial Adam state (t0 > 0)."""
    x = torch.randn(B, C, H, W, device=device).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "slice":  # a strided view into a bigger buffer
        big = torch.randn(B, C + 1, H + 2, W + 3, device=device).to(dtype)
        big_before = big.clone()
        x = big[:, 1:, 1:-1, 2:-1]
        x.copy_(torch.randn(B, C, H, W, device=device).to(dtype))
        big_before[:, 1:, 1:-1, 2:-1] = x
        assert not x.is_contiguous()
    features = torch.randn(B, K, h, w, device=device).to(dtype)
    fc_weight = (torch.randn(classes, K, device=device) if head == "pooled"
                 else torch.randn(classes, K, h, w, device=device)).to(dtype)
    labels = torch.randint(0, classes, (B,), device=device)
    exp_avg = (0.1 * torch.randn(B, C, H, W, device=device)).to(dtype)
    exp_avg_sq = (0.1 * torch.rand(B, C, H, W, device=device) + 0.01).to(dtype)
    if layout == "channels_last":
        exp_avg = exp_avg.to(memory_format=torch.channels_last)
    step = torch.full((1,), float(torch.randint(0, 5, ())), device=device)
    p = dict(x=x, features=features, fc_weight=fc_weight, labels=labels, exp_avg=exp_avg,
             exp_avg_sq=exp_avg_sq, step=step)
    if layout == "slice":
        p["big"], p["big_before"] = big, big_before
    return p


def clamp_bounds(kind, C, device):
    lo = -1.0 - torch.rand(C, device=device)
    hi = 1.0 + torch.rand(C, device=device)
    return {"none": (None, None), "both": (lo, hi), "min": (lo, None), "max": (None, hi)}[kind]


def ref_state(p):
    # step too: the reference's bias corrections b ** t are computed in step's dtype
    return {k: v.detach().to(F64).clone() for k, v in p.items() if k in ("x", "exp_avg", "exp_avg_sq", "step")}


@pytest.mark.parametrize("head", ["pooled", "flatten"])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("clamp", ["none", "both", "min"])
@pytest.mark.parametrize("use_lr_scale", [False, True], ids=["lr", "lr_scale"])
def test_adam_steps_fp32_fp64_trajectory(device, head, C, clamp, use_lr_scale):
    """Several successive steps carrying the state, float32 and float64, against the float64 reference."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        p = make_problem(3, C, 20, 24, head=head, dtype=dtype, device=device)
        cmin, cmax = clamp_bounds(clamp, C, device)
        r = ref_state(p)
        f64, w64 = p["features"].to(F64), p["fc_weight"].to(F64)
        lr = 0.1
        for it in range(4):
            g = torch.randn_like(p["x"])
            kw = dict(lr=lr, betas=(0.6, 0.95), eps=1e-8, cam_eps=0.55, clamp_min=cmin, clamp_max=cmax)
            scale = None
            if use_lr_scale:
                scale = torch.rand(1, device=device) + 0.5
                kw_ref = dict(kw, lr=lr * scale.item())
            else:
                kw_ref = kw
            nrrdd_ext.masked_refine_step(p["x"], g, p["features"], p["fc_weight"], p["labels"],
                                         p["exp_avg"], p["exp_avg_sq"], p["step"], lr_scale=scale, **kw)
            R.masked_refine_step(r["x"], g.to(F64), f64, w64, p["labels"], r["exp_avg"], r["exp_avg_sq"],
                                 r["step"], **kw_ref)
            for k in ("x", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(p[k].to(F64), r[k], atol=tol, rtol=tol, msg=f"{dtype} {k} after step {it}")
            torch.testing.assert_close(p["step"].to(F64), r["step"], atol=0, rtol=0)
        if cmin is not None:
            assert (p["x"] >= cmin.view(1, -1, 1, 1).to(dtype)).all()
        if cmax is not None:
            assert (p["x"] <= cmax.view(1, -1, 1, 1).to(dtype)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head", ["pooled", "flatten"])
@pytest.mark.parametrize("clamp", ["none", "both"])
def test_adam_steps_low_precision(device, dtype, head, clamp):
    """fp16/bf16 state: each of several steps matches the float64 reference step applied to the
    op's own state before it (so the check is one rounding tight, not a drifting trajectory)."""
    p = make_problem(2, 3, 16, 20, head=head, dtype=dtype, device=device)
    cmin, cmax = clamp_bounds(clamp, 3, device)
    f64, w64 = p["features"].to(F64), p["fc_weight"].to(F64)
    lr = 0.5  # updates well above one rounding of x
    for it in range(3):
        g = torch.randn_like(p["x"])
        r = ref_state(p)
        kw = dict(lr=lr, betas=(0.5, 0.9), eps=1e-8, cam_eps=0.5, clamp_min=cmin, clamp_max=cmax)
        nrrdd_ext.masked_refine_step(p["x"], g, p["features"], p["fc_weight"], p["labels"],
                                     p["exp_avg"], p["exp_avg_sq"], p["step"], **kw)
        R.masked_refine_step(r["x"], g.to(F64), f64, w64, p["labels"], r["exp_avg"], r["exp_avg_sq"],
                             r["step"], **kw)
        torch.testing.assert_close(p["x"].to(F64), r["x"], rtol=HALF_ULP[dtype] * 1.5,
                                   atol=lr * CAM_TOL[dtype] + 1e-5, msg=f"x after step {it}")
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(p[k].to(F64), r[k], rtol=HALF_ULP[dtype] * 1.5, atol=1e-5,
                                       msg=f"{k} after step {it}")
        torch.testing.assert_close(p["step"].to(F64), r["step"], atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["channels_last", "slice"])
def test_adam_noncontiguous_in_place(device, layout):
    p = make_problem(2, 3, 12, 10, dtype=torch.float32, device=device, layout=layout)
    x_id = p["x"].data_ptr()
    r = ref_state(p)
    for it in range(3):
        g = torch.randn(2, 3, 12, 10, device=device)
        if layout == "channels_last":
            g = g.to(memory_format=torch.channels_last)
        nrrdd_ext.masked_refine_step(p["x"], g, p["features"], p["fc_weight"], p["labels"], p["exp_avg"],
                                     p["exp_avg_sq"], p["step"], lr=0.1)
        R.masked_refine_step(r["x"], g.to(F64), p["features"].to(F64), p["fc_weight"].to(F64), p["labels"],
                             r["exp_avg"], r["exp_avg_sq"], r["step"], lr=0.1)
        for k in ("x", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(p[k].to(F64), r[k], atol=2e-5, rtol=2e-5)
    assert p["x"].data_ptr() == x_id
    if layout == "channels_last":
        assert p["x"].is_contiguous(memory_format=torch.channels_last)
    else:  # the view was updated through; the rest of the buffer untouched
        torch.testing.assert_close(p["big"][:, 1:, 1:-1, 2:-1].to(F64), r["x"], atol=2e-5, rtol=2e-5)
        outside = torch.ones_like(p["big"], dtype=torch.bool)
        outside[:, 1:, 1:-1, 2:-1] = False
        assert torch.equal(p["big"][outside], p["big_before"][outside])


def test_critical_pixels_frozen_moments_move(device):
    """Where the mask is 0 (CAM above cam_eps) x is bit-identical, yet the moments still change."""
    p = make_problem(3, 3, 28, 28, dtype=torch.float32, device=device)
    cam_eps = 0.5
    cam_up = torch.nn.functional.interpolate(
        R.class_activation_map(p["features"].double(), p["fc_weight"].double(), p["labels"]).unsqueeze(1),
        size=(28, 28), mode="bilinear", align_corners=False)
    frozen = (cam_up > cam_eps + 1e-3).expand(-1, 3, -1, -1)
    moving = (cam_up < cam_eps - 1e-3).expand(-1, 3, -1, -1)
    assert frozen.any() and moving.any()
    x0, m0, v0 = p["x"].clone(), p["exp_avg"].clone(), p["exp_avg_sq"].clone()
    # each pixel's gradient keeps one random sign over the steps, so Adam's update there
    # is of order lr * mask, far above float32 rounding of x (with freely signed
    # gradients m can cancel to a change below half an ulp of x, and x rightly stays put)
    sign = torch.randn_like(p["x"]).sign()
    for _ in range(3):
        nrrdd_ext.masked_refine_step(p["x"], sign * (torch.rand_like(p["x"]) + 0.1), p["features"], p["fc_weight"],
                                     p["labels"], p["exp_avg"], p["exp_avg_sq"], p["step"], lr=0.1,
                                     cam_eps=cam_eps)
    assert torch.equal(p["x"][frozen], x0[frozen])
    assert (p["x"][moving] != x0[moving]).all()
    assert (p["exp_avg"][frozen] != m0[frozen]).all()
    assert (p["exp_avg_sq"][frozen] != v0[frozen]).all()


@pytest.mark.parametrize("B", [0, 1])
def test_adam_small_batches(device, B):
    p = make_problem(B, 3, 9, 9, dtype=torch.float32, device=device)
    r = ref_state(p)
    g = torch.randn_like(p["x"])
    nrrdd_ext.masked_refine_step(p["x"], g, p["features"], p["fc_weight"], p["labels"], p["exp_avg"],
                                 p["exp_avg_sq"], p["step"], lr=0.2)
    R.masked_refine_step(r["x"], g.double(), p["features"].double(), p["fc_weight"].double(), p["labels"],
                         r["exp_avg"], r["exp_avg_sq"], r["step"], lr=0.2)
    for k in ("x", "exp_avg", "exp_avg_sq"):
        assert p[k].shape == (B, 3, 9, 9)
        torch.testing.assert_close(p[k].double(), r[k], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(p["step"].to(F64), r["step"], atol=0, rtol=0)


def test_clamp_bounds_as_lists(device):
    p = make_problem(2, 3, 10, 10, dtype=torch.float32, device=device)
    r = ref_state(p)
    lo, hi = [-0.3, -0.2, -0.4], [0.25, 0.5, 0.1]
    g = torch.randn_like(p["x"])
    nrrdd_ext.masked_refine_step(p["x"], g, p["features"], p["fc_weight"], p["labels"], p["exp_avg"],
                                 p["exp_avg_sq"], p["step"], lr=0.05, clamp_min=lo, clamp_max=hi)
    R.masked_refine_step(r["x"], g.double(), p["features"].double(), p["fc_weight"].double(), p["labels"],
                         r["exp_avg"], r["exp_avg_sq"], r["step"], lr=0.05,
                         clamp_min=torch.tensor(lo, device=device), clamp_max=torch.tensor(hi, device=device))
    torch.testing.assert_close(p["x"].double(), r["x"], atol=2e-6, rtol=2e-6)
    assert (p["x"] <= torch.tensor(hi, device=device).view(1, 3, 1, 1)).all()


# ----------------------------------------------------------------------- SGD
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head", ["pooled", "flatten"])
@pytest.mark.parametrize("clamp", ["none", "both"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sgd_step(device, dtype, head, clamp, layout):
    p = make_problem(3, 3, 17, 23, h=5, w=4, head=head, dtype=dtype, device=device, layout=layout)
    cmin, cmax = clamp_bounds(clamp, 3, device)
    x64 = p["x"].to(F64)
    g = torch.randn_like(p["x"])
    nrrdd_ext.masked_sgd_step(p["x"], g, p["features"], p["fc_weight"], p["labels"], lr=0.7, cam_eps=0.6,
                              clamp_min=cmin, clamp_max=cmax)
    mask = R.non_critical_mask(p["features"].to(F64), p["fc_weight"].to(F64), p["labels"], (17, 23), 0.6)
    R.masked_sgd_step(x64, g.to(F64), mask, lr=0.7, clamp_min=cmin, clamp_max=cmax)
    tol = dict(rtol=HALF_ULP[dtype] * 1.5, atol=0.7 * CAM_TOL[dtype] * 3 + 1e-6)
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p["x"].to(F64), x64, **tol)
    assert (mask == 0).any()


# ---------------------------------------------------------------- MaskedAdam
def test_masked_adam_optimizer(device):
    p = make_problem(2, 3, 14, 14, dtype=torch.float32, device=device)
    x = torch.nn.Parameter(p["x"].clone())
    opt = nrrdd_ext.MaskedAdam([x], lr=0.08, betas=(0.5, 0.9), cam_eps=0.45,
                               clamp_min=[-1.5, -1.0, -2.0], clamp_max=[1.5, 2.0, 1.0])
    rx = p["x"].to(F64)
    m = torch.zeros_like(rx)
    v = torch.zeros_like(rx)
    step = torch.zeros(1, dtype=F64, device=device)
    for it in range(4):
        x.grad = torch.randn_like(x)
        out = opt.step(features=p["features"], fc_weight=p["fc_weight"], labels=p["labels"])
        assert out is None
        R.masked_refine_step(rx, x.grad.to(F64), p["features"].to(F64), p["fc_weight"].to(F64), p["labels"],
                             m, v, step, lr=0.08, betas=(0.5, 0.9), cam_eps=0.45,
                             clamp_min=torch.tensor([-1.5, -1.0, -2.0]), clamp_max=torch.tensor([1.5, 2.0, 1.0]))
        torch.testing.assert_close(x.detach().to(F64), rx, atol=2e-5, rtol=2e-5, msg=f"step {it}")
        st = opt.state[x]
        torch.testing.assert_close(st["exp_avg"].to(F64), m, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(st["exp_avg_sq"].to(F64), v, atol=2e-6, rtol=2e-6)
        assert float(st["step"]) == it + 1


def test_masked_adam_two_params_and_closure(device):
    a = make_problem(2, 3, 8, 8, dtype=torch.float32, device=device)
    b = make_problem(3, 3, 8, 8, dtype=torch.float32, device=device)
    xa, xb = torch.nn.Parameter(a["x"].clone()), torch.nn.Parameter(b["x"].clone())
    opt = nrrdd_ext.MaskedAdam([xa, xb], lr=0.1)
    target = torch.randn(3, 3, 8, 8, device=device)

    def closure():
        opt.zero_grad()
        loss = (xa ** 2).sum() + ((xb - target) ** 2).sum()
        loss.backward()
        return loss

    loss = closure()
    ga, gb = xa.grad.clone(), xb.grad.clone()
    out = opt.step(closure, features=[a["features"], b["features"]], fc_weight=a["fc_weight"],
                   labels=[a["labels"], b["labels"]])
    torch.testing.assert_close(out, loss)
    for pr, xp, g in ((a, xa, ga), (b, xb, gb)):
        rx = pr["x"].to(F64)
        z = torch.zeros_like(rx)
        R.masked_refine_step(rx, g.to(F64), pr["features"].to(F64), a["fc_weight"].to(F64), pr["labels"],
                             z, z.clone(), torch.zeros(1, dtype=F64, device=device), lr=0.1)
        torch.testing.assert_close(xp.detach().to(F64), rx, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------- opcheck
def _step_args(with_options):
    p = make_problem(2, 3, 9, 11, h=4, w=3)
    cam = torch.rand(2, 4, 3)
    g = torch.randn_like(p["x"])
    lr_scale = torch.rand(1) + 0.5 if with_options else None
    cmin, cmax = clamp_bounds("both" if with_options else "none", 3, "cpu")
    return p, g, cam, lr_scale, cmin, cmax


@pytest.mark.parametrize("with_options", [False, True])
def test_opcheck_masked_adam_step_(with_options):
    p, g, cam, lr_scale, cmin, cmax = _step_args(with_options)
    torch.library.opcheck(torch.ops.nrrdd.masked_adam_step_.default,
                          (p["x"], g, cam, p["exp_avg"], p["exp_avg_sq"], p["step"], lr_scale,
                           0.1, 0.5, 0.9, 1e-8, 0.5, cmin, cmax))


@pytest.mark.parametrize("with_options", [False, True])
def test_opcheck_masked_sgd_step_(with_options):
    p, g, cam, _, cmin, cmax = _step_args(with_options)
    torch.library.opcheck(torch.ops.nrrdd.masked_sgd_step_.default, (p["x"], g, cam, 0.3, 0.5, cmin, cmax))
