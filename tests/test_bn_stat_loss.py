"""bn_stat_loss (Eq. 3) and BNStatHooks against the float64 reference."""
import copy

import pytest
import torch
import torch.nn as nn

import nrrdd_ext
from nrrdd_ext import reference as R

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# The x values are exact in float64; only the fused arithmetic differs (fp32 or better accumulation).
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# Gradients are returned in x's dtype: one rounding.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _x(shape, layout, dtype, device):
    x = (torch.randn(shape, device=device) * 1.5 + 0.3).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        assert not x.is_contiguous()
    elif layout == "transposed":  # (N, C, ...) as a transposed view of a (C, N, ...) buffer
        x = (torch.randn((shape[1], shape[0]) + tuple(shape[2:]), device=device) * 1.5 + 0.3).to(dtype)
        x = x.transpose(0, 1)
        assert not x.is_contiguous()
    elif layout == "sliced":
        big = (torch.randn(tuple(shape[:-1]) + (2 * shape[-1] + 1,), device=device) * 1.5 + 0.3).to(dtype)
        x = big[..., 1::2]
        assert not x.is_contiguous()
    return x


def _stats(C, device, dtype=torch.float32):
    return (0.5 * torch.randn(C, device=device)).to(dtype), (torch.rand(C, device=device) + 0.5).to(dtype)


CASES = [  # (shape, layout)
    ((16, 8), "contiguous"),
    ((4, 6, 10), "contiguous"),
    ((3, 5, 7, 9), "contiguous"),
    ((3, 5, 7, 9), "channels_last"),
    ((2, 3, 4, 5, 6), "contiguous"),
    ((2, 3, 4, 5, 6), "channels_last"),
    ((3, 4, 6, 5), "transposed"),
    ((3, 4, 6, 5), "sliced"),
    ((1, 4, 5, 5), "contiguous"),
    ((1, 6, 3, 3), "channels_last"),
    ((1, 7), "contiguous"),
]


