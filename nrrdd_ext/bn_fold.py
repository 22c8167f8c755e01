"""Folding a frozen teacher's BatchNorm layers into the convs before them.

In eval mode a BatchNorm is the per-channel affine map y = s x + t with
s = gamma / sqrt(running_var + eps) and t = beta - s * running_mean. When it
reads a conv's output, it folds into that conv (W' = s W, b' = s b + t) and no
BatchNorm kernel runs. The BN-statistic loss still needs the statistics of the
BatchNorm's input x; they follow from the folded conv's output y:
mean_x = (mean_y - t) / s, var_x = var_y / s^2 (:func:`folded_bn_stat_loss`).
Each folded BatchNorm is replaced by a :class:`FoldedBatchNorm2d`, an identity
that carries s, t and the running statistics, so :class:`BNStatHooks` finds it
where the BatchNorm was (the first-layer multiplier still lands on the first).

Which BatchNorm reads which conv is observed, not guessed: one probe forward
records each conv's output tensor and each BatchNorm's input tensor. A pair
folds when both run once and the BatchNorm's input *is* the conv's output.

In-place ops. A BatchNorm wrote a new tensor, so an in-place op after it
(torchvision's ``ReLU(inplace=True)``, its ResNet blocks' ``out += identity``)
left the conv's output alone; with the BatchNorm folded away, that op would
overwrite the folded conv's output, which the statistics' backward reads. So
the folded copy has every activation module's ``inplace`` flag off (one new
tensor per activation, as the BatchNorm's output was), and a folded layer
whose output the probe forward still sees overwritten (its version counter
moves) is marked ``protect_output``: while :class:`BNStatHooks` records its
term, the layer hands on a copy (the write a BatchNorm made anyway, without
its statistics pass or its backward). One backward of the BN-statistic loss
then checks the fold.

Precision guard. Recovering x's statistics from y loses what y's rounding
loses: y carries x's spread s * std(x) on top of an offset of about
|t| + |s| |running_mean|, so the statistics are good to roughly
u * amplification standard deviations of x, u the unit roundoff of y's dtype
and amplification = (|t| + |s| (|running_mean| + std)) / (|s| std) per channel,
std = sqrt(running_var + eps). A layer whose largest channel amplification
exceeds ``max_amplification`` is not folded (it stays a BatchNorm and is hooked
as one). The default 0.05 / u(bfloat16) = 12.8 bounds that error to about 5% of
a standard deviation for bf16 activations; a layer with gamma near zero in some
channel (a dead channel) has a huge amplification and stays unfolded.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

BF16_ROUNDOFF = 2.0 ** -8
DEFAULT_MAX_AMPLIFICATION = 0.05 / BF16_ROUNDOFF
# Folded and original logits must agree to this fraction of the largest logit
# (float64 check of the float32 fold); a wrong pairing is off by O(1).
CHECK_RTOL = 1e-4


class FoldingError(RuntimeError):
    """The folded model does not reproduce the original's logits."""


class FoldedBatchNorm2d(nn.Module):
    """Where a folded BatchNorm was: the identity on its input y = s x + t (the
    folded conv's output), carrying s (``scale``), t (``shift``) and the
    BatchNorm's running statistics for the BN-statistic loss."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, running_mean: torch.Tensor,
                 running_var: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("running_mean", running_mean.detach().clone())
        self.register_buffer("running_var", running_var.detach().clone())

        # set by fold_batchnorm when the model writes into this layer's output in place
        self.protect_output = False

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, protect_output={self.protect_output}"


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: the BatchNorm layers folded (by module
    name, with the conv each went into), those kept and why, and the largest
    logit difference of the float64 check relative to the largest logit."""

    folded: Dict[str, str] = field(default_factory=dict)
    kept: Dict[str, str] = field(default_factory=dict)
    max_amplification: float = DEFAULT_MAX_AMPLIFICATION
    check_error: float = float("nan")

    def summary(self) -> str:
        return (f"{len(self.folded)} of {len(self.folded) + len(self.kept)} BatchNorm layers folded"
                + (f"; kept: {', '.join(f'{k} ({v})' for k, v in self.kept.items())}" if self.kept else ""))

    def as_dict(self) -> dict:
        return {"folded": dict(self.folded), "kept": dict(self.kept),
                "max_amplification": self.max_amplification, "check_error": self.check_error}


def bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of an eval-mode BatchNorm, in float64: y = s x + t."""
    rv = bn.running_var.detach().double()
    rm = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(rv)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(rv)
    s = gamma / torch.sqrt(rv + bn.eps)
    return s, beta - s * rm


def amplification(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per channel, how many of x's standard deviations one unit of y's relative
    rounding costs the recovered statistics (module docstring); inf where s = 0."""
    s, t = bn_affine(bn)
    std = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    spread = s.abs() * std
    offset = t.abs() + s.abs() * (bn.running_mean.detach().double().abs() + std)
    return torch.where(spread > 0, offset / spread.clamp_min(1e-300), torch.full_like(s, float("inf")))


def _foldable_bn(m: nn.Module) -> bool:
    # exactly a BatchNorm (a subclass such as timm's BatchNormAct2d does more than the affine map)
    return type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm) and m.running_mean is not None


