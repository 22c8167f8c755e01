"""class_activation_map and non_critical_mask (Eqs. 1, 4) against the float64 reference."""
import pytest
import torch

import nrrdd_ext
from nrrdd_ext import reference as R

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# CAM / mask values lie in [0, 1]: absolute tolerances of a few output ulps.
CAM_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_cam_inputs(B, K, h, w, classes, head, dtype, device):
    features = torch.randn(B, K, h, w, device=device).to(dtype)
    if head == "pooled":
        fc_weight = torch.randn(classes, K, device=device).to(dtype)
    else:
        fc_weight = torch.randn(classes, K, h, w, device=device).to(dtype)
    labels = torch.randint(0, classes, (B,), device=device)
    return features, fc_weight, labels


def up(*ts):
    return [t.to(F64) if t.is_floating_point() else t for t in ts]


@pytest.mark.parametrize("head", ["pooled", "flatten"])
@pytest.mark.parametrize("hw", [(1, 1), (3, 3), (7, 7), (4, 6), (7, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cam_values(device, head, hw, dtype):
    f, w, y = make_cam_inputs(5, 16, *hw, 10, head, dtype, device)
    out = nrrdd_ext.class_activation_map(f, w, y)
    ref = R.class_activation_map(*up(f, w), y)
    assert out.shape == (5, *hw) and out.dtype == dtype and out.device == f.device
    torch.testing.assert_close(out.to(F64), ref, atol=CAM_TOL[dtype], rtol=0)
    if hw != (1, 1):  # min-max normalised: every image spans [0, 1)
        torch.testing.assert_close(out.to(F64).flatten(1).amin(1), torch.zeros(5, dtype=F64, device=device),
                                   atol=CAM_TOL[dtype], rtol=0)
        torch.testing.assert_close(out.to(F64).flatten(1).amax(1), torch.ones(5, dtype=F64, device=device),
                                   atol=CAM_TOL[dtype] + 1e-7, rtol=0)


def test_cam_noncontiguous_and_b1(device):
    f = torch.randn(2, 8, 6, 10, device=device)[:1, :, :, ::2]  # a strided slice, B = 1
    w = torch.randn(8, 7, device=device).t()
    y = torch.randint(0, 7, (1,), device=device)
    assert not f.is_contiguous() and not w.is_contiguous()
    out = nrrdd_ext.class_activation_map(f, w, y)
    torch.testing.assert_close(out.double(), R.class_activation_map(*up(f, w), y), atol=2e-5, rtol=0)


def test_cam_empty_batch(device):
    f, w, y = make_cam_inputs(0, 4, 3, 3, 5, "pooled", torch.float32, device)
    assert nrrdd_ext.class_activation_map(f, w, y).shape == (0, 3, 3)
    assert nrrdd_ext.non_critical_mask(f, w, y, (9, 9)).shape == (0, 1, 9, 9)


def test_cam_nan_propagates(device):
    f, w, y = make_cam_inputs(3, 4, 5, 5, 6, "pooled", torch.float32, device)
    f[1, 2, 3, 0] = float("nan")
    out = nrrdd_ext.class_activation_map(f, w, y)
    ref = R.class_activation_map(*up(f, w), y)
    assert torch.isnan(ref[1]).all()
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]].double(), ref[[0, 2]], atol=2e-5, rtol=0)


