"""CUDA kernels: against the float64 reference and against the CPU kernels, gradcheck in
float64 on CUDA, channels_last and fp16/bf16, a CUDA-graph capture of masked_refine_step,
non-default streams, realistic sizes. Every test is marked ``cuda`` and is skipped cleanly
(conftest) where no GPU is visible or the CUDA kernels were not built."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as Fn

import nrrdd_ext
from nrrdd_ext import reference as R

pytestmark = pytest.mark.cuda

F64 = torch.float64
CUDA = "cuda"
LOW = [torch.float16, torch.bfloat16]
HALF_ULP = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CAM_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def cam_inputs(B, K, h, w, classes, head, dtype=torch.float32, device=CUDA):
    f = torch.randn(B, K, h, w, device=device).to(dtype)
    wt = (torch.randn(classes, K, device=device) if head == "pooled"
          else torch.randn(classes, K, h, w, device=device)).to(dtype)
    return f, wt, torch.randint(0, classes, (B,), device=device)


def cpu(*ts):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]


def f64(*ts):
    return [t.to(F64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]


def step_state(B, C, H, W, dtype=torch.float32, device=CUDA, channels_last=False):
    x = torch.randn(B, C, H, W, device=device).to(dtype)
    m = (0.1 * torch.randn(B, C, H, W, device=device)).to(dtype)
    v = (0.1 * torch.rand(B, C, H, W, device=device) + 0.01).to(dtype)
    if channels_last:
        x, m = (t.to(memory_format=torch.channels_last) for t in (x, m))
    return x, m, v, torch.full((1,), 3.0, device=device)


# ------------------------------------------------------------------- CAM/mask
@pytest.mark.parametrize("head", ["pooled", "flatten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("hw,size", [((7, 7), (224, 224)), ((3, 5), (17, 30)), ((1, 1), (8, 8))], ids=str)
def test_cam_and_mask_vs_reference_and_cpu(head, dtype, hw, size):
    f, w, y = cam_inputs(4, 32, *hw, 100, head, dtype)
    cam = nrrdd_ext.class_activation_map(f, w, y)
    mask = nrrdd_ext.non_critical_mask(f, w, y, size, eps=0.45)
    assert cam.device == f.device and mask.device == f.device and cam.dtype == dtype
    ref_cam = R.class_activation_map(*f64(f, w), y)
    ref_mask = R.non_critical_mask(*f64(f, w), y, size, 0.45)
    torch.testing.assert_close(cam.to(F64), ref_cam, atol=CAM_TOL[dtype], rtol=0)
    torch.testing.assert_close(mask.to(F64), ref_mask, atol=2 * CAM_TOL[dtype], rtol=0)
    torch.testing.assert_close(cam.cpu(), nrrdd_ext.class_activation_map(*cpu(f, w, y)),
                               atol=CAM_TOL[dtype], rtol=0)
    torch.testing.assert_close(mask.cpu(), nrrdd_ext.non_critical_mask(*cpu(f, w, y), size, eps=0.45),
                               atol=2 * CAM_TOL[dtype], rtol=0)


@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_cam_mask_grads_vs_cpu(head):
    f, w, y = cam_inputs(3, 6, 4, 5, 7, head)
    g = torch.randn(3, 1, 13, 11, device=CUDA)
    outs = []
    for dev in (CUDA, "cpu"):
        ff, ww = (t.detach().to(dev).requires_grad_(True) for t in (f, w))
        outs.append(torch.autograd.grad(nrrdd_ext.non_critical_mask(ff, ww, y.to(dev), (13, 11), 0.6),
                                        (ff, ww), g.to(dev)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_gradcheck_cam_mask_cuda(head):
    f, w, y = cam_inputs(2, 3, 3, 3, 4, head, F64)
    f.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(nrrdd_ext.class_activation_map, (f, w, y))
    assert torch.autograd.gradcheck(lambda a, b: nrrdd_ext.non_critical_mask(a, b, y, (5, 7), 0.7), (f, w))


# --------------------------------------------------------------- masked steps
@pytest.mark.parametrize("head", ["pooled", "flatten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "channels_last"])
@pytest.mark.parametrize("C", [1, 3])
def test_masked_refine_steps_vs_reference_and_cpu(head, dtype, channels_last, C):
    B, H, W = 4, 32, 28
    f, w, y = cam_inputs(B, 16, 7, 7, 10, head, dtype)
    x, m, v, step = step_state(B, C, H, W, dtype, channels_last=channels_last)
    xc, mc, vc, sc = (t.cpu().clone() for t in (x, m, v, step))
    rx, rm, rv, rs = (t.to(F64).clone() for t in (x, m, v, step))
    lo, hi = -1.5 - torch.rand(C, device=CUDA), 1.5 + torch.rand(C, device=CUDA)
    tol = 1e-10 if dtype == F64 else 2e-5
    for it in range(3):
        g = torch.randn_like(x)
        scale = torch.rand(1, device=CUDA) + 0.5
        kw = dict(lr=0.1, betas=(0.6, 0.95), eps=1e-8, cam_eps=0.5, clamp_min=lo, clamp_max=hi)
        nrrdd_ext.masked_refine_step(x, g, f, w, y, m, v, step, lr_scale=scale, **kw)
        nrrdd_ext.masked_refine_step(xc, g.cpu(), *cpu(f, w, y), mc, vc, sc, lr_scale=scale.cpu(),
                                     **dict(kw, clamp_min=lo.cpu(), clamp_max=hi.cpu()))
        R.masked_refine_step(rx, g.to(F64), *f64(f, w), y, rm, rv, rs, **dict(kw, lr=0.1 * scale.item()))
        for name, a, b, r in (("x", x, xc, rx), ("exp_avg", m, mc, rm), ("exp_avg_sq", v, vc, rv)):
            torch.testing.assert_close(a.to(F64), r, atol=tol, rtol=tol, msg=f"{name} vs reference, step {it}")
            torch.testing.assert_close(a.cpu(), b, atol=tol, rtol=tol, msg=f"{name} vs CPU, step {it}")
        assert step.item() == rs.item() == sc.item()
    if channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_masked_refine_step_low_precision(dtype):
    f, w, y = cam_inputs(3, 8, 7, 7, 10, "pooled", dtype)
    x, m, v, step = step_state(3, 3, 40, 40, dtype)
    for it in range(3):
        g = torch.randn_like(x)
        rx, rm, rv, rs = (t.to(F64).clone() for t in (x, m, v, step))
        xc, mc, vc, sc = (t.cpu().clone() for t in (x, m, v, step))
        nrrdd_ext.masked_refine_step(x, g, f, w, y, m, v, step, lr=0.5)
        nrrdd_ext.masked_refine_step(xc, g.cpu(), *cpu(f, w, y), mc, vc, sc, lr=0.5)
        R.masked_refine_step(rx, g.to(F64), *f64(f, w), y, rm, rv, rs, lr=0.5)
        torch.testing.assert_close(x.to(F64), rx, rtol=1.5 * HALF_ULP[dtype], atol=0.5 * CAM_TOL[dtype] + 1e-5)
        torch.testing.assert_close(m.to(F64), rm, rtol=1.5 * HALF_ULP[dtype], atol=1e-5)
        torch.testing.assert_close(v.to(F64), rv, rtol=1.5 * HALF_ULP[dtype], atol=1e-5)
        # CPU and CUDA share the arithmetic: at most one rounding apart
        torch.testing.assert_close(x.cpu().to(F64), xc.to(F64), rtol=2.5 * HALF_ULP[dtype],
                                   atol=0.5 * CAM_TOL[dtype] + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "channels_last"])
def test_masked_sgd_step_vs_reference_and_cpu(dtype, channels_last):
    f, w, y = cam_inputs(3, 8, 5, 6, 10, "flatten", dtype)
    x = torch.randn(3, 3, 30, 36, device=CUDA).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    xc, rx = x.cpu().clone(), x.to(F64).clone()
    lo, hi = -torch.rand(3, device=CUDA) - 1, torch.rand(3, device=CUDA) + 1
    nrrdd_ext.masked_sgd_step(x, g, f, w, y, lr=0.7, cam_eps=0.6, clamp_min=lo, clamp_max=hi)
    nrrdd_ext.masked_sgd_step(xc, g.cpu(), *cpu(f, w, y), lr=0.7, cam_eps=0.6, clamp_min=lo.cpu(), clamp_max=hi.cpu())
    R.masked_sgd_step(rx, g.to(F64), R.non_critical_mask(*f64(f, w), y, (30, 36), 0.6), lr=0.7,
                      clamp_min=lo, clamp_max=hi)
    tol = dict(rtol=1.5 * HALF_ULP[dtype], atol=2.1 * CAM_TOL[dtype] + 1e-6)
    torch.testing.assert_close(x.to(F64), rx, **tol)
    torch.testing.assert_close(x.cpu().to(F64), xc.to(F64), rtol=2 * tol["rtol"], atol=tol["atol"])


def test_masked_refine_step_noncontiguous_slice():
    f, w, y = cam_inputs(2, 4, 7, 7, 5, "pooled")
    big = torch.randn(2, 4, 20, 25, device=CUDA)
    before = big.clone()
    x = big[:, 1:, 2:-2, 1:-3]
    _, m, v, step = step_state(2, 3, 16, 21)
    rx, rm, rv, rs = (t.to(F64).clone() for t in (x, m, v, step))
    g = torch.randn(2, 3, 16, 21, device=CUDA)
    nrrdd_ext.masked_refine_step(x, g, f, w, y, m, v, step, lr=0.1)
    R.masked_refine_step(rx, g.double(), *f64(f, w), y, rm, rv, rs, lr=0.1)
    torch.testing.assert_close(big[:, 1:, 2:-2, 1:-3].double(), rx, atol=2e-5, rtol=2e-5)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[:, 1:, 2:-2, 1:-3] = False
    assert torch.equal(big[outside], before[outside])


def test_masked_adam_optimizer_cuda():
    f, w, y = cam_inputs(2, 4, 7, 7, 5, "pooled")
    x0 = torch.randn(2, 3, 28, 28, device=CUDA)
    p = torch.nn.Parameter(x0.clone())
    opt = nrrdd_ext.MaskedAdam([p], lr=0.05)
    rx, z = x0.double(), torch.zeros_like(x0, dtype=F64)
    rm, rv, rs = z.clone(), z.clone(), torch.zeros(1, dtype=F64, device=CUDA)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step(features=f, fc_weight=w, labels=y)
        R.masked_refine_step(rx, p.grad.double(), *f64(f, w), y, rm, rv, rs, lr=0.05)
    torch.testing.assert_close(p.detach().double(), rx, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------- CUDA graphs
def test_cuda_graph_capture_masked_refine_step():
    """Capture one step with static tensors; replay 3 times with new gradients and lr_scale
    written into the static inputs; equals 3 eager reference steps."""
    B, C, H, W = 4, 3, 64, 64
    f, w, y = cam_inputs(B, 16, 7, 7, 10, "pooled")
    x, m, v, step = step_state(B, C, H, W)
    static_grad = torch.randn_like(x)
    lr_scale = torch.ones(1, device=CUDA)
    lo, hi = torch.full((C,), -2.0, device=CUDA), torch.full((C,), 2.0, device=CUDA)
    kw = dict(lr=0.1, betas=(0.5, 0.9), eps=1e-8, cam_eps=0.5, clamp_min=lo, clamp_max=hi)

    # warm up on scratch copies (on a side stream, as the CUDA-graph docs do)
    sx, sm, sv, ss = (t.clone() for t in (x, m, v, step))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            nrrdd_ext.masked_refine_step(sx, static_grad, f, w, y, sm, sv, ss, lr_scale=lr_scale, **kw)
    torch.cuda.current_stream().wait_stream(side)

    rx, rm, rv, rs = (t.to(F64).clone() for t in (x, m, v, step))
    x_before = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nrrdd_ext.masked_refine_step(x, static_grad, f, w, y, m, v, step, lr_scale=lr_scale, **kw)
    torch.cuda.synchronize()
    assert torch.equal(x, x_before), "capture must not run the step"

    for it, s in enumerate([1.0, 0.5, 2.0]):
        g = torch.randn_like(x)
        static_grad.copy_(g)
        lr_scale.fill_(s)
        graph.replay()
        R.masked_refine_step(rx, g.double(), *f64(f, w), y, rm, rv, rs, **dict(kw, lr=0.1 * s))
        torch.cuda.synchronize()
        torch.testing.assert_close(x.double(), rx, atol=2e-5, rtol=2e-5, msg=f"x after replay {it}")
        torch.testing.assert_close(m.double(), rm, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(v.double(), rv, atol=2e-6, rtol=2e-6)
        assert step.item() == rs.item() == 4.0 + it


# ---------------------------------------------------------------- streams
def test_non_default_stream_same_result():
    B, C, H, W = 8, 3, 96, 96
    f, w, y = cam_inputs(B, 16, 7, 7, 10, "flatten")
    x, m, v, step = step_state(B, C, H, W)
    g = torch.randn_like(x)
    bn_x = torch.randn(16, 32, 28, 28, device=CUDA)
    rmean, rvar = torch.randn(32, device=CUDA), torch.rand(32, device=CUDA) + 0.5
    logits = 4 * torch.randn(256, 1000, device=CUDA)
    yo, ya = torch.randint(0, 1000, (256,), device=CUDA), torch.randint(0, 1000, (256,), device=CUDA)
    to, ta = torch.rand(256, device=CUDA) + 3, torch.rand(256, device=CUDA) + 3

    def run(x, m, v, step, produce):
        xin = x.clone()
        if produce:  # a producer on the same stream just before: the op must be ordered after it
            xin.copy_(x.clone().mul_(2).sub_(x).add_(0))
        nrrdd_ext.masked_refine_step(xin, g, f, w, y, m, v, step, lr=0.1)
        return (xin, m, v, step, nrrdd_ext.bn_stat_loss(bn_x, rmean, rvar),
                nrrdd_ext.dbr_loss(logits, yo, ya, to, ta, reduction="none"))

    default = run(*(t.clone() for t in (x, m, v, step)), produce=False)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    inputs = [t.clone() for t in (x, m, v, step)]
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(5_000_000)  # keeps the side stream busy: a launch on the wrong stream would race
        other = run(*inputs, produce=True)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(default, other)):
        if i < 4:  # the elementwise step is deterministic: bit-identical
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        else:  # reductions may merge partial sums in another order
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- bn stats
BN_SHAPES = [((64, 32), None), ((8, 16, 50), None), ((8, 24, 14, 14), None),
             ((8, 24, 14, 14), torch.channels_last), ((2, 8, 4, 6, 6), torch.channels_last_3d),
             ((1, 5, 7, 7), None)]


@pytest.mark.parametrize("shape,fmt", BN_SHAPES, ids=[f"{'x'.join(map(str, s))}-{f}" for s, f in BN_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + LOW, ids=str)
def test_bn_stat_loss_vs_reference_and_cpu(shape, fmt, dtype):
    x = (1.5 * torch.randn(shape, device=CUDA) + 0.3).to(dtype)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    x.requires_grad_(True)
    C = shape[1]
    rm, rv = 0.5 * torch.randn(C, device=CUDA), torch.rand(C, device=CUDA) + 0.5
    loss = nrrdd_ext.bn_stat_loss(x, rm, rv)
    (gx,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_(True)
    ref = R.bn_stat_loss(x64, rm.double(), rv.double())
    (rgx,) = torch.autograd.grad(ref, x64)
    xc = x.detach().cpu().requires_grad_(True)
    lc = nrrdd_ext.bn_stat_loss(xc, rm.cpu(), rv.cpu())
    (gc,) = torch.autograd.grad(lc, xc)
    lt = 1e-10 if dtype == F64 else 2e-5
    gt = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=lt, atol=0)
    torch.testing.assert_close(loss.cpu(), lc, rtol=lt, atol=0)
    scale = rgx.abs().max().item()
    torch.testing.assert_close(gx.double(), rgx, rtol=gt, atol=gt * scale * 0.1)
    torch.testing.assert_close(gx.cpu().double(), gc.double(), rtol=2 * gt, atol=gt * scale * 0.2)


def test_bn_stat_loss_large_mean_cuda():
    x = 1e4 + torch.randn(16, 8, 32, 32, device=CUDA)
    rm, rv = 1e4 + 0.5 * torch.randn(8, device=CUDA), torch.rand(8, device=CUDA) + 0.5
    _, mean, var, _ = torch.ops.nrrdd.bn_stat_loss(x, rm, rv)
    ref_mean, ref_var = R.batch_stats(x.double())
    torch.testing.assert_close(var.double(), ref_var, atol=1e-3, rtol=0)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-3, rtol=0)
    naive = (x * x).mean([0, 2, 3]) - x.mean([0, 2, 3]) ** 2
    assert (naive.double() - ref_var).abs().max() > 50 * (var.double() - ref_var).abs().max()


def test_bn_gradcheck_cuda():
    x = torch.randn(3, 4, 2, 3, device=CUDA, dtype=F64, requires_grad=True)
    rm = (0.5 * torch.randn(4, device=CUDA, dtype=F64)).requires_grad_(True)
    rv = (torch.rand(4, device=CUDA, dtype=F64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(nrrdd_ext.bn_stat_loss, (x, rm, rv))
    xl = torch.randn(3, 4, 2, 3, device=CUDA, dtype=F64).to(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(nrrdd_ext.bn_stat_loss, (xl, rm, rv))


def test_bn_stat_hooks_cuda():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8)).to(CUDA).eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(0.3 * torch.randn(8, device=CUDA))
            mod.running_var.copy_(torch.rand(8, device=CUDA) + 0.5)
    x = torch.randn(4, 3, 16, 16, device=CUDA)
    with nrrdd_ext.BNStatHooks(model, first_multiplier=3.0) as hooks:
        model(x)
        loss = hooks.loss()
    ref_hooks = [R.BNFeatureHook(mod) for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    model(x)
    ref = 3.0 * ref_hooks[0].loss + ref_hooks[1].loss
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- DBR
def dbr_case(B, V, dtype, scale=3.0):
    logits = (scale * torch.randn(B, V, device=CUDA)).to(dtype)
    yo, ya = torch.randint(0, V, (B,), device=CUDA), torch.randint(0, V, (B,), device=CUDA)
    if B > 1:
        ya[0] = yo[0]  # y_org == y_aug on one row
    d_o, d_a = R.dbr_distances(logits.double(), yo, ya)
    to = d_o + torch.where(torch.rand_like(d_o) < 0.5, -0.3, 0.3)
    ta = d_a + torch.where(torch.rand_like(d_a) < 0.5, -0.3, 0.3)
    return logits, yo, ya, to, ta


@pytest.mark.parametrize("shape", [(1, 1), (64, 10), (100, 1000), (4096, 1000), (0, 10)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dbr_vs_reference_and_cpu(shape, dtype, reduction):
    B, V = shape
    logits, yo, ya, to, ta = dbr_case(B, V, dtype)
    # r strictly between the distance clusters is unknowable here; use one no distance is near
    r = 0.4
    d_all = torch.cat(R.dbr_distances(logits.double(), yo, ya))
    while B and (d_all - r).abs().min() < 1e-3:
        r += 0.01
    tgt = torch.float64 if dtype == F64 else torch.float32
    results = []
    for dev in (CUDA, "cpu"):
        lg = logits.detach().to(dev).requires_grad_(True)
        a, b = (t.to(dev, tgt).requires_grad_(True) for t in (to, ta))
        d = nrrdd_ext.dbr_distances(lg, yo.to(dev), ya.to(dev))
        loss = nrrdd_ext.dbr_loss(lg, yo.to(dev), ya.to(dev), a, b, r=r, alpha=0.8, reduction=reduction)
        lr_ = nrrdd_ext.label_refine_loss(lg, yo.to(dev), ya.to(dev), r=r, reduction=reduction)
        grads = torch.autograd.grad((loss.sum() + lr_.sum()), (lg, a, b)) if B else (lg, a, b)
        results.append((d, loss, lr_, grads))
    l64 = logits.detach().double().requires_grad_(True)
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (to, ta))
    rd = R.dbr_distances(l64, yo, ya)
    rloss = R.dbr_loss(l64, yo, ya, a64, b64, r=r, alpha=0.8, reduction=reduction)
    rlr = R.label_refine_loss(l64, yo, ya, r=r, reduction=reduction)
    if B == 0 and reduction == "mean":
        assert torch.isnan(results[0][1]) and torch.isnan(rloss)
        return
    rgrads = torch.autograd.grad(rloss.sum() + rlr.sum(), (l64, a64, b64)) if B else None
    vt = 1e-10 if dtype == F64 else 2e-5
    gt = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    (cd, closs, clr, cg), (pd, ploss, plr, pg) = results
    for a, b, rr in ((cd[0], pd[0], rd[0]), (cd[1], pd[1], rd[1]), (closs, ploss, rloss), (clr, plr, rlr)):
        torch.testing.assert_close(a.double(), rr, atol=vt * max(1, B) if reduction == "sum" else vt * 10, rtol=vt)
        torch.testing.assert_close(a.cpu(), b, atol=vt * max(1, B) if reduction == "sum" else vt * 10, rtol=vt)
    if B:
        for a, b, rr in zip(cg, pg, rgrads):
            torch.testing.assert_close(a.double(), rr, atol=3 * gt, rtol=gt)
            torch.testing.assert_close(a.cpu().double(), b.double(), atol=3 * gt, rtol=2 * gt)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
def test_dbr_logits_1e4_cuda(dtype):
    logits = ((torch.rand(64, 1000, device=CUDA) * 2 - 1) * 1e4).to(dtype)
    yo, ya = torch.randint(0, 1000, (64,), device=CUDA), torch.randint(0, 1000, (64,), device=CUDA)
    yo[0] = logits[0].float().argmax()
    d_o, d_a = nrrdd_ext.dbr_distances(logits, yo, ya)
    r_o, r_a = R.dbr_distances(logits.double(), yo, ya)
    assert torch.isfinite(d_o).all() and torch.isfinite(d_a).all()
    torch.testing.assert_close(d_o.double(), r_o, atol=4e-3, rtol=1e-6)
    torch.testing.assert_close(d_a.double(), r_a, atol=4e-3, rtol=1e-6)


def test_dbr_nan_propagates_cuda():
    logits = torch.randn(5, 10, device=CUDA)
    logits[3, 7] = float("nan")
    yo, ya = torch.randint(0, 10, (5,), device=CUDA), torch.randint(0, 10, (5,), device=CUDA)
    d_o, d_a = nrrdd_ext.dbr_distances(logits, yo, ya)
    assert torch.isnan(d_o[3]) and torch.isnan(d_a[3]) and torch.isfinite(d_o[[0, 1, 2, 4]]).all()
    rows = nrrdd_ext.label_refine_loss(logits, yo, ya, reduction="none")
    assert torch.isnan(rows[3]) and torch.isfinite(rows[[0, 1, 2, 4]]).all()


def test_dbr_gradcheck_cuda():
    logits, yo, ya, to, ta = dbr_case(4, 6, F64)
    d_all = torch.cat(R.dbr_distances(logits, yo, ya))
    r = 0.4
    while (d_all - r).abs().min() < 1e-2:
        r += 0.05
    logits.requires_grad_(True)
    to.requires_grad_(True)
    ta.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l: nrrdd_ext.dbr_distances(l, yo, ya), (logits,))
    assert torch.autograd.gradcheck(
        lambda l, a, b: nrrdd_ext.dbr_loss(l, yo, ya, a, b, r=r, alpha=0.7, reduction="none"), (logits, to, ta))
    assert torch.autograd.gradcheck(lambda l: nrrdd_ext.label_refine_loss(l, yo, ya, r=r), (logits,))


# --------------------------------------------------------------- opcheck
def test_opcheck_cuda():
    f, w, y = cam_inputs(2, 4, 3, 3, 5, "pooled")
    torch.library.opcheck(torch.ops.nrrdd.cam.default, (f, w, y))
    cam = torch.rand(2, 3, 3, device=CUDA)
    torch.library.opcheck(torch.ops.nrrdd.non_critical_mask.default, (cam, [9, 7], 0.5))
    x, m, v, step = step_state(2, 3, 9, 7)
    g = torch.randn_like(x)
    torch.library.opcheck(torch.ops.nrrdd.masked_adam_step_.default,
                          (x, g, cam, m, v, step, torch.ones(1, device=CUDA), 0.1, 0.5, 0.9, 1e-8, 0.5, None, None))
    torch.library.opcheck(torch.ops.nrrdd.masked_sgd_step_.default, (x, g, cam, 0.1, 0.5, None, None))
    bx = torch.randn(4, 3, 5, 5, device=CUDA, requires_grad=True)
    rm, rv = torch.randn(3, device=CUDA), torch.rand(3, device=CUDA) + 0.5
    torch.library.opcheck(torch.ops.nrrdd.bn_stat_loss.default, (bx, rm, rv))
    _, mean, _, coef = torch.ops.nrrdd.bn_stat_loss(bx.detach(), rm, rv)
    torch.library.opcheck(torch.ops.nrrdd.bn_stat_loss_backward.default,
                          (torch.tensor(0.5, device=CUDA), bx.detach(), mean, coef))
    logits = torch.randn(4, 7, device=CUDA, requires_grad=True)
    yo, ya = torch.randint(0, 7, (4,), device=CUDA), torch.randint(0, 7, (4,), device=CUDA)
    torch.library.opcheck(torch.ops.nrrdd.ce_pair.default, (logits, yo, ya))
    t = torch.rand(4, device=CUDA) + 1
    torch.library.opcheck(torch.ops.nrrdd.dbr_rows.default, (logits, yo, ya, t, t, 0.4, 1.0))
    _, _, lse = torch.ops.nrrdd.ce_pair(logits.detach(), yo, ya)
    torch.library.opcheck(torch.ops.nrrdd.two_ce_backward.default,
                          (torch.randn(4, 2, device=CUDA), logits.detach(), lse, yo, ya))


def test_mixed_devices_raise():
    x, m, v, step = step_state(2, 3, 8, 8)
    f, w, y = cam_inputs(2, 4, 3, 3, 5, "pooled", device="cpu")
    x0 = x.clone()
    with pytest.raises(ValueError, match="features"):
        nrrdd_ext.masked_refine_step(x, torch.randn_like(x), f, w, y, m, v, step, lr=0.1)
    assert torch.equal(x, x0)
    with pytest.raises(ValueError, match="running_mean"):
        nrrdd_ext.bn_stat_loss(torch.randn(2, 3, device=CUDA), torch.zeros(3), torch.ones(3, device=CUDA))
    with pytest.raises(ValueError, match="y_org"):
        nrrdd_ext.dbr_distances(torch.randn(2, 3, device=CUDA), torch.zeros(2, dtype=torch.long),
                                torch.zeros(2, dtype=torch.long, device=CUDA))


@pytest.mark.parametrize("op", ["cam", "refine", "dbr"])
def test_labels_out_of_range_cuda_errors(op):
    """On CUDA an out-of-range label must at least trigger a device-side assert (run in a
    subprocess: a device-side assert poisons the CUDA context)."""
    code = textwrap.dedent(f"""
        import torch, nrrdd_ext
        d = "cuda"
        try:
            if "{op}" == "cam":
                out = nrrdd_ext.class_activation_map(torch.randn(2, 4, 3, 3, device=d), torch.randn(5, 4, device=d),
                                                     torch.tensor([1, 5], device=d))
            elif "{op}" == "refine":
                x = torch.randn(2, 3, 8, 8, device=d)
                nrrdd_ext.masked_refine_step(x, torch.randn_like(x), torch.randn(2, 4, 3, 3, device=d),
                                             torch.randn(5, 4, device=d), torch.tensor([-1, 0], device=d),
                                             torch.zeros_like(x), torch.zeros_like(x), torch.zeros(1, device=d), lr=0.1)
            else:
                nrrdd_ext.dbr_distances(torch.randn(3, 10, device=d), torch.tensor([0, 10, 1], device=d),
                                        torch.tensor([0, 1, 2], device=d))
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("RAISED", str(e).splitlines()[0][:200])
        else:
            print("SILENT")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "SILENT" not in proc.stdout, proc.stdout + proc.stderr
    assert "RAISED" in proc.stdout or proc.returncode != 0, proc.stdout + proc.stderr


