"""Loads the compiled ops and registers their fake (meta) and autograd kernels.

The schemas live in csrc/ops.cpp (``TORCH_LIBRARY(nrrdd, ...)``); the CPU and
CUDA kernels in csrc/cpu and csrc/cuda (``TORCH_LIBRARY_IMPL``). What autograd
and ``torch.compile`` need is registered here, from Python, the house style of
pytorch/extension-cpp and torchvision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nrrdd_ext import _C  # noqa: F401  (registers the schemas and kernels)

lib = "nrrdd::"


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake(lib + "cam")
def _(features, fc_weight, labels):
    B, _, h, w = features.shape
    return features.new_empty((B, h, w))


@torch.library.register_fake(lib + "non_critical_mask")
def _(cam, size, eps):
    return cam.new_empty((cam.shape[0], 1, size[0], size[1]))


@torch.library.register_fake(lib + "masked_adam_step_")
def _(x, grad, cam, exp_avg, exp_avg_sq, step, lr_scale, lr, beta1, beta2, eps, cam_eps, clamp_min, clamp_max):
    return None


@torch.library.register_fake(lib + "masked_sgd_step_")
def _(x, grad, cam, lr, cam_eps, clamp_min, clamp_max):
    return None


@torch.library.register_fake(lib + "bn_stat_loss")
def _(x, running_mean, running_var):
    acc = _acc_dtype(x)
    C = x.shape[1]
    return (x.new_empty((), dtype=acc), x.new_empty((C,), dtype=acc),
            x.new_empty((C,), dtype=acc), x.new_empty((2, C), dtype=acc))


@torch.library.register_fake(lib + "folded_bn_stat_loss")
def _(y, scale, shift, running_mean, running_var):
    acc = _acc_dtype(y)
    C = y.shape[1]
    return (y.new_empty((), dtype=acc), y.new_empty((C,), dtype=acc),
            y.new_empty((C,), dtype=acc), y.new_empty((2, C), dtype=acc))


@torch.library.register_fake(lib + "bn_stat_loss_backward")
def _(grad_loss, x, mean, coef):
    return torch.empty_like(x)


@torch.library.register_fake(lib + "ce_pair")
def _(logits, y_org, y_aug):
    B, acc = logits.shape[0], _acc_dtype(logits)
    return tuple(logits.new_empty((B,), dtype=acc) for _ in range(3))


@torch.library.register_fake(lib + "dbr_rows")
def _(logits, y_org, y_aug, d_org_t, d_aug_t, r, alpha):
    B, acc = logits.shape[0], _acc_dtype(logits)
    return (logits.new_empty((B,), dtype=acc), logits.new_empty((B, 4), dtype=acc),
            logits.new_empty((B,), dtype=acc))


@torch.library.register_fake(lib + "two_ce_backward")
def _(coef, logits, lse, y_org, y_aug):
    return torch.empty_like(logits)


# ------------------------------------------------------------- autograd: CAM
def _cam_setup(ctx, inputs, output):
    features, fc_weight, labels = inputs
    ctx.save_for_backward(features, fc_weight, labels)


def _cam_backward(ctx, grad):
    """Backward of the min-max normalised CAM (not on the hot path: the driver
    uses the CAM only as a mask, without gradients)."""
    features, fc_weight, labels = ctx.saved_tensors
    B, K, h, w = features.shape
    acc = _acc_dtype(features)
    f = features.to(acc)
    wy = fc_weight[labels].to(acc)
    raw = (torch.einsum("bk,bkhw->bhw", wy, f) if wy.dim() == 2 else (wy * f).sum(1)).flatten(1)
    lo, lo_i = raw.min(1, keepdim=True)
    hi, hi_i = raw.max(1, keepdim=True)
    d = hi - lo + 1e-8
    g = grad.to(acc).flatten(1)
    g_raw = g / d
    s_hi = -(g * (raw - lo)).sum(1, keepdim=True) / d ** 2
    s_lo = -g.sum(1, keepdim=True) / d - s_hi
    g_raw = g_raw.scatter_add(1, hi_i, s_hi).scatter_add(1, lo_i, s_lo).view(B, 1, h, w)
    g_features = g_fc = None
    if ctx.needs_input_grad[0]:
        wmap = wy[:, :, None, None] if wy.dim() == 2 else wy
        g_features = (g_raw * wmap).to(features.dtype)
    if ctx.needs_input_grad[1]:
        per = (g_raw * f).sum((2, 3)) if fc_weight.dim() == 2 else g_raw * f
        g_fc = torch.zeros_like(fc_weight, dtype=acc).index_add_(0, labels, per).to(fc_weight.dtype)
    return g_features, g_fc, None


torch.library.register_autograd(lib + "cam", _cam_backward, setup_context=_cam_setup)


def _mask_setup(ctx, inputs, output):
    cam, size, eps = inputs
    ctx.size, ctx.eps = size, eps
    ctx.save_for_backward(cam)


def _interp_matrix(out_size, in_size, dtype, device):
    """R (out, in) with R @ v = bilinear upsampling of v (align_corners=False)."""
    dst = torch.arange(out_size, device=device, dtype=dtype)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    i0 = src.floor().clamp_max(in_size - 1)
    w1 = (src - i0).clamp(0, 1)
    i0 = i0.long()
    i1 = (i0 + 1).clamp_max(in_size - 1)
    eye = torch.eye(in_size, device=device, dtype=dtype)
    return eye[i0] * (1 - w1)[:, None] + eye[i1] * w1[:, None]


def _mask_backward(ctx, grad):
    """Upsampling is Ry @ cam @ Rx^T, so its adjoint is Ry^T @ g @ Rx."""
    (cam,) = ctx.saved_tensors
    H, W = ctx.size
    acc = _acc_dtype(cam)
    ry = _interp_matrix(H, cam.shape[1], acc, cam.device)
    rx = _interp_matrix(W, cam.shape[2], acc, cam.device)
    up = ry @ cam.to(acc) @ rx.T
    g_up = torch.where(ctx.eps - up > 0, -grad[:, 0].to(acc), torch.zeros_like(up))
    return (ry.T @ g_up @ rx).to(cam.dtype), None, None


torch.library.register_autograd(lib + "non_critical_mask", _mask_backward, setup_context=_mask_setup)


# ------------------------------------------------------ autograd: BN statistics
def _bn_setup(ctx, inputs, output):
    x, running_mean, running_var = inputs
    _, mean, var, coef = output
    ctx.mark_non_differentiable(mean, var, coef)
    ctx.save_for_backward(x, mean, coef)
    ctx.stat_dtypes = (running_mean.dtype, running_var.dtype)


def _bn_backward(ctx, g_loss, _g_mean, _g_var, _g_coef):
    """coef = (A, B): dL/dx = g (A_c + B_c (x - mean_c)), with A_c = (mean_c - rm_c) /
    (n ||mean - rm||) and B_c = 2 (var_c - rv_c) / (n ||var - rv||); so
    dL/drm = -g n A and dL/drv = -g n B / 2."""
    x, mean, coef = ctx.saved_tensors
    g_x = g_rm = g_rv = None
    if ctx.needs_input_grad[0]:
        g_x = torch.ops.nrrdd.bn_stat_loss_backward(g_loss, x, mean, coef)
    n = x.numel() // max(x.shape[1], 1)
    if ctx.needs_input_grad[1]:
        g_rm = (-n * g_loss * coef[0]).to(ctx.stat_dtypes[0])
    if ctx.needs_input_grad[2]:
        g_rv = (-0.5 * n * g_loss * coef[1]).to(ctx.stat_dtypes[1])
    return g_x, g_rm, g_rv


torch.library.register_autograd(lib + "bn_stat_loss", _bn_backward, setup_context=_bn_setup)


def _folded_bn_setup(ctx, inputs, output):
    y = inputs[0]
    _, mean, var, coef = output
    ctx.mark_non_differentiable(mean, var, coef)
    ctx.save_for_backward(y, mean, coef)


def _folded_bn_backward(ctx, g_loss, _g_mean, _g_var, _g_coef):
    """Differentiable w.r.t. y only (the affine map and the running statistics are
    the frozen teacher's): coef already holds the coefficients w.r.t. y."""
    y, mean, coef = ctx.saved_tensors
    g_y = None
    if ctx.needs_input_grad[0]:
        g_y = torch.ops.nrrdd.bn_stat_loss_backward(g_loss, y, mean, coef)
    return g_y, None, None, None, None


torch.library.register_autograd(lib + "folded_bn_stat_loss", _folded_bn_backward,
                                setup_context=_folded_bn_setup)


# ------------------------------------------------------------- autograd: DBR
def _ce_pair_setup(ctx, inputs, output):
    logits, y_org, y_aug = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(logits, output[2], y_org, y_aug)


def _ce_pair_backward(ctx, g_org, g_aug, _g_lse):
    logits, lse, y_org, y_aug = ctx.saved_tensors
    coef = torch.stack([g_org, g_aug], 1).to(lse.dtype)
    return torch.ops.nrrdd.two_ce_backward(coef, logits, lse, y_org, y_aug), None, None


torch.library.register_autograd(lib + "ce_pair", _ce_pair_backward, setup_context=_ce_pair_setup)


def _dbr_setup(ctx, inputs, output):
    logits, y_org, y_aug, d_org_t, d_aug_t, r, alpha = inputs
    _, coef, lse = output
    ctx.mark_non_differentiable(coef, lse)
    ctx.save_for_backward(logits, coef, lse, y_org, y_aug)
    ctx.target_dtypes = (None if d_org_t is None else d_org_t.dtype,
                         None if d_aug_t is None else d_aug_t.dtype)


def _dbr_backward(ctx, g_rows, _g_coef, _g_lse):
    logits, coef, lse, y_org, y_aug = ctx.saved_tensors
    g = g_rows.to(coef.dtype)[:, None]
    g_logits = torch.ops.nrrdd.two_ce_backward(coef[:, :2] * g, logits, lse, y_org, y_aug)
    g_targets = [None, None]
    for j in (0, 1):
        if ctx.needs_input_grad[3 + j]:
            g_targets[j] = (-coef[:, 2 + j] * g[:, 0]).to(ctx.target_dtypes[j])
    return g_logits, None, None, g_targets[0], g_targets[1], None, None


torch.library.register_autograd(lib + "dbr_rows", _dbr_backward, setup_context=_dbr_setup)
