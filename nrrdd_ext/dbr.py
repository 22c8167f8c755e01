"""Distance-based relabeling (paper Eqs. 8-10) and the label-refinement hinge (Eq. 12).

One pass per row computes the log-sum-exp, both cross-entropy distances, the
row's loss and the coefficients its gradient needs; the backward is one pass
that forms softmax(logits) * (c_org + c_aug) - c_org * e_org - c_aug * e_aug.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nrrdd_ext import validation as v


def _check_logits(logits, y_org, y_aug):
    v.tensor("logits", logits, ndim=(2,))
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one class column")
    B = logits.shape[0]
    v.labels("y_org", y_org, B, logits.device)
    v.labels("y_aug", y_aug, B, logits.device)


def _reduce(rows, reduction):
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def dbr_distances(logits: torch.Tensor, y_org: torch.Tensor, y_aug: torch.Tensor):
    """(d_org, d_aug) = (CE(logits, y_org), CE(logits, y_aug)) per row (Eq. 8).

    float32 for float32/float16/bfloat16 logits, float64 for float64.
    """
    _check_logits(logits, y_org, y_aug)
    d_org, d_aug, _ = torch.ops.nrrdd.ce_pair(logits, y_org, y_aug)
    return d_org, d_aug


def dbr_loss(logits: torch.Tensor, y_org: torch.Tensor, y_aug: torch.Tensor,
             d_org_t: torch.Tensor, d_aug_t: torch.Tensor, r: float = 0.4, alpha: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    """max(0, d_org - r) + max(0, d_aug - r) + alpha (|d_org - d_org_t| + |d_aug - d_aug_t|)."""
    _check_logits(logits, y_org, y_aug)
    B = logits.shape[0]
    for name, t in (("d_org_t", d_org_t), ("d_aug_t", d_aug_t)):
        v.tensor(name, t, ndim=(1,))
        if t.shape[0] != B:
            raise ValueError(f"{name} has {t.shape[0]} rows, logits have {B}")
        v.same_device(name, t, logits.device)
    r = v.finite("r", r)
    alpha = v.finite("alpha", alpha)
    v.reduction(reduction)
    rows = torch.ops.nrrdd.dbr_rows(logits, y_org, y_aug, d_org_t, d_aug_t, r, alpha)[0]
    return _reduce(rows, reduction)


def label_refine_loss(logits: torch.Tensor, y_org: torch.Tensor, y_aug: torch.Tensor,
                      r: float = 0.4, reduction: str = "mean") -> torch.Tensor:
    """L_lr = max(0, d_org - r) + max(0, d_aug - r) (Eq. 12)."""
    _check_logits(logits, y_org, y_aug)
    r = v.finite("r", r)
    v.reduction(reduction)
    rows = torch.ops.nrrdd.dbr_rows(logits, y_org, y_aug, None, None, r, 0.0)[0]
    return _reduce(rows, reduction)


class DBRLoss(nn.Module):
    """``nn.Module`` form of :func:`dbr_loss`."""

    def __init__(self, r: float = 0.4, alpha: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.r = v.finite("r", r)
        self.alpha = v.finite("alpha", alpha)
        self.reduction = v.reduction(reduction)

    def forward(self, logits, y_org, y_aug, d_org_t, d_aug_t):
        return dbr_loss(logits, y_org, y_aug, d_org_t, d_aug_t, self.r, self.alpha, self.reduction)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, reduction={self.reduction!r}"
