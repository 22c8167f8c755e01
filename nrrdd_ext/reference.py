"""Pure-PyTorch statements of every op's semantics.

These are the definitions the fused kernels are tested against (run in float64)
and the eager baselines the benchmarks time. They are written the way the
SRe2L / RDED / NRR-DD research code writes them: chains of small eager ops.
Nothing here is fused or fast on purpose.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CAM_NORM_EPS = 1e-8


def class_activation_map(features: torch.Tensor, fc_weight: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """Normalised CAM (paper Eq. 1, Zhou et al.): (B,K,h,w) -> (B,h,w).

    ``fc_weight`` is (num_classes, K) for a pooled head or (num_classes, K, h, w)
    for a flatten head. Per-image min-max normalisation, no ReLU.
    """
    w = fc_weight[labels]
    if w.dim() == 2:
        cam = torch.einsum("bk,bkhw->bhw", w, features)
    else:
        cam = (w * features).sum(1)
    flat = cam.flatten(1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + CAM_NORM_EPS)).view_as(cam)


def non_critical_mask(features, fc_weight, labels, size, eps: float = 0.5):
    """M = max(0, eps - upsample(CAM)) (Eq. 4), bilinear, align_corners=False."""
    cam = class_activation_map(features, fc_weight, labels).unsqueeze(1)
    up = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    return (eps - up).clamp_min(0)


def masked_adam_step(x, grad, mask, exp_avg, exp_avg_sq, step, *, lr,
                     betas=(0.5, 0.9), eps=1e-8, clamp_min=None, clamp_max=None):
    """Adam moments on the raw gradient; only the applied update is masked.

    In place on x, exp_avg, exp_avg_sq and step (a one-element tensor).
    """
    b1, b2 = betas
    t = step + 1
    exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat = exp_avg / (1 - b1 ** t)
    v_hat = exp_avg_sq / (1 - b2 ** t)
    x.sub_(mask * lr * m_hat / (v_hat.sqrt() + eps))
    _clamp_channels_(x, clamp_min, clamp_max)
    step.copy_(t)


def masked_sgd_step(x, grad, mask, *, lr, clamp_min=None, clamp_max=None):
    """Eq. 5 as written: x <- x - M * lr * g."""
    x.sub_(mask * lr * grad)
    _clamp_channels_(x, clamp_min, clamp_max)


def _clamp_channels_(x, clamp_min, clamp_max):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if clamp_min is not None:
        torch.maximum(x, clamp_min.to(x).view(shape), out=x)
    if clamp_max is not None:
        torch.minimum(x, clamp_max.to(x).view(shape), out=x)


def masked_refine_step(x, grad, features, fc_weight, labels, exp_avg, exp_avg_sq,
                       step, *, lr, betas=(0.5, 0.9), eps=1e-8, cam_eps=0.5,
                       clamp_min=None, clamp_max=None):
    """The composite CAM -> full-resolution mask -> masked Adam step."""
    mask = non_critical_mask(features, fc_weight, labels, x.shape[-2:], cam_eps)
    masked_adam_step(x, grad, mask.to(x.dtype), exp_avg, exp_avg_sq, step, lr=lr,
                     betas=betas, eps=eps, clamp_min=clamp_min, clamp_max=clamp_max)


def batch_stats(x: torch.Tensor):
    """Per-channel mean and biased variance over every dim but dim 1."""
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False)


def bn_stat_loss(x, running_mean, running_var):
    """||mu(x) - running_mean||_2 + ||var(x) - running_var||_2 (Eq. 3, SRe2L)."""
    mean, var = batch_stats(x)
    return torch.norm(mean - running_mean, 2) + torch.norm(var - running_var, 2)


def folded_bn_stat_loss(y, scale, shift, running_mean, running_var):
    """The BN-statistic loss of x = (y - shift) / scale, the input of a BatchNorm
    whose affine map y = scale * x + shift was folded into the conv before it."""
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return bn_stat_loss((y - shift.view(shape)) / scale.view(shape), running_mean, running_var)


def bn_stat_loss_sre2l(x, running_mean, running_var):
    """What SRe2L's ``BNFeatureHook`` computes: a permute + contiguous copy of x."""
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(running_mean - mean, 2) + torch.norm(running_var - var, 2)


