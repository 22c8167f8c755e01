"""The BatchNorm-statistic loss (paper Eq. 3), its folded form, and hooks that apply them to a model."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.nn as nn

from nrrdd_ext import validation as v
from nrrdd_ext.bn_fold import FoldedBatchNorm2d


def bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor,
                 running_var: torch.Tensor) -> torch.Tensor:
    """||mu(x) - running_mean||_2 + ||var(x) - running_var||_2.

    Per-channel statistics of x (N,C,*) over every dim but 1, biased variance,
    computed in one read of x with float32 accumulation (float64 for float64
    input), Welford-merged so a large mean does not cancel. Differentiable
    w.r.t. x (and the running statistics). Returns a 0-dim float32 tensor
    (float64 for float64 input).
    """
    v.tensor("x", x, ndim=(2, 3, 4, 5))
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        v.tensor(name, t, ndim=(1,))
        if t.shape[0] != C:
            raise ValueError(f"{name} has {t.shape[0]} channels, x has {C}")
        v.same_device(name, t, x.device)
    return torch.ops.nrrdd.bn_stat_loss(x, running_mean, running_var)[0]


def folded_bn_stat_loss(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """The BN-statistic loss of x = (y - shift) / scale, read from y.

    ``y`` is the output of a conv with a BatchNorm folded into it (y = scale * x
    + shift per channel, :func:`nrrdd_ext.fold_batchnorm`); the statistics of y
    are taken in one read as by :func:`bn_stat_loss` and mapped back to x's:
    mean_x = (mean_y - shift) / scale, var_x = var_y / scale^2. Differentiable
    w.r.t. y only (scale, shift and the running statistics are the frozen
    teacher's). No element of ``scale`` may be zero.
    """
    v.tensor("y", y, ndim=(2, 3, 4, 5))
    C = y.shape[1]
    for name, t in (("scale", scale), ("shift", shift), ("running_mean", running_mean),
                    ("running_var", running_var)):
        v.tensor(name, t, ndim=(1,))
        if t.shape[0] != C:
            raise ValueError(f"{name} has {t.shape[0]} channels, y has {C}")
        v.same_device(name, t, y.device)
        if t.requires_grad:
            raise ValueError(f"folded_bn_stat_loss is differentiable w.r.t. y only; {name} requires grad")
    if not torch.compiler.is_compiling() and bool((scale == 0).any()):  # eager only: no sync in graphs
        raise ValueError("scale has a zero channel: that BatchNorm cannot be read through its folded conv")
    return torch.ops.nrrdd.folded_bn_stat_loss(y, scale, shift, running_mean, running_var)[0]


class BNStatHooks:
    """Hooks every BatchNorm layer of ``model`` and sums the fused statistic loss.

    A drop-in for SRe2L's ``BNFeatureHook`` list::

        with BNStatHooks(teacher, first_multiplier=2.0) as hooks:
            logits = teacher(x)
            loss = ce + alpha_bn * hooks.loss()

    Each forward overwrites each layer's term, as SRe2L's hooks do. The first
    BatchNorm in ``model.modules()`` order is weighted by ``first_multiplier``.
    A model from :func:`nrrdd_ext.fold_batchnorm` works the same: each
    :class:`~nrrdd_ext.bn_fold.FoldedBatchNorm2d` contributes the folded loss
    of its input (the folded conv's output), in its BatchNorm's place.
    ``with hooks.paused():`` runs forwards that leave the terms alone (the
    CutMix pass of NRR).
    """

    def __init__(self, model: nn.Module, first_multiplier: float = 1.0):
        self.first_multiplier = v.finite("first_multiplier", first_multiplier)
        self.layers = [m for m in model.modules()
                       if isinstance(m, (nn.modules.batchnorm._BatchNorm, FoldedBatchNorm2d))]
        if not self.layers:
            raise ValueError("model has no BatchNorm layer to hook")
        self.terms: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self._handles = []
        self._active = True

    def __enter__(self):
        for i, m in enumerate(self.layers):
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"BatchNorm layer {i} ({m}) tracks no running statistics")
            for name in ("running_mean", "running_var"):
                v.tensor(f"layer {i} {name}", getattr(m, name), ndim=(1,))
            self._handles.append(m.register_forward_hook(self._make_hook(i)))
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, i):
        # The layer's statistics were checked in __enter__ and the kernel checks x
        # against them, so the hook calls the op directly (it runs every forward).
        if isinstance(self.layers[i], FoldedBatchNorm2d):
            folded = torch.ops.nrrdd.folded_bn_stat_loss

            def hook(module, inputs, output):
                if self._active:
                    self.terms[i] = folded(inputs[0], module.scale, module.shift,
                                           module.running_mean, module.running_var)[0]
                    if module.protect_output:  # the op saved y: later in-place writes get a copy
                        return output.clone()
            return hook
        op = torch.ops.nrrdd.bn_stat_loss

        def hook(module, inputs, output):
            if self._active:
                self.terms[i] = op(inputs[0], module.running_mean, module.running_var)[0]
        return hook

    @contextlib.contextmanager
    def paused(self):
        self._active, before = False, self._active
        try:
            yield self
        finally:
            self._active = before

    def clear(self):
        self.terms = [None] * len(self.layers)

    def loss(self) -> torch.Tensor:
        """Sum of the layers' terms from the latest forward, the first weighted."""
        if any(t is None for t in self.terms):
            missing = sum(t is None for t in self.terms)
            raise RuntimeError(f"{missing} hooked BatchNorm layers saw no forward pass yet")
        total = self.first_multiplier * self.terms[0]
        for t in self.terms[1:]:
            total = total + t
        return total
