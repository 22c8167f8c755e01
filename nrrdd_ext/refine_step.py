"""The fused masked update: CAM -> non-critical mask -> Adam (or SGD) step.

The full-resolution mask is never materialised: a tiny kernel computes the
normalised CAM (B,h,w), and one pass over the pixels upsamples it on the fly,
updates the Adam moments with the raw gradient, applies the masked update and
clamps to the valid pixel range.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from nrrdd_ext import validation as v


def _check_image_args(x, grad, features, fc_weight, labels, lr, cam_eps, clamp_min, clamp_max):
    v.tensor("x", x, ndim=(4,))
    v.tensor("grad", grad)
    v.same_shape("grad", grad, x.shape, "x")
    v.same_device("grad", grad, x.device)
    if grad.dtype != x.dtype:
        raise TypeError(f"grad has dtype {grad.dtype}, x has {x.dtype}")
    v.features_and_weight(features, fc_weight, labels)
    v.same_device("features", features, x.device)
    if features.shape[0] != x.shape[0]:
        raise ValueError(f"features have batch {features.shape[0]}, x has {x.shape[0]}")
    lr = v.finite("lr", lr)
    cam_eps = v.finite("cam_eps", cam_eps)
    cmin = v.clamp_bounds("clamp_min", clamp_min, x.shape[1], x.device)
    cmax = v.clamp_bounds("clamp_max", clamp_max, x.shape[1], x.device)
    return lr, cam_eps, cmin, cmax


def masked_refine_step(x: torch.Tensor, grad: torch.Tensor, features: torch.Tensor,
                       fc_weight: torch.Tensor, labels: torch.Tensor,
                       exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: torch.Tensor,
                       *, lr: float, betas: Sequence[float] = (0.5, 0.9), eps: float = 1e-8,
                       cam_eps: float = 0.5, clamp_min=None, clamp_max=None,
                       lr_scale: Optional[torch.Tensor] = None) -> None:
    """One masked Adam step, in place on ``x``, ``exp_avg``, ``exp_avg_sq``, ``step``.

    With t = step + 1: m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
    x <- x - M * lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps), where
    M = max(0, cam_eps - CAM_up) broadcast over channels; then x is clamped per
    channel to [clamp_min[c], clamp_max[c]] when given; step <- t.
    ``step`` is a one-element float tensor on x's device (graph-capturable).
    ``lr_scale``, a one-element float tensor on x's device, multiplies ``lr``
    (a schedule that a captured CUDA graph reads at replay).
    """
    lr, cam_eps, cmin, cmax = _check_image_args(x, grad, features, fc_weight, labels, lr,
                                                cam_eps, clamp_min, clamp_max)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {betas!r}")
    b1 = v.finite("betas[0]", betas[0], max_value=1.0, open_max=True)
    b2 = v.finite("betas[1]", betas[1], max_value=1.0, open_max=True)
    eps = v.finite("eps", eps)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        v.tensor(name, t)
        v.same_shape(name, t, x.shape, "x")
        v.same_device(name, t, x.device)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, x has {x.dtype}")
    v.tensor("step", step)
    if step.numel() != 1:
        raise ValueError(f"step must be a one-element tensor, got shape {tuple(step.shape)}")
    v.same_device("step", step, x.device)
    if lr_scale is not None:
        v.tensor("lr_scale", lr_scale)
        if lr_scale.numel() != 1:
            raise ValueError(f"lr_scale must be a one-element tensor, got shape {tuple(lr_scale.shape)}")
        v.same_device("lr_scale", lr_scale, x.device)
    with torch.no_grad():
        cam = torch.ops.nrrdd.cam(features.detach(), fc_weight.detach(), labels)
        torch.ops.nrrdd.masked_adam_step_(x, grad, cam, exp_avg, exp_avg_sq, step, lr_scale,
                                          lr, b1, b2, eps, cam_eps, cmin, cmax)


def masked_sgd_step(x: torch.Tensor, grad: torch.Tensor, features: torch.Tensor,
                    fc_weight: torch.Tensor, labels: torch.Tensor, *, lr: float,
                    cam_eps: float = 0.5, clamp_min=None, clamp_max=None) -> None:
    """Eq. 5 as written, in place: x <- clamp(x - M * lr * g)."""
    lr, cam_eps, cmin, cmax = _check_image_args(x, grad, features, fc_weight, labels, lr,
                                                cam_eps, clamp_min, clamp_max)
    with torch.no_grad():
        cam = torch.ops.nrrdd.cam(features.detach(), fc_weight.detach(), labels)
        torch.ops.nrrdd.masked_sgd_step_(x, grad, cam, lr, cam_eps, cmin, cmax)


class MaskedAdam(torch.optim.Optimizer):
    """Adam whose applied update is scaled by the non-critical mask.

    Each parameter is a batch of images (B,C,H,W); call
    ``opt.step(features=f, fc_weight=w, labels=y)`` after ``backward()``, with the
    features the teacher's head read on this batch. With several parameters, pass
    sequences of features and labels, one per parameter.
    """

    def __init__(self, params, lr: float = 0.05, betas=(0.5, 0.9), eps: float = 1e-8,
                 cam_eps: float = 0.5, clamp_min=None, clamp_max=None):
        v.finite("lr", lr)
        v.finite("cam_eps", cam_eps)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, cam_eps=cam_eps,
                        clamp_min=clamp_min, clamp_max=clamp_max)
        super().__init__(params, defaults)

    def _state_for(self, p):
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None, *, features, fc_weight: torch.Tensor, labels):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        many = len(params) > 1
        if many and not (isinstance(features, (list, tuple)) and len(features) == len(params)):
            raise ValueError(f"MaskedAdam holds {len(params)} image tensors: pass one features "
                             "tensor and one labels tensor per parameter")
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                f, y = (features[i], labels[i]) if many else (features, labels)
                i += 1
                if p.grad is None:
                    continue
                s = self._state_for(p)
                masked_refine_step(p, p.grad, f, fc_weight, y, s["exp_avg"], s["exp_avg_sq"],
                                   s["step"], lr=group["lr"], betas=group["betas"],
                                   eps=group["eps"], cam_eps=group["cam_eps"],
                                   clamp_min=group["clamp_min"], clamp_max=group["clamp_max"])
        return loss
