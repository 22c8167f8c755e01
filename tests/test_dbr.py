"""dbr_distances, dbr_loss, DBRLoss, label_refine_loss (Eqs. 8-10, 12) against the float64 reference."""
import pytest
import torch

import nrrdd_ext
from nrrdd_ext import reference as R

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# The logits are exact in float64, the op accumulates in fp32 (fp64 for fp64) whatever the input:
# distances and losses are as tight for fp16/bf16 logits as for fp32 ones.
VAL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# Gradients w.r.t. the logits come back in the logits' dtype: one rounding.
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(1, 1), (7, 1), (1, 10), (16, 10), (5, 1000), (0, 10), (0, 1000)]


def make_logits(B, V, dtype, device, scale=3.0):
    return (scale * torch.randn(B, V, device=device)).to(dtype)


def make_labels(B, V, device, same=False):
    y_org = torch.randint(0, V, (B,), device=device)
    y_aug = y_org.clone() if same else torch.randint(0, V, (B,), device=device)
    return y_org, y_aug


def pick_r(d_org, d_aug):
    """A hinge threshold r >= 0 with distances on both sides of it when they spread, and no
    distance near it (so fp32 rounding and finite differences stay off the kink)."""
    d = torch.cat([d_org, d_aug]).to(F64)
    d = d[torch.isfinite(d)].sort().values.cpu()
    if d.numel() == 0:
        return 0.4
    gaps = d[1:] - d[:-1]
    if gaps.numel() and gaps.max() > 0.1:  # interior: some rows hinge, some do not
        i = int(gaps.argmax())
        return 0.5 * (d[i] + d[i + 1]).item()
    lo, hi = d[0].item(), d[-1].item()
    return lo / 2 if lo > 0.2 else hi + 0.5


def targets_off_kink(d_org, d_aug):
    """Teacher distances at least 0.05 away from the student's, on either side."""
    def t(d):
        off = 0.05 + 0.5 * torch.rand_like(d)
        sign = torch.where(torch.rand_like(d) < 0.5, -1.0, 1.0)
        return (d + sign * off).abs()  # abs keeps them plausible distances; still >= 0.05 off for d >= 0.05
    to, ta = t(d_org.detach()), t(d_aug.detach())
    # where d < 0.05 the abs() may land close: push such targets up
    to = torch.where((to - d_org).abs() < 0.05, d_org + 0.3, to)
    ta = torch.where((ta - d_aug).abs() < 0.05, d_aug + 0.3, ta)
    return to, ta


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("same", [False, True], ids=["diff", "same"])
def test_distances(device, shape, dtype, same):
    B, V = shape
    logits = make_logits(B, V, dtype, device).requires_grad_(True)
    y_org, y_aug = make_labels(B, V, device, same)
    d_org, d_aug = nrrdd_ext.dbr_distances(logits, y_org, y_aug)
    acc = F64 if dtype == F64 else torch.float32
    assert d_org.shape == (B,) and d_org.dtype == acc and d_aug.dtype == acc
    l64 = logits.detach().to(F64).requires_grad_(True)
    r_org, r_aug = R.dbr_distances(l64, y_org, y_aug)
    tol = VAL_TOL[dtype]
    torch.testing.assert_close(d_org.to(F64), r_org, atol=tol, rtol=tol)
    torch.testing.assert_close(d_aug.to(F64), r_aug, atol=tol, rtol=tol)
    if same:
        torch.testing.assert_close(d_org, d_aug, atol=0, rtol=0)
    # gradient through both outputs, with distinct upstream weights
    w_org, w_aug = torch.randn(B, device=device), torch.randn(B, device=device)
    (g,) = torch.autograd.grad((d_org * w_org.to(acc)).sum() + (d_aug * w_aug.to(acc)).sum(), logits)
    (rg,) = torch.autograd.grad((r_org * w_org.to(F64)).sum() + (r_aug * w_aug.to(F64)).sum(), l64)
    assert g.dtype == dtype and g.shape == (B, V)
    gt = GRAD_TOL[dtype]
    torch.testing.assert_close(g.to(F64), rg, atol=gt * max(1.0, rg.abs().max().item() if B else 1.0), rtol=gt)