class BNFeatureHook:
    """SRe2L's hook: stores the BN-statistic loss of one BatchNorm's input."""

    def __init__(self, module: nn.Module):
        self.loss = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.loss = bn_stat_loss_sre2l(inputs[0], module.running_mean, module.running_var)

    def close(self):
        self.handle.remove()


def dbr_distances(logits, y_org, y_aug):
    """(d_org, d_aug): per-row cross entropy to each label (Eq. 8)."""
    logp = F.log_softmax(logits, dim=1)
    return (-logp.gather(1, y_org[:, None]).squeeze(1),
            -logp.gather(1, y_aug[:, None]).squeeze(1))


def _reduce(rows, reduction):
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def label_refine_loss(logits, y_org, y_aug, r: float = 0.4, reduction: str = "mean"):
    """Eq. 12: max(0, d_org - r) + max(0, d_aug - r)."""
    d_org, d_aug = dbr_distances(logits, y_org, y_aug)
    return _reduce(F.relu(d_org - r) + F.relu(d_aug - r), reduction)


def dbr_loss(logits, y_org, y_aug, d_org_t, d_aug_t, r: float = 0.4,
             alpha: float = 1.0, reduction: str = "mean"):
    """Eqs. 9-10: the hinge on both distances plus alpha * |d - d^T|."""
    d_org, d_aug = dbr_distances(logits, y_org, y_aug)
    rows = (F.relu(d_org - r) + F.relu(d_aug - r)
            + alpha * ((d_org - d_org_t).abs() + (d_aug - d_aug_t).abs()))
    return _reduce(rows, reduction)


def cutmix(x, perm, box):
    """x with the box (y0, y1, x0, x1) pasted from x[perm] (differentiable)."""
    y0, y1, x0, x1 = box
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return mixed


def refine_iteration(x, labels, optimizer, features_fn, head_fn, fc_weight, bn_hooks, *,
                     perm, box, alpha_bn=0.01, first_bn_multiplier=10.0, alpha_lr=1.0, r=0.4,
                     cam_eps=0.5, clamp_min=None, clamp_max=None):
    """One NRR iteration the way the SRe2L family writes it (the benchmark baseline).

    ``bn_hooks`` are :class:`BNFeatureHook` s on every BatchNorm (the first is
    weighted by ``first_bn_multiplier``); ``optimizer`` is ``torch.optim.Adam``
    over ``[x]``. CE + alpha_bn * L_bn on x and alpha_lr * L_lr on the CutMix view
    go through one backward; the full-resolution mask multiplies the gradient
    before the Adam step; x is clamped per channel. Returns the loss terms.
    """
    optimizer.zero_grad(set_to_none=True)
    feats = features_fn(x)
    logits = head_fn(feats)
    ce = F.cross_entropy(logits, labels)
    loss_bn = first_bn_multiplier * bn_hooks[0].loss
    for h in bn_hooks[1:]:
        loss_bn = loss_bn + h.loss
    logits_mix = head_fn(features_fn(cutmix(x, perm, box)))
    loss_lr = label_refine_loss(logits_mix, labels, labels[perm], r)
    (ce + alpha_bn * loss_bn + alpha_lr * loss_lr).backward()
    mask = non_critical_mask(feats.detach(), fc_weight.detach(), labels, x.shape[-2:], cam_eps)
    x.grad.mul_(mask)
    optimizer.step()
    with torch.no_grad():
        _clamp_channels_(x, clamp_min, clamp_max)
    return {"ce": ce.detach(), "bn": loss_bn.detach(), "lr": loss_lr.detach()}
