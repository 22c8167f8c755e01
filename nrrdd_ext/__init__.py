"""nrrdd_ext: fused C++/CUDA ops for NRR-DD dataset distillation.

Ops (all registered under ``torch.ops.nrrdd``, with CPU and CUDA kernels,
autograd and fake kernels, so ``torch.compile`` and CUDA graphs see them):

- :func:`class_activation_map`, :func:`non_critical_mask` (Eqs. 1, 4)
- :func:`masked_refine_step`, :func:`masked_sgd_step`, :class:`MaskedAdam` (Eq. 5)
- :func:`bn_stat_loss`, :class:`BNStatHooks` (Eq. 3); :func:`fold_batchnorm`
  and :func:`folded_bn_stat_loss`, the same loss read from a conv with the
  BatchNorm folded in
- :func:`dbr_distances`, :func:`dbr_loss`, :class:`DBRLoss` (Eqs. 8-10)
- :func:`label_refine_loss` (Eq. 12)

``nrrdd_ext.reference`` states each op in plain PyTorch.
"""
from nrrdd_ext import _registration  # noqa: F401
from nrrdd_ext import reference
from nrrdd_ext.bn_fold import FoldReport, FoldedBatchNorm2d, FoldingError, fold_batchnorm
from nrrdd_ext.bn_stats import BNStatHooks, bn_stat_loss, folded_bn_stat_loss
from nrrdd_ext.cam import class_activation_map, non_critical_mask
from nrrdd_ext.dbr import DBRLoss, dbr_distances, dbr_loss, label_refine_loss
from nrrdd_ext.refine_step import MaskedAdam, masked_refine_step, masked_sgd_step

__version__ = "0.1.0"


def cuda_kernels_built() -> bool:
    """Whether this build carries the CUDA kernels."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("nrrdd::cam", "CUDA")


__all__ = [
    "BNStatHooks", "DBRLoss", "FoldReport", "FoldedBatchNorm2d", "FoldingError", "MaskedAdam",
    "bn_stat_loss", "class_activation_map", "cuda_kernels_built", "dbr_distances", "dbr_loss",
    "fold_batchnorm", "folded_bn_stat_loss", "label_refine_loss",
    "masked_refine_step", "masked_sgd_step", "non_critical_mask", "reference",
]