def test_distances_one_output_used(device):
    """Backward when only d_org feeds the loss (d_aug's gradient is None)."""
    logits = make_logits(6, 9, torch.float32, device).requires_grad_(True)
    y_org, y_aug = make_labels(6, 9, device)
    d_org, _ = nrrdd_ext.dbr_distances(logits, y_org, y_aug)
    (g,) = torch.autograd.grad(d_org.sum(), logits)
    l64 = logits.detach().double().requires_grad_(True)
    (rg,) = torch.autograd.grad(R.dbr_distances(l64, y_org, y_aug)[0].sum(), l64)
    torch.testing.assert_close(g.double(), rg, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 10, 1000])
def test_distances_logits_1e4(device, dtype, V):
    """Logits of magnitude 1e4: finite distances equal to the float64 reference (one fp32
    rounding of numbers of size 1e4 is ~1e-3)."""
    B = 6
    logits = ((torch.rand(B, V, device=device) * 2 - 1) * 1e4).to(dtype)
    y_org, y_aug = make_labels(B, V, device)
    y_org[0] = logits[0].float().argmax()  # one row whose distance is ~0 (the hard case for cancellation)
    d_org, d_aug = nrrdd_ext.dbr_distances(logits, y_org, y_aug)
    r_org, r_aug = R.dbr_distances(logits.to(F64), y_org, y_aug)
    assert torch.isfinite(d_org).all() and torch.isfinite(d_aug).all()
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == F64 else dict(atol=4e-3, rtol=1e-6)
    torch.testing.assert_close(d_org.to(F64), r_org, **tol)
    torch.testing.assert_close(d_aug.to(F64), r_aug, **tol)
    # the loss and its gradient stay finite and match too
    logits.requires_grad_(True)
    loss = nrrdd_ext.dbr_loss(logits, y_org, y_aug, r_org.to(d_org.dtype) + 5, r_aug.to(d_org.dtype) - 5,
                              r=0.4, alpha=0.5, reduction="sum")
    l64 = logits.detach().to(F64).requires_grad_(True)
    ref = R.dbr_loss(l64, y_org, y_aug, r_org + 5, r_aug - 5, r=0.4, alpha=0.5, reduction="sum")
    torch.testing.assert_close(loss.to(F64), ref, atol=1e-10 if dtype == F64 else 3e-2, rtol=1e-6)
    (g,) = torch.autograd.grad(loss, logits)
    (rg,) = torch.autograd.grad(ref, l64)
    assert torch.isfinite(g).all()
    # softmax = exp(l - lse) with lse ~ 1e4 rounded once in fp32: ~5e-4 relative, as in torch's own
    # fp32 log_softmax backward
    gt = 1e-10 if dtype == F64 else max(GRAD_TOL[dtype], 2e-3)
    torch.testing.assert_close(g.to(F64), rg, atol=gt, rtol=gt)


def test_distances_neg_inf_logit(device):
    """A masked class (-inf logit) has zero probability; the other distances stay finite,
    as in the reference (log_softmax)."""
    logits = torch.randn(3, 5, device=device)
    logits[:, 0] = float("-inf")
    logits[1, 3] = float("-inf")
    y = torch.tensor([1, 2, 4], device=device)
    d_org, d_aug = nrrdd_ext.dbr_distances(logits, y, y)
    r_org, _ = R.dbr_distances(logits.double(), y, y)
    assert torch.isfinite(r_org).all()
    torch.testing.assert_close(d_org.double(), r_org, atol=2e-6, rtol=2e-6)


