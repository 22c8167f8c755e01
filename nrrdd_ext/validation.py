"""Argument checks shared by the public ops.

Every check runs before any kernel and raises ``ValueError`` / ``TypeError``
naming the offending argument. Checks read only shapes, dtypes and devices
(never tensor values), so they work on fake tensors under ``torch.compile`` and
never synchronise a CUDA stream. Label ranges are checked inside the kernels
(an error on CPU, a device-side assert on CUDA).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, *, ndim: Optional[Iterable[int]] = None, floating: bool = True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ndim = tuple(ndim)
        if t.dim() not in ndim:
            want = " or ".join(str(n) for n in ndim)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def labels(name: str, t, batch: int, device: torch.device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 class indices")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 class indices, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    same_device(name, t, device)
    return t


def same_device(name: str, t: torch.Tensor, device: torch.device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")


def same_shape(name: str, t: torch.Tensor, shape, other: str):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like {other}")


def finite(name: str, value, *, min_value: float = 0.0, max_value: float = math.inf,
           open_max: bool = False):
    if isinstance(value, torch.SymFloat):  # torch.compile(dynamic=True): comparisons become guards
        v = value
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {value!r}") from None
    if v != v or v == math.inf or v == -math.inf:  # not math.isfinite: that cannot take a SymFloat
        raise ValueError(f"{name} must be finite, got {v}")
    if v < min_value or v > max_value or (open_max and v >= max_value):
        hi = f"< {max_value}" if open_max else f"<= {max_value}"
        raise ValueError(f"{name} must be >= {min_value} and {hi}, got {v}")
    return v


def reduction(value: str):
    if value not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {value!r}")
    return value


def features_and_weight(features, fc_weight, labels_t):
    """CAM inputs: features (B,K,h,w); fc_weight (classes,K) or (classes,K,h,w)."""
    tensor("features", features, ndim=(4,))
    tensor("fc_weight", fc_weight, ndim=(2, 4))
    same_device("fc_weight", fc_weight, features.device)
    B, K, h, w = features.shape
    if fc_weight.shape[1] != K:
        raise ValueError(f"fc_weight has {fc_weight.shape[1]} input channels, features have {K}")
    if fc_weight.dim() == 4 and tuple(fc_weight.shape[2:]) != (h, w):
        raise ValueError(f"fc_weight's spatial size {tuple(fc_weight.shape[2:])} (flatten head) "
                         f"does not match the features' ({h}, {w})")
    if fc_weight.shape[0] < 1:
        raise ValueError("fc_weight must have at least one class row")
    if h * w < 1:
        raise ValueError(f"features must have a non-empty spatial size, got ({h}, {w})")
    labels("labels", labels_t, B, features.device)


def clamp_bounds(name: str, t, channels: int, device: torch.device):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(channels)
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must hold one bound per channel ({channels}), got shape {tuple(t.shape)}")
    same_device(name, t, device)
    return t.to(torch.float32).contiguous()