def _id(c):
    return "x".join(map(str, c[0])) + "-" + c[1]


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_grad(device, case, dtype):
    shape, layout = case
    x = _x(shape, layout, dtype, device).requires_grad_(True)
    rm, rv = _stats(shape[1], device)
    loss = nrrdd_ext.bn_stat_loss(x, rm, rv)
    assert loss.shape == () and loss.dtype == (F64 if dtype == F64 else torch.float32)
    x64 = x.detach().to(F64).requires_grad_(True)
    ref = R.bn_stat_loss(x64, rm.to(F64), rv.to(F64))
    torch.testing.assert_close(loss.to(F64), ref, rtol=LOSS_RTOL[dtype], atol=0)

    g_out = torch.rand((), device=device) + 0.5  # an upstream gradient other than 1
    (gx,) = torch.autograd.grad(loss, x, g_out)
    (rgx,) = torch.autograd.grad(ref, x64, g_out.to(F64))
    assert gx.shape == x.shape and gx.dtype == dtype
    scale = rgx.abs().max().item()
    torch.testing.assert_close(gx.to(F64), rgx, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * scale * 0.1)


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64], ids=str)
def test_grad_wrt_running_stats(device, stats_dtype):
    x = _x((4, 5, 3, 3), "contiguous", torch.float32, device)
    rm, rv = (t.requires_grad_(True) for t in _stats(5, device, stats_dtype))
    loss = nrrdd_ext.bn_stat_loss(x, rm, rv)
    g_rm, g_rv = torch.autograd.grad(loss, (rm, rv))
    assert g_rm.dtype == stats_dtype and g_rv.dtype == stats_dtype
    rm64, rv64 = (t.detach().to(F64).requires_grad_(True) for t in (rm, rv))
    r_rm, r_rv = torch.autograd.grad(R.bn_stat_loss(x.to(F64), rm64, rv64), (rm64, rv64))
    torch.testing.assert_close(g_rm.to(F64), r_rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_rv.to(F64), r_rv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 2, 3), (6, 3), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(shape, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4 dims")
    x = _x(shape, layout, F64, "cpu").requires_grad_(True)
    rm, rv = (t.requires_grad_(True) for t in _stats(shape[1], "cpu", F64))
    assert torch.autograd.gradcheck(nrrdd_ext.bn_stat_loss, (x, rm, rv))


def test_large_mean_is_numerically_safe(device):
    """x = 1e4 + N(0,1) in float32: the fused variance matches float64, while the naive
    fp32 E[x^2] - E[x]^2 is off by far more."""
    C = 4
    x = 1e4 + torch.randn(8, C, 16, 16, device=device)
    rm = 1e4 + 0.5 * torch.randn(C, device=device)
    rv = torch.rand(C, device=device) + 0.5
    loss, mean, var, _ = torch.ops.nrrdd.bn_stat_loss(x, rm, rv)
    x64 = x.to(F64)
    ref_mean, ref_var = R.batch_stats(x64)
    var_err = (var.to(F64) - ref_var).abs().max().item()
    torch.testing.assert_close(mean.to(F64), ref_mean, rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(var.to(F64), ref_var, rtol=0, atol=1e-3)
    torch.testing.assert_close(loss.to(F64), R.bn_stat_loss(x64, rm.to(F64), rv.to(F64)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nrrdd_ext.bn_stat_loss(x, rm, rv), loss)

    dims = [0, 2, 3]
    naive_var = (x * x).mean(dims) - x.mean(dims) ** 2  # what a one-pass fp32 kernel without shifting gets
    naive_err = (naive_var.to(F64) - ref_var).abs().max().item()
    assert naive_err > 0.1, naive_err
    assert var_err < naive_err / 50, (var_err, naive_err)

    # and the backward, dL/dx = a_c + b_c (x - mu_c), does not cancel either
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(nrrdd_ext.bn_stat_loss(xg, rm, rv), xg)
    x64r = x64.clone().requires_grad_(True)
    (rgx,) = torch.autograd.grad(R.bn_stat_loss(x64r, rm.to(F64), rv.to(F64)), x64r)
    torch.testing.assert_close(gx.to(F64), rgx, rtol=1e-3, atol=1e-3 * rgx.abs().max().item())


def test_empty_batch_is_nan_like_reference(device):
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    rm, rv = _stats(3, device)
    loss = nrrdd_ext.bn_stat_loss(x, rm, rv)
    ref = R.bn_stat_loss(x.detach().to(F64), rm.to(F64), rv.to(F64))
    assert torch.isnan(ref) and torch.isnan(loss)
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.shape == x.shape


def test_nan_propagates(device):
    x = _x((3, 4, 5, 5), "contiguous", torch.float32, device)
    x[1, 2, 0, 3] = float("nan")
    rm, rv = _stats(4, device)
    assert torch.isnan(nrrdd_ext.bn_stat_loss(x, rm, rv))


def test_matches_at_running_stats_minimum(device):
    """When x's statistics equal the running statistics the loss is ~0 and the gradient stays finite."""
    x = _x((6, 3, 4, 4), "contiguous", torch.float64, device).requires_grad_(True)
    mean, var = R.batch_stats(x.detach())
    loss = nrrdd_ext.bn_stat_loss(x, mean.clone(), var.clone())
    assert loss.item() < 1e-12
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gx).all()


# ------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("case", [((3, 4, 5, 2), "contiguous"), ((3, 4, 5, 2), "channels_last"),
                                  ((5, 6), "contiguous")], ids=_id)
def test_opcheck(case):
    shape, layout = case
    rm, rv = _stats(shape[1], "cpu")
    x = _x(shape, layout, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.nrrdd.bn_stat_loss.default, (x, rm, rv))
    torch.library.opcheck(torch.ops.nrrdd.bn_stat_loss.default, (x.clone().requires_grad_(True), rm, rv))
    _, mean, _, coef = torch.ops.nrrdd.bn_stat_loss(x, rm, rv)
    torch.library.opcheck(torch.ops.nrrdd.bn_stat_loss_backward.default,
                          (torch.tensor(0.7), x, mean, coef))