def test_nan_propagates(device):
    logits = make_logits(4, 7, torch.float32, device)
    logits[2, 5] = float("nan")
    y_org, y_aug = make_labels(4, 7, device)
    d_org, d_aug = nrrdd_ext.dbr_distances(logits, y_org, y_aug)
    assert torch.isnan(d_org[2]) and torch.isnan(d_aug[2])
    r_org, r_aug = R.dbr_distances(logits.double(), y_org, y_aug)
    torch.testing.assert_close(d_org[[0, 1, 3]].double(), r_org[[0, 1, 3]], atol=2e-5, rtol=2e-5)
    t = torch.rand(4, device=device) + 1
    rows = nrrdd_ext.dbr_loss(logits, y_org, y_aug, t, t, reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    assert torch.isnan(nrrdd_ext.dbr_loss(logits, y_org, y_aug, t, t))
    assert torch.isnan(nrrdd_ext.label_refine_loss(logits, y_org, y_aug, reduction="sum"))


def _dbr_case(B, V, dtype, device, same=False):
    logits = make_logits(B, V, dtype, device)
    y_org, y_aug = make_labels(B, V, device, same)
    r_org, r_aug = R.dbr_distances(logits.to(F64), y_org, y_aug)
    r = pick_r(r_org, r_aug)
    t_org, t_aug = targets_off_kink(r_org, r_aug)
    return logits, y_org, y_aug, r, t_org, t_aug


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dbr_loss(device, shape, dtype, reduction):
    B, V = shape
    logits, y_org, y_aug, r, t_org, t_aug = _dbr_case(B, V, dtype, device)
    alpha = float(torch.empty(()).uniform_(0.2, 2.0))
    tgt_dtype = F64 if dtype == F64 else torch.float32
    to, ta = (t.to(tgt_dtype).requires_grad_(True) for t in (t_org, t_aug))
    logits.requires_grad_(True)
    out = nrrdd_ext.dbr_loss(logits, y_org, y_aug, to, ta, r=r, alpha=alpha, reduction=reduction)
    l64 = logits.detach().to(F64).requires_grad_(True)
    to64, ta64 = (t.detach().to(F64).requires_grad_(True) for t in (to, ta))
    ref = R.dbr_loss(l64, y_org, y_aug, to64, ta64, r=r, alpha=alpha, reduction=reduction)
    assert out.shape == ref.shape
    if B == 0 and reduction == "mean":
        assert torch.isnan(out) and torch.isnan(ref)
        return
    tol = VAL_TOL[dtype]
    torch.testing.assert_close(out.to(F64), ref, atol=tol * 10, rtol=tol)
    g_out = torch.rand(out.shape, device=device) + 0.5
    g = torch.autograd.grad(out, (logits, to, ta), g_out.to(out.dtype))
    rg = torch.autograd.grad(ref, (l64, to64, ta64), g_out.to(F64))
    assert g[0].dtype == dtype and g[1].dtype == tgt_dtype
    gt = GRAD_TOL[dtype]
    for a, b in zip(g, rg):
        torch.testing.assert_close(a.to(F64), b, atol=gt * 3, rtol=gt)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("same", [False, True], ids=["diff", "same"])
def test_label_refine_loss(device, dtype, reduction, same):
    B, V = 12, 10
    logits, y_org, y_aug, r, _, _ = _dbr_case(B, V, dtype, device, same)
    logits.requires_grad_(True)
    out = nrrdd_ext.label_refine_loss(logits, y_org, y_aug, r=r, reduction=reduction)
    l64 = logits.detach().to(F64).requires_grad_(True)
    ref = R.label_refine_loss(l64, y_org, y_aug, r=r, reduction=reduction)
    torch.testing.assert_close(out.to(F64), ref, atol=VAL_TOL[dtype] * 10, rtol=VAL_TOL[dtype])
    g_out = torch.rand(out.shape, device=device) + 0.5
    (g,) = torch.autograd.grad(out, logits, g_out.to(out.dtype))
    (rg,) = torch.autograd.grad(ref, l64, g_out.to(F64))
    torch.testing.assert_close(g.to(F64), rg, atol=GRAD_TOL[dtype] * 3, rtol=GRAD_TOL[dtype])
    # the default threshold too
    torch.testing.assert_close(nrrdd_ext.label_refine_loss(logits, y_org, y_aug).to(F64),
                               R.label_refine_loss(l64, y_org, y_aug), atol=VAL_TOL[dtype] * 10,
                               rtol=VAL_TOL[dtype])


def test_dbr_module(device):
    logits, y_org, y_aug, r, t_org, t_aug = _dbr_case(9, 10, torch.float32, device)
    mod = nrrdd_ext.DBRLoss(r=r, alpha=0.7, reduction="sum")
    assert isinstance(mod, torch.nn.Module)
    assert "alpha=0.7" in repr(mod) and "reduction='sum'" in repr(mod)
    out = mod(logits, y_org, y_aug, t_org.float(), t_aug.float())
    ref = R.dbr_loss(logits.double(), y_org, y_aug, t_org, t_aug, r=r, alpha=0.7, reduction="sum")
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-5)
    torch.testing.assert_close(out, nrrdd_ext.dbr_loss(logits, y_org, y_aug, t_org.float(), t_aug.float(),
                                                       r, 0.7, "sum"), atol=0, rtol=0)
    default = nrrdd_ext.DBRLoss()(logits, y_org, y_aug, t_org.float(), t_aug.float())
    ref_default = R.dbr_loss(logits.double(), y_org, y_aug, t_org, t_aug)
    torch.testing.assert_close(default.double(), ref_default, atol=2e-5, rtol=2e-5)


