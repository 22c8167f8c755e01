"""torch.distributed plumbing for ``torchrun``: one process per device, no-op without torchrun.

``torchrun --nproc-per-node N -m nrrdd distill|relabel|evaluate ...`` starts N
processes with RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) in
their environment. :func:`init_from_env` (called by ``nrrdd.cli`` for those three
commands) joins the process group: NCCL when the run's device is CUDA (rank r
uses ``cuda:LOCAL_RANK``), gloo on the CPU. Without those variables, or with
WORLD_SIZE 1, nothing is initialised and every helper below behaves as in a
single process (rank 0 of 1), so single-process runs are unchanged.

Control traffic (barriers, small Python objects broadcast from rank 0, scalar
sums) goes over a gloo group, also on NCCL runs, so it never touches the GPU
streams. Every group gets the timeout of ``NRRDD_DIST_TIMEOUT`` (seconds,
default 3600): a rank waiting at a barrier for longer than that (a peer lost
with its node) fails instead of hanging forever. A rank that raises exits
non-zero and ``torchrun`` then stops the others.

The output folder (``--out`` of distill, the distilled folder of relabel and
evaluate) must be one folder that every rank sees (a local disk for one node, a
shared file system across nodes): ranks exchange finished work through files in
it.

:func:`sync_batchnorm` / :func:`wrap_ddp` turn a student into a data-parallel
one whose BatchNorm statistics span the whole global batch (torch's
``SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` on the CPU, which torch's
does not support), so its gradients are those of the single-process run.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, List, Optional, Sequence, TypeVar

import torch
import torch.nn as nn

T = TypeVar("T")

TIMEOUT_ENV = "NRRDD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0

_control = None  # the gloo group for barriers and objects (the default group on gloo runs)


# ------------------------------------------------------------------ set-up
def env_world() -> int:
    """WORLD_SIZE from the environment (1 when not started by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def timeout() -> datetime.timedelta:
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        seconds = DEFAULT_TIMEOUT_S
    return datetime.timedelta(seconds=max(1.0, seconds))


def _is_cuda(device: Optional[str]) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def init_from_env(device: Optional[str] = None) -> bool:
    """Join the process group torchrun describes; returns whether this is a multi-rank run.

    ``device`` is the command's ``--device`` (None: CUDA when available): CUDA
    runs use NCCL and ``cuda:LOCAL_RANK``, CPU runs gloo.
    """
    global _control
    import torch.distributed as dist

    if "RANK" not in os.environ or env_world() <= 1:
        return False
    if dist.is_initialized():
        return True
    to = timeout()
    if _is_cuda(device) and torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", timeout=to)
        _control = dist.new_group(backend="gloo", timeout=to)
    else:
        dist.init_process_group("gloo", timeout=to)
        _control = None
    return True


def destroy() -> None:
    """Leave the process group (no-op when none was joined)."""
    global _control
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def active() -> bool:
    """True in a multi-rank run whose process group is up."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    return rank() == 0


def local_device(name: Optional[str]) -> Optional[str]:
    """The device a rank works on: ``cuda`` (or no choice, on a CUDA machine)
    becomes ``cuda:LOCAL_RANK`` in a multi-rank run; anything else is kept."""
    if not active():
        return name
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank()}" if name == "cuda" else name


# ------------------------------------------------------------ collectives
def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    import torch.distributed as dist

    if active():
        dist.barrier(group=_control)


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a picklable Python object)."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def all_sum(value: float) -> float:
    """The sum of ``value`` over the ranks (float64)."""
    import torch.distributed as dist

    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, group=_control)
    return float(t[0])


class PeerFailed(RuntimeError):
    """Rank 0 failed in a step it ran for everyone; its error is reported by rank 0."""


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    For steps that must happen once (deciding what to do with the output
    folder, listing finished work): a :class:`nrrdd.errors.UsageError` raised
    there is raised on every rank, any other error raises :class:`PeerFailed`
    on the other ranks, so no rank is left waiting.
    """
    from nrrdd.errors import UsageError

    if not active():
        return fn()
    if is_main():
        try:
            result = fn()
        except UsageError as e:
            broadcast(("usage", str(e)))
            raise
        except BaseException as e:
            broadcast(("error", f"{type(e).__name__}: {e}"))
            raise
        broadcast(("ok", result))
        return result
    kind, value = broadcast(None)
    if kind == "usage":
        raise UsageError(value)
    if kind == "error":
        raise PeerFailed(f"rank 0 failed: {value}")
    return value


def shard(items: Sequence[T]) -> List[T]:
    """This rank's share of ``items``: every world-th item from position rank
    (round-robin, so the shares differ by at most one item)."""
    return list(items)[rank()::world()]


def split_range(n: int) -> tuple[int, int]:
    """This rank's contiguous part [lo, hi) of n items (sizes differ by at most one)."""
    w, r = world(), rank()
    return n * r // w, n * (r + 1) // w


# --------------------------------------------------- data-parallel students
class _SyncBatchNormFn(torch.autograd.Function):
    """BatchNorm over the union of every rank's batch (sums all-reduced in float64)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        import torch.distributed as dist

        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        x64 = x.double()
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims),
                           torch.tensor([x.numel() // max(C, 1)], dtype=torch.float64)])
        dist.all_reduce(stats, group=group)
        n = float(stats[-1])
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)}")
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0.0)
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_((momentum * mean).to(running_mean.dtype))
            running_var.mul_(1.0 - momentum).add_((momentum * var * (n / (n - 1))).to(running_var.dtype))
        shape = [1, C] + [1] * (x.dim() - 2)
        invstd = (var + eps).rsqrt()
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
        y = xhat.clone()  # the output may be changed in place (ReLU(inplace=True)); xhat is saved
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype))
        ctx.group, ctx.n = group, n
        return y

    @staticmethod
    def backward(ctx, gy):
        import torch.distributed as dist

        xhat, weight, invstd = ctx.saved_tensors
        C = xhat.shape[1]
        dims = [0] + list(range(2, xhat.dim()))
        shape = [1, C] + [1] * (xhat.dim() - 2)
        local = torch.cat([gy.double().sum(dims), (gy.double() * xhat.double()).sum(dims)])
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)
        mean_g = (total[:C] / ctx.n).to(gy.dtype).view(shape)
        mean_gx = (total[C:] / ctx.n).to(gy.dtype).view(shape)
        scale = invstd if weight is None else invstd * weight
        gx = (gy - mean_g - xhat * mean_gx) * scale.view(shape)
        gw = gb = None
        if weight is not None:
            # this rank's share; DistributedDataParallel averages the shares
            gw, gb = local[C:].to(weight.dtype), local[:C].to(weight.dtype)
        return gx, gw, gb, None, None, None, None, None


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training-mode statistics span every rank (gloo all-reduce).

    Same parameters, buffers and state-dict keys as the ``BatchNorm*d`` it
    replaces; in eval mode, or outside a multi-rank run, it is that BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = self.track_running_stats
        return _SyncBatchNormFn.apply(input, self.weight, self.bias,
                                      self.running_mean if tracked else None,
                                      self.running_var if tracked else None,
                                      self.eps, factor, None)


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if type(module) in _PLAIN_BN:
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


def sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` with BatchNorm statistics over the global batch (unchanged in a single process).

    CUDA: torch's ``SyncBatchNorm`` (timm's converter when timm is installed, so
    its BatchNormAct layers keep their activation). CPU: :class:`CpuSyncBatchNorm`
    for the plain ``BatchNorm1d/2d/3d`` layers (other norm layers stay per-rank).
    """
    if not active():
        return model
    if torch.device(device).type == "cuda":
        try:
            from timm.layers import convert_sync_batchnorm
        except ImportError:
            convert_sync_batchnorm = nn.SyncBatchNorm.convert_sync_batchnorm
        return convert_sync_batchnorm(model)
    return _convert_cpu(model)


def wrap_ddp(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``DistributedDataParallel(model)`` in a multi-rank run, else ``model`` itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(device)
    if dev.type == "cuda":
        return DistributedDataParallel(model, device_ids=[dev.index if dev.index is not None
                                                          else torch.cuda.current_device()])
    return DistributedDataParallel(model)