def _probe(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One no-grad forward of ``example`` with the hooks ``handles``, removed after."""
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> Tuple[Dict[str, str], Dict[str, str]]:
    """{bn name: conv name} for each BatchNorm whose input is a conv's output,
    observed in one eval forward of ``example``; and {bn name: why not} for the rest."""
    names = {m: n for n, m in model.named_modules()}
    outputs: Dict[int, Tuple[str, torch.Tensor]] = {}  # id -> (conv, tensor kept alive: ids stay unique)
    calls: Dict[str, int] = {}
    bn_input: Dict[str, str] = {}
    handles = []

    def conv_hook(m, inputs, out):
        n = names[m]
        calls[n] = calls.get(n, 0) + 1
        outputs[id(out)] = (n, out)

    def bn_hook(m, inputs):
        n = names[m]
        calls[n] = calls.get(n, 0) + 1
        hit = outputs.get(id(inputs[0]))
        bn_input[n] = hit[0] if hit is not None and hit[1] is inputs[0] else ""

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
    for m in bns:
        handles.append(m.register_forward_pre_hook(bn_hook))
    _probe(model, example, handles)
    pairs, kept = {}, {}
    for m in bns:
        n = names[m]
        if not _foldable_bn(m):
            kept[n] = f"{type(m).__name__} is not a plain BatchNorm2d"
        elif calls.get(n, 0) != 1:
            kept[n] = f"runs {calls.get(n, 0)} times per forward"
        elif not bn_input.get(n):
            kept[n] = "its input is not a conv's output"
        elif calls.get(bn_input[n], 0) != 1:
            kept[n] = f"its conv {bn_input[n]} runs {calls[bn_input[n]]} times per forward"
        else:
            pairs[n] = bn_input[n]
    return pairs, kept


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> FoldedBatchNorm2d:
    s, t = bn_affine(bn)
    w = conv.weight
    conv.weight.copy_((w.double() * s.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(s)
    conv.bias = nn.Parameter((s * b + t).to(w.dtype), requires_grad=False)
    return FoldedBatchNorm2d(s.to(w.dtype), t.to(w.dtype), bn.running_mean, bn.running_var)


@torch.no_grad()
def _check(original: nn.Module, folded: nn.Module, example: torch.Tensor) -> float:
    """Largest |logit difference| / (largest |logit| + 1e-12), in float64 on the CPU."""
    a = copy.deepcopy(original).to("cpu", torch.float64).eval()
    b = copy.deepcopy(folded).to("cpu", torch.float64).eval()
    x = example.detach().to("cpu", torch.float64)
    la, lb = a(x), b(x)
    return float((la - lb).abs().max() / (la.abs().max() + 1e-12))


def _mark_overwritten_outputs(folded: nn.Module, example: torch.Tensor) -> None:
    """``protect_output`` on each folded layer whose output the forward overwrites."""
    seen = {}

    def hook(m, inputs, output):
        seen[m] = (inputs[0], inputs[0]._version)

    layers = folded_layers(folded)
    _probe(folded, example, [m.register_forward_hook(hook) for m in layers])
    for m in layers:
        t, version = seen.get(m, (None, 0))
        m.protect_output = t is not None and t._version != version


def _check_backward(folded: nn.Module, example: torch.Tensor) -> None:
    """One backward of the BN-statistic loss of ``folded``: no op may have
    overwritten a folded conv's output that the loss's backward reads."""
    from nrrdd_ext.bn_stats import BNStatHooks

    x = example.detach().clone().requires_grad_(True)
    with BNStatHooks(folded) as hooks:
        folded(x)
        try:
            torch.autograd.grad(hooks.loss(), x)
        except RuntimeError as e:
            if "inplace" not in str(e):
                raise
            raise FoldingError("an in-place op in the model's forward overwrites a folded conv's "
                               f"output that the BN-statistic loss needs: use the model unfolded ({e})") from None


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor, *,
                   max_amplification: float = DEFAULT_MAX_AMPLIFICATION,
                   check: bool = True) -> Tuple[nn.Module, FoldReport]:
    """A copy of the eval-mode ``model`` with each foldable BatchNorm folded into
    the conv it reads (module docstring), and the :class:`FoldReport`.

    ``example_input``: a small batch of the model's input shape (random values
    do); it drives the probe forward and the check that the folded model's
    logits equal the original's (float64, relative error below 1e-4 of the
    largest logit; :class:`FoldingError` otherwise). The original is not changed.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 3:
        raise ValueError("example_input must be a batch of the model's input (B, C, ...)")
    if not max_amplification > 0:
        raise ValueError(f"max_amplification must be positive, got {max_amplification}")
    was_training = model.training
    model.eval()
    try:
        folded = copy.deepcopy(model).eval()
        pairs, kept = _conv_bn_pairs(folded, example_input)
        report = FoldReport(kept=kept, max_amplification=float(max_amplification))
        for bn_name, conv_name in pairs.items():
            bn = folded.get_submodule(bn_name)
            amp = float(amplification(bn).max())
            if not amp <= max_amplification:
                report.kept[bn_name] = f"amplification {amp:.3g} > {max_amplification:.3g}"
                continue
            _set_module(folded, bn_name, _fold_pair(folded.get_submodule(conv_name), bn))
            report.folded[bn_name] = conv_name
        if report.folded:
            for m in folded.modules():
                if isinstance(getattr(m, "inplace", None), bool):
                    m.inplace = False
            _mark_overwritten_outputs(folded, example_input)
        for p in folded.parameters():
            p.requires_grad_(False)
        if check:
            if report.folded:
                _check_backward(folded, example_input)
            report.check_error = _check(model, folded, example_input)
            if not report.check_error <= CHECK_RTOL:
                raise FoldingError(
                    f"the folded model's logits differ from the original's by {report.check_error:.3g} "
                    f"of the largest logit (allowed {CHECK_RTOL}): a conv output feeds more than its "
                    "BatchNorm; use the model unfolded")
    finally:
        model.train(was_training)
    return folded, report


def folded_layers(model: nn.Module) -> List[FoldedBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, FoldedBatchNorm2d)]