@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_cam_grad(device, head):
    f, w, y = make_cam_inputs(4, 6, 5, 4, 3, head, torch.float32, device)
    f.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(4, 5, 4, device=device)
    gf, gw = torch.autograd.grad(nrrdd_ext.class_activation_map(f, w, y), (f, w), g)
    f64, w64 = (t.detach().double().requires_grad_(True) for t in (f, w))
    rf, rw = torch.autograd.grad(R.class_activation_map(f64, w64, y), (f64, w64), g.double())
    torch.testing.assert_close(gf.double(), rf, atol=1e-4 * rf.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(gw.double(), rw, atol=1e-4 * rw.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_cam_gradcheck(head):
    f, w, _ = make_cam_inputs(3, 4, 3, 3, 4, head, F64, "cpu")
    y = torch.tensor([1, 3, 1])  # a repeated label: fc_weight's gradient rows accumulate
    f.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(nrrdd_ext.class_activation_map, (f, w, y))


# ------------------------------------------------------------------ the mask
MASK_CASES = [  # (h, w, H, W, B)
    (7, 7, 28, 28, 4),
    (4, 4, 32, 32, 4),
    (7, 7, 224, 224, 2),
    (7, 7, 30, 45, 3),    # non-integer scale factors
    (3, 5, 17, 13, 3),
    (5, 5, 3, 4, 2),      # downsampling
    (1, 1, 8, 8, 2),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: "{}x{}->{}x{}".format(*c[:4]))
@pytest.mark.parametrize("head", ["pooled", "flatten"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_values(device, case, head, dtype):
    h, w, H, W, B = case
    eps = float(torch.empty(()).uniform_(0.3, 0.7))
    f, wt, y = make_cam_inputs(B, 8, h, w, 10, head, dtype, device)
    out = nrrdd_ext.non_critical_mask(f, wt, y, (H, W), eps=eps)
    ref = R.non_critical_mask(*up(f, wt), y, (H, W), eps)
    assert out.shape == (B, 1, H, W) and out.dtype == dtype
    torch.testing.assert_close(out.to(F64), ref, atol=CAM_TOL[dtype] * 2, rtol=0)
    if (h, w) != (1, 1) and H >= h and W >= w:  # both regions present: critical (0), non-critical (> 0)
        assert (ref == 0).any() and (ref > 0).any()


def test_mask_default_eps(device):
    f, w, y = make_cam_inputs(2, 3, 4, 4, 5, "pooled", torch.float32, device)
    out = nrrdd_ext.non_critical_mask(f, w, y, [16, 16])
    torch.testing.assert_close(out.double(), R.non_critical_mask(*up(f, w), y, (16, 16), 0.5),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_mask_grad(device, head):
    f, w, y = make_cam_inputs(3, 5, 4, 4, 6, head, torch.float32, device)
    f.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(3, 1, 10, 9, device=device)
    gf, gw = torch.autograd.grad(nrrdd_ext.non_critical_mask(f, w, y, (10, 9), 0.6), (f, w), g)
    f64, w64 = (t.detach().double().requires_grad_(True) for t in (f, w))
    rf, rw = torch.autograd.grad(R.non_critical_mask(f64, w64, y, (10, 9), 0.6), (f64, w64), g.double())
    torch.testing.assert_close(gf.double(), rf, atol=1e-4 * rf.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(gw.double(), rw, atol=1e-4 * rw.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_mask_gradcheck(head):
    f, w, y = make_cam_inputs(2, 3, 3, 3, 4, head, F64, "cpu")
    f.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: nrrdd_ext.non_critical_mask(a, b, y, (5, 7), 0.7), (f, w))


# ------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("head", ["pooled", "flatten"])
def test_opcheck_cam(head):
    f, w, y = make_cam_inputs(3, 4, 3, 5, 6, head, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.nrrdd.cam.default, (f, w, y))
    torch.library.opcheck(torch.ops.nrrdd.cam.default, (f.requires_grad_(True), w.requires_grad_(True), y))


@pytest.mark.parametrize("size", [(8, 8), (11, 6)])
def test_opcheck_non_critical_mask(size):
    cam = torch.rand(2, 4, 3)
    torch.library.opcheck(torch.ops.nrrdd.non_critical_mask.default, (cam, list(size), 0.5))
    torch.library.opcheck(torch.ops.nrrdd.non_critical_mask.default,
                          (cam.clone().requires_grad_(True), list(size), 0.3))