# ------------------------------------------------------------ realistic sizes
def test_large_masked_refine_step_vs_cpu_float64():
    B, C, H, W = 100, 3, 224, 224
    f, w, y = cam_inputs(B, 512, 7, 7, 1000, "pooled")
    x, m, v, step = step_state(B, C, H, W)
    g = torch.randn_like(x)
    lo, hi = torch.tensor([-2.1, -2.0, -1.8], device=CUDA), torch.tensor([2.2, 2.4, 2.6], device=CUDA)
    rx, rm, rv, rs = (t.cpu().double() for t in (x, m, v, step))
    nrrdd_ext.masked_refine_step(x, g, f, w, y, m, v, step, lr=0.05, clamp_min=lo, clamp_max=hi)
    R.masked_refine_step(rx, g.cpu().double(), *cpu(*f64(f, w), y), rm, rv, rs, lr=0.05,
                         clamp_min=lo.cpu(), clamp_max=hi.cpu())
    torch.testing.assert_close(x.cpu().double(), rx, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(m.cpu().double(), rm, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(v.cpu().double(), rv, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contig", "channels_last"])
def test_large_bn_stat_loss_vs_cpu_float64(fmt):
    x = (torch.randn(100, 64, 56, 56, device=CUDA) * 2 + 0.5).to(memory_format=fmt).requires_grad_(True)
    rm, rv = 0.3 * torch.randn(64, device=CUDA), torch.rand(64, device=CUDA) + 2
    loss = nrrdd_ext.bn_stat_loss(x, rm, rv)
    (gx,) = torch.autograd.grad(loss, x)
    x64 = x.detach().cpu().double().requires_grad_(True)
    ref = R.bn_stat_loss(x64, rm.cpu().double(), rv.cpu().double())
    (rgx,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx.cpu().double(), rgx, rtol=1e-3, atol=1e-4 * rgx.abs().max().item())