def test_hinge_kink_subgradient_is_zero(device):
    """d == r exactly (1 class: d = 0, r = 0) and d == d_t: both subgradients are 0."""
    logits = torch.randn(3, 1, device=device, dtype=F64, requires_grad=True)
    y = torch.zeros(3, dtype=torch.long, device=device)
    t = torch.zeros(3, device=device, dtype=F64, requires_grad=True)
    out = nrrdd_ext.dbr_loss(logits, y, y, t, t.detach().clone().requires_grad_(True), r=0.0, alpha=1.0)
    assert out.item() == 0.0
    g_logits, g_t = torch.autograd.grad(out, (logits, t))
    assert torch.equal(g_logits, torch.zeros_like(g_logits)) and torch.equal(g_t, torch.zeros_like(g_t))
    # and a targets' gradient that is not zero: d = 0 < d_t = 0.5 gives -alpha * sign(d - d_t) / B = +alpha/3
    t2 = torch.full((3,), 0.5, device=device, dtype=F64, requires_grad=True)
    out2 = nrrdd_ext.dbr_loss(logits, y, y, t2, t2.detach(), r=0.0, alpha=0.9)
    (g_t2,) = torch.autograd.grad(out2, t2)
    torch.testing.assert_close(g_t2, torch.full_like(g_t2, 0.3), atol=1e-12, rtol=0)


# ----------------------------------------------------------------- gradcheck
def test_gradcheck_distances():
    logits = make_logits(4, 6, F64, "cpu").requires_grad_(True)
    y_org, y_aug = make_labels(4, 6, "cpu")
    y_aug[0] = y_org[0]
    assert torch.autograd.gradcheck(lambda l: nrrdd_ext.dbr_distances(l, y_org, y_aug), (logits,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_dbr_loss(reduction):
    logits, y_org, y_aug, r, t_org, t_aug = _dbr_case(5, 6, F64, "cpu")
    logits.requires_grad_(True)
    t_org.requires_grad_(True)
    t_aug.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda l, a, b: nrrdd_ext.dbr_loss(l, y_org, y_aug, a, b, r=r, alpha=0.8, reduction=reduction),
        (logits, t_org, t_aug))


def test_gradcheck_label_refine_loss():
    logits, y_org, y_aug, r, _, _ = _dbr_case(6, 5, F64, "cpu")
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda l: nrrdd_ext.label_refine_loss(l, y_org, y_aug, r=r, reduction="none"), (logits,))


# ------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("shape", [(4, 7), (1, 1000)], ids=str)
def test_opcheck_ce_pair_and_backward(shape):
    B, V = shape
    logits = make_logits(B, V, torch.float32, "cpu")
    y_org, y_aug = make_labels(B, V, "cpu")
    torch.library.opcheck(torch.ops.nrrdd.ce_pair.default, (logits, y_org, y_aug))
    torch.library.opcheck(torch.ops.nrrdd.ce_pair.default, (logits.clone().requires_grad_(True), y_org, y_aug))
    _, _, lse = torch.ops.nrrdd.ce_pair(logits, y_org, y_aug)
    torch.library.opcheck(torch.ops.nrrdd.two_ce_backward.default,
                          (torch.randn(B, 2), logits, lse, y_org, y_aug))


@pytest.mark.parametrize("with_targets", [False, True])
def test_opcheck_dbr_rows(with_targets):
    logits = make_logits(5, 8, torch.float32, "cpu")
    y_org, y_aug = make_labels(5, 8, "cpu")
    t = (torch.rand(5) + 1, torch.rand(5) + 1) if with_targets else (None, None)
    torch.library.opcheck(torch.ops.nrrdd.dbr_rows.default, (logits, y_org, y_aug, *t, 0.4, 1.0))
    tg = tuple(x.clone().requires_grad_(True) for x in t) if with_targets else t
    torch.library.opcheck(torch.ops.nrrdd.dbr_rows.default,
                          (logits.clone().requires_grad_(True), y_org, y_aug, *tg, 0.3, 0.5))
