"""Class activation maps and the non-critical mask (paper Eqs. 1 and 4)."""
from __future__ import annotations

from typing import Sequence

import torch

from nrrdd_ext import validation as v


def class_activation_map(features: torch.Tensor, fc_weight: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalised CAM, (B,K,h,w) -> (B,h,w).

    c[b] = sum_k fc_weight[labels[b], k] * features[b, k]; ``fc_weight`` is
    (classes, K) for a pooled head or (classes, K, h, w) for a flatten head.
    Then (c - min c) / (max c - min c + 1e-8), without ReLU.
    """
    v.features_and_weight(features, fc_weight, labels)
    return torch.ops.nrrdd.cam(features, fc_weight, labels)


def non_critical_mask(features: torch.Tensor, fc_weight: torch.Tensor, labels: torch.Tensor,
                      size: Sequence[int], eps: float = 0.5) -> torch.Tensor:
    """M = max(0, eps - C_up), (B,1,H,W): the CAM normalised, then upsampled
    bilinearly to ``size`` (``F.interpolate``, align_corners=False)."""
    v.features_and_weight(features, fc_weight, labels)
    size = _size(size)
    eps = v.finite("eps", eps)
    cam = torch.ops.nrrdd.cam(features, fc_weight, labels)
    return torch.ops.nrrdd.non_critical_mask(cam, size, eps)


def _size(size) -> list:
    try:
        size = [int(s) for s in size]
    except TypeError:
        raise TypeError(f"size must be a pair (H, W), got {size!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a pair of positive ints (H, W), got {size}")
    return size