# ---------------------------------------------------------------- BNStatHooks
class SmallCNN(nn.Module):
    def __init__(self, with_bn1d=True):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)) \
            if with_bn1d else nn.Linear(12, 10)

    def forward(self, x):
        return self.head(self.features(x))


def _model(with_bn1d=True, device="cpu", dtype=torch.float32):
    model = SmallCNN(with_bn1d)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return model.to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("first_multiplier", [1.0, 2.5])
def test_hooks_loss_equals_reference_sum(device, first_multiplier):
    model = _model(device=device)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3
    captured = {}
    handles = [m.register_forward_pre_hook(lambda m, inp, i=i: captured.__setitem__(i, inp[0].detach().clone()))
               for i, m in enumerate(bns)]
    x = torch.randn(6, 3, 12, 12, device=device)
    with nrrdd_ext.BNStatHooks(model, first_multiplier=first_multiplier) as hooks:
        model(x)
        loss = hooks.loss()
    for h in handles:
        h.remove()
    terms = [R.bn_stat_loss(captured[i].to(F64), m.running_mean.to(F64), m.running_var.to(F64))
             for i, m in enumerate(bns)]
    ref = first_multiplier * terms[0] + terms[1] + terms[2]
    torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=0)
    for t, r in zip(hooks.terms, terms):
        torch.testing.assert_close(t.to(F64), r, rtol=1e-5, atol=0)


def test_hooks_paused_clear_and_close(device):
    model = _model(device=device)
    hooks = nrrdd_ext.BNStatHooks(model)
    with hooks:
        with pytest.raises(RuntimeError):
            hooks.loss()  # no forward yet
        model(torch.randn(4, 3, 10, 10, device=device))
        before = [t.clone() for t in hooks.terms]
        loss_before = hooks.loss()
        with hooks.paused():
            model(torch.randn(4, 3, 10, 10, device=device) * 3 + 1)
        for t, b in zip(hooks.terms, before):
            torch.testing.assert_close(t, b, rtol=0, atol=0)
        torch.testing.assert_close(hooks.loss(), loss_before, rtol=0, atol=0)
        model(torch.randn(4, 3, 10, 10, device=device) * 3 + 1)  # active again: terms change
        assert all((t - b).abs() > 1e-4 for t, b in zip(hooks.terms, before))
        hooks.clear()
        with pytest.raises(RuntimeError):
            hooks.loss()
    model(torch.randn(4, 3, 10, 10, device=device))  # hooks removed on exit
    assert all(t is None for t in hooks.terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hooks_grad_equals_sre2l_hooks(device, dtype):
    """d(hooks.loss())/dx equals that of SRe2L's BNFeatureHook (reference), run in float64."""
    model = _model(with_bn1d=False, device=device, dtype=dtype)
    model64 = copy.deepcopy(model).double()
    x = torch.randn(5, 3, 12, 12, device=device, dtype=dtype, requires_grad=True)
    with nrrdd_ext.BNStatHooks(model, first_multiplier=2.0) as hooks:
        logits = model(x)
        loss = hooks.loss() + 0.1 * logits.square().mean()  # in the model dtype: .float() cut float64 logits to fp32
    (gx,) = torch.autograd.grad(loss, x)

    ref_hooks = [R.BNFeatureHook(m) for m in model64.modules() if isinstance(m, nn.BatchNorm2d)]
    x64 = x.detach().to(F64).requires_grad_(True)
    logits64 = model64(x64)
    ref = 2.0 * ref_hooks[0].loss + ref_hooks[1].loss + 0.1 * logits64.square().mean()
    for h in ref_hooks:
        h.close()
    (rgx,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(gx.to(F64), rgx, rtol=tol, atol=tol * rgx.abs().max().item())
