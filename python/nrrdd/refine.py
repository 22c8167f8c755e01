"""NRR: non-critical region refinement (paper Sec. 3.3, Eqs. 2-5, 11-12).

One iteration on a batch x (B,C,H,W, normalised) with labels y and the frozen,
eval-mode teacher T:

1. forward x with :class:`nrrdd_ext.BNStatHooks` active; from this one forward
   come the logits, the BN-statistic loss (Eq. 3) and the features the head
   reads (for the CAM, Eq. 1):
       L_1 = CE(T(x), y) + alpha_bn * L_bn(T(x)),
   with L_bn = first_bn_multiplier * l_1 + sum_{l>1} l_l,
   l_l = ||mu_l(x) - mu_l||_2 + ||sigma^2_l(x) - sigma^2_l||_2;
   backward (gradients land in x.grad);
2. x_mix = CutMix(x, x[perm]): one box for the batch, pixels inside it from the
   partner x[perm[i]] (perm a random permutation of the batch); forward under
   ``hooks.paused()`` (the BN terms of step 1 stay);
       L_2 = alpha_lr * L_lr(T(x_mix), y, y[perm]),
   L_lr = max(0, CE(., y) - r) + max(0, CE(., y[perm]) - r) (Eq. 12);
   backward, accumulating into x.grad. L_C = L_1 + L_2 (Eq. 11): two backwards
   one after the other, so peak memory holds one pass's activations, not two;
   the gradient equals that of one backward of L_C (tested in float64);
3. the masked Adam step of :func:`nrrdd_ext.masked_refine_step` (Eqs. 4-5):
   M = max(0, eps - CAM_up(features of step 1)); x <- clamp(x - M * lr_t *
   m_hat / (sqrt(v_hat) + 1e-8)) with Adam's moments on the raw gradient, the
   clamp to the valid pixel range; lr_t = lr * 0.5 (1 + cos(pi t / iterations))
   through ``lr_scale`` (SRe2L's cosine policy).

``mask='none'`` (the SRe2L-style all-pixel update of the ablation) runs the
same Adam step with the all-ones mask through
``nrrdd_ext.reference.masked_adam_step`` (pure PyTorch), passing the cosine
factor lr_t / lr as the mask, since that function takes no ``lr_scale``.

Defaults (:class:`RefineConfig`) are the paper's: eps = 0.5, r = 0.4,
alpha_lr = 1, Adam lr 0.05, betas (0.5, 0.9), 2000 iterations; alpha_bn = 0.01
and first_bn_multiplier = 10 are SRe2L's recover defaults (``--r-bn 0.01``,
``--first-bn-multiplier 10``), which Appendix A of the paper follows.

The fast path (``fold_bn``, ``bf16``, ``channels_last`` and ``cuda_graph``;
:func:`fast_config`, what ``nrrdd distill --fast`` runs): the teacher's
BatchNorm layers are folded into its convs (:func:`nrrdd_ext.fold_batchnorm`;
the BN-statistic loss is then read from the folded conv outputs by
:func:`nrrdd_ext.folded_bn_stat_loss`, so no BatchNorm kernel runs), the two
passes run under bf16 autocast with channels_last activations, and the whole
iteration is one CUDA graph. The images, Adam's moments, the losses and the
mask stay float32. On the CPU only the fold applies (float32).

Every random draw (the permutation and the box of each iteration) is made up
front from a CPU generator into per-iteration tensors on the device; the
iteration reads row ``step mod iterations`` of them, and the cosine factor from
``step``, inside the computation. So the whole iteration has static shapes and
no host synchronisation, a CUDA graph of it replays correctly (each replay
reads the next row), and eager and graph runs give the same numbers.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nrrdd.models import cam_interface

MASK_MODES = ("cam", "none")
LOSS_NAMES = ("ce", "bn", "lr", "total")


@dataclass
class RefineConfig:
    iterations: int = 2000
    lr: float = 0.05
    betas: Tuple[float, float] = (0.5, 0.9)
    adam_eps: float = 1e-8
    cam_eps: float = 0.5
    r: float = 0.4
    alpha_lr: float = 1.0
    alpha_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    mask: str = "cam"
    label_refine: bool = True
    cuda_graph: bool = False
    fold_bn: bool = False
    bf16: bool = False
    channels_last: bool = False
    graph_warmup: int = 3
    log_every: int = 100

    def __post_init__(self):
        if self.mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES}, got {self.mask!r}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        self.betas = tuple(self.betas)

    def as_dict(self) -> dict:
        return asdict(self)


def fast_config(config: RefineConfig, device: torch.device | str) -> RefineConfig:
    """``config`` with the fast path on: the BatchNorm fold and channels_last
    activations, and on CUDA bf16 autocast and the CUDA graph too (the CPU path
    stays float32: the same images to float32 noise)."""
    cuda = torch.device(device).type == "cuda"
    return RefineConfig(**{**config.as_dict(), "fold_bn": True, "bf16": cuda,
                           "channels_last": True, "cuda_graph": cuda or config.cuda_graph})


def draw_cutmix(iterations: int, batch: int, height: int, width: int,
                generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-iteration CutMix draws: (perms (iterations, B) int64, boxes
    (iterations, 4) int64 as (y0, y1, x0, x1), end-exclusive).

    The box is Yun et al.'s: lambda ~ U(0, 1) (Beta(1, 1)), side ratio
    sqrt(1 - lambda), a uniform centre, clipped to the image.
    """
    perms = torch.stack([torch.randperm(batch, generator=generator) for _ in range(iterations)])
    lam = torch.rand(iterations, generator=generator, dtype=torch.float64)
    cut = torch.sqrt(1.0 - lam)
    ch, cw = (height * cut).to(torch.int64), (width * cut).to(torch.int64)
    cy = torch.randint(0, height, (iterations,), generator=generator)
    cx = torch.randint(0, width, (iterations,), generator=generator)
    y0, y1 = (cy - ch // 2).clamp(0, height), (cy + ch // 2).clamp(0, height)
    x0, x1 = (cx - cw // 2).clamp(0, width), (cx + cw // 2).clamp(0, width)
    return perms, torch.stack([y0, y1, x0, x1], 1)


def cutmix(x: torch.Tensor, perm: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """x with the box (y0, y1, x0, x1) of image i taken from x[perm[i]]; a
    device tensor ``box`` is read on the device (no host synchronisation)."""
    H, W = x.shape[-2:]
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    inside = (((rows >= box[0]) & (rows < box[1]))[:, None]
              & ((cols >= box[2]) & (cols < box[3]))[None, :])
    return torch.where(inside, x.index_select(0, perm), x)


@dataclass
class RefineState:
    """The tensors of one batch under refinement (all on the teacher's device)."""
    x: torch.Tensor            # leaf, requires grad: the images being refined
    y: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor         # (1,) float32: iterations done
    lr_scale: torch.Tensor     # (1,) float32: cosine factor of the current iteration
    perms: torch.Tensor        # (iterations, B)
    boxes: torch.Tensor        # (iterations, 4)
    losses: torch.Tensor       # (4,) ce, bn, lr, total of the latest iteration
    features: Optional[torch.Tensor] = None


@dataclass
class RefineResult:
    images: torch.Tensor       # refined x, detached (B,C,H,W)
    masks: torch.Tensor        # the non-critical mask of the final images (B,1,H,W)
    log: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class Refiner:
    """NRR refinement of image batches against one teacher (module docstring).

    ``teacher`` is put in eval mode and its parameters stop requiring grad.
    ``clamp_min`` / ``clamp_max``: per-channel valid range in normalised space
    (``nrrdd.data.pixel_bounds``). Use as a context manager (the BN hooks are
    registered inside); :meth:`refine` enters it by itself.

    Low-level use (benchmarks)::

        with Refiner(teacher, cfg, lo, hi) as r:
            st = r.prepare(x0, y, generator)
            r.iteration(st)            # one eager iteration
            replay = r.capture(st)     # CUDA only: replay() runs one iteration
    """

    def __init__(self, teacher: nn.Module, config: Optional[RefineConfig] = None,
                 clamp_min: Optional[torch.Tensor] = None, clamp_max: Optional[torch.Tensor] = None,
                 input_shape: Optional[Tuple[int, int, int]] = None):
        import nrrdd_ext

        config = RefineConfig() if config is None else config
        self.ext = nrrdd_ext
        teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.fast_info: Dict[str, object] = {"fold_bn": None, "bf16": config.bf16,
                                             "channels_last": config.channels_last}
        if config.fold_bn:
            teacher = self._fold(teacher, input_shape)
        if config.channels_last:
            if not config.fold_bn:  # leave the caller's model as it was
                teacher = copy.deepcopy(teacher)
            teacher = teacher.to(memory_format=torch.channels_last)
        self.teacher = teacher
        self.cam = cam_interface(teacher)
        self.config = config
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        self.hooks = nrrdd_ext.BNStatHooks(teacher, first_multiplier=config.first_bn_multiplier)
        self._entered = 0

    def _fold(self, teacher: nn.Module, input_shape: Optional[Tuple[int, int, int]]) -> nn.Module:
        """The folded copy of ``teacher``; the teacher itself when the fold is refused."""
        if input_shape is None:
            raise ValueError("fold_bn needs input_shape (C, H, W) for the folding probe")
        dev = next(teacher.parameters()).device
        example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(dev)
        try:
            folded, report = self.ext.fold_batchnorm(teacher, example)
        except self.ext.FoldingError as e:
            self.fast_info["fold_bn"] = {"error": str(e)}
            return teacher
        self.fast_info["fold_bn"] = report.as_dict()
        return folded

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of the teacher on x under the configured precision and layout."""
        cfg = self.config
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # no autocast weight cache: a CUDA graph must recast each replay
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and x.device.type == "cuda",
                            cache_enabled=False):
            feats = self.cam.forward_features(x)
            logits = self.cam.forward_head(feats)
        return feats, logits.to(x.dtype)

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Refiner":
        if self._entered == 0:
            self.hooks.__enter__()
        self._entered += 1
        return self

    def __exit__(self, *exc) -> None:
        self._entered -= 1
        if self._entered == 0:
            self.hooks.close()

    def prepare(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> RefineState:
        """Allocate the state for refining ``x0`` (copied) with labels ``y`` and
        draw every iteration's CutMix pair and box from ``generator``."""
        cfg = self.config
        B, _, H, W = x0.shape
        dev = x0.device
        perms, boxes = draw_cutmix(cfg.iterations, B, H, W, generator)
        x = x0.detach().clone().contiguous().requires_grad_(True)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return RefineState(
            x=x, y=y.to(dev), exp_avg=torch.zeros_like(x, requires_grad=False),
            exp_avg_sq=torch.zeros_like(x, requires_grad=False),
            step=torch.zeros(1, dtype=torch.float32, device=dev),
            lr_scale=torch.ones(1, dtype=torch.float32, device=dev),
            perms=perms.to(dev), boxes=boxes.to(dev),
            losses=torch.zeros(len(LOSS_NAMES), dtype=acc, device=dev))

    def _bounds(self, x: torch.Tensor):
        conv = lambda t: None if t is None else t.to(device=x.device, dtype=torch.float32)  # noqa: E731
        return conv(self.clamp_min), conv(self.clamp_max)

    # ------------------------------------------------------------- the math
    def gradient(self, st: RefineState, two_pass: bool = True) -> Dict[str, torch.Tensor]:
        """Steps 1-2: fill ``st.x.grad`` with dL_C/dx and ``st.features``; return
        the loss terms (detached 0-dim tensors). ``two_pass=False`` sums the
        losses and runs one backward (SRe2L's way: both passes' activations live
        at once), for comparison."""
        cfg = self.config
        idx = st.step.to(torch.int64) % cfg.iterations
        st.x.grad = None
        feats, logits = self._forward(st.x)
        ce = F.cross_entropy(logits, st.y)
        bn = self.hooks.loss()
        loss1 = ce + cfg.alpha_bn * bn
        if cfg.label_refine:
            if two_pass:
                loss1.backward()
            perm = st.perms.index_select(0, idx).view(-1)
            box = st.boxes.index_select(0, idx).view(-1)
            x_mix = cutmix(st.x, perm, box)
            with self.hooks.paused():
                logits_mix = self._forward(x_mix)[1]
            lr_loss = self.ext.label_refine_loss(logits_mix, st.y, st.y.index_select(0, perm), r=cfg.r)
            loss2 = cfg.alpha_lr * lr_loss
            (loss2 if two_pass else loss1 + loss2).backward()
        else:
            lr_loss = torch.zeros_like(ce)
            loss2 = lr_loss
            loss1.backward()
        st.features = feats.detach().to(st.x.dtype)
        return {"ce": ce.detach(), "bn": bn.detach(), "lr": lr_loss.detach(),
                "total": (loss1 + loss2).detach()}

    def update(self, st: RefineState) -> None:
        """Step 3: the masked (or, for mask 'none', unmasked) Adam step, in place."""
        cfg = self.config
        st.lr_scale.copy_(0.5 * (1.0 + torch.cos(st.step * (math.pi / cfg.iterations))))
        lo, hi = self._bounds(st.x)
        x = st.x.detach()
        with torch.no_grad():
            if cfg.mask == "cam":
                self.ext.masked_refine_step(
                    x, st.x.grad, st.features, self.cam.classifier_weight().detach().to(x.dtype), st.y,
                    st.exp_avg, st.exp_avg_sq, st.step, lr=cfg.lr, betas=cfg.betas,
                    eps=cfg.adam_eps, cam_eps=cfg.cam_eps, clamp_min=lo, clamp_max=hi,
                    lr_scale=st.lr_scale)
            else:
                self.ext.reference.masked_adam_step(
                    x, st.x.grad, st.lr_scale.to(x.dtype).view(1, 1, 1, 1), st.exp_avg,
                    st.exp_avg_sq, st.step, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                    clamp_min=lo, clamp_max=hi)

    def iteration(self, st: RefineState) -> None:
        """One full NRR iteration; the loss terms land in ``st.losses``."""
        terms = self.gradient(st)
        self.update(st)
        st.losses.copy_(torch.stack([terms[k].to(st.losses.dtype) for k in LOSS_NAMES]))

    def capture(self, st: RefineState, warmup: Optional[int] = None,
                after_warmup: Optional[Callable[[int], None]] = None) -> Callable[[], None]:
        """Run ``warmup`` real iterations eagerly on a side stream, then capture
        one iteration in a CUDA graph; returns its ``replay`` (each call is the
        next iteration). CUDA only."""
        if st.x.device.type != "cuda":
            raise RuntimeError("CUDA-graph capture needs the batch on a CUDA device")
        warmup = self.config.graph_warmup if warmup is None else warmup
        side = torch.cuda.Stream(device=st.x.device)
        side.wait_stream(torch.cuda.current_stream(st.x.device))
        with torch.cuda.stream(side):
            for i in range(warmup):
                self.iteration(st)
                if after_warmup is not None:
                    after_warmup(i)
        torch.cuda.current_stream(st.x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        st.x.grad = None
        with torch.cuda.graph(graph):
            self.iteration(st)
        return graph.replay

    # ------------------------------------------------------------ mid-batch resume
    def snapshot(self, st: RefineState) -> Dict[str, object]:
        """What continuing this batch later needs, on the CPU: the images, Adam's
        moments and the step. The CutMix draws are not in it: ``prepare`` remakes them
        from the batch's generator, and the iteration reads them by step."""
        return {"x": st.x.detach().cpu().clone(), "exp_avg": st.exp_avg.cpu().clone(),
                "exp_avg_sq": st.exp_avg_sq.cpu().clone(), "step": int(st.step.item()),
                "iterations": self.config.iterations}

    def restore(self, st: RefineState, snap: Dict[str, object]) -> None:
        """Put a :meth:`snapshot` of the same batch back into ``st`` (made by ``prepare``)."""
        if snap.get("iterations") != self.config.iterations:
            raise ValueError(f"the snapshot was taken in a run of {snap.get('iterations')} iterations, "
                             f"this one has {self.config.iterations} (the cosine schedule differs)")
        step = int(snap["step"])
        if not 0 <= step <= self.config.iterations:
            raise ValueError(f"snapshot step {step} outside [0, {self.config.iterations}]")
        for name in ("x", "exp_avg", "exp_avg_sq"):
            if tuple(snap[name].shape) != tuple(st.x.shape):
                raise ValueError(f"snapshot {name} has shape {tuple(snap[name].shape)}, the batch "
                                 f"{tuple(st.x.shape)}")
        with torch.no_grad():
            st.x.copy_(snap["x"])
            st.exp_avg.copy_(snap["exp_avg"])
            st.exp_avg_sq.copy_(snap["exp_avg_sq"])
            st.step.fill_(step)

    @torch.no_grad()
    def masks(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The non-critical mask M = max(0, eps - CAM_up) of images ``x`` (B,1,H,W)."""
        with self.hooks.paused():
            f = self.cam.forward_features(x)
        w = self.cam.classifier_weight().detach().to(f.dtype)
        return self.ext.non_critical_mask(f, w, y, x.shape[-2:], eps=self.config.cam_eps)

    # -------------------------------------------------------------- driving
    def refine(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
               on_log: Optional[Callable[[Dict[str, float]], None]] = None,
               progress: bool = False, desc: str = "refine",
               resume: Optional[Dict[str, object]] = None,
               on_checkpoint: Optional[Callable[[Dict[str, object]], None]] = None,
               checkpoint_every_s: float = 120.0) -> RefineResult:
        """Refine ``x0`` for ``config.iterations`` iterations; log the loss terms
        every ``log_every`` iterations (and at the last) through ``on_log``.

        Mid-batch resume: every ``checkpoint_every_s`` seconds (0: after every
        iteration but the last) ``on_checkpoint`` receives a :meth:`snapshot` plus
        the log so far (``log``), the seconds spent (``seconds``) and the iterations and
        seconds since the previous save or the start (``recent``); passing that
        dict back as ``resume`` (same ``x0``, ``y``, a generator in the same state)
        continues where it was taken, to the same images as an uninterrupted run
        on the CPU."""
        from tqdm import tqdm

        cfg = self.config
        start = time.perf_counter()
        log: List[Dict[str, float]] = list(resume["log"]) if resume else []
        spent = float(resume["seconds"]) if resume else 0.0
        with self:
            st = self.prepare(x0, y, generator)
            if resume:
                self.restore(st, resume)
            first = int(st.step.item()) if resume else 0
            bar = tqdm(total=cfg.iterations, initial=first, desc=desc, disable=not progress, leave=False)
            last_save, last_step = time.perf_counter(), first

            def checkpoint(i: int) -> None:
                nonlocal last_save, last_step
                now = time.perf_counter()
                if on_checkpoint is None or i + 1 >= cfg.iterations or now - last_save < checkpoint_every_s:
                    return
                # "recent": the iterations and seconds since the previous save, the pace now
                # (``seconds`` averages over the whole batch, pauses and shared cores included)
                on_checkpoint({**self.snapshot(st), "log": list(log), "seconds": spent + now - start,
                               "recent": {"iterations": i + 1 - last_step, "seconds": now - last_save}})
                last_save, last_step = time.perf_counter(), i + 1

            def after(i: int) -> None:
                bar.update(1)
                if (i + 1) % max(1, cfg.log_every) == 0 or i + 1 == cfg.iterations:
                    values = st.losses.tolist()
                    rec = {"iteration": i + 1, **dict(zip(LOSS_NAMES, values)),
                           "lr_rate": cfg.lr * 0.5 * (1 + math.cos(math.pi * i / cfg.iterations))}
                    log.append(rec)
                    bar.set_postfix(ce=f"{rec['ce']:.3f}", bn=f"{rec['bn']:.3f}", lr=f"{rec['lr']:.3f}")
                    if on_log is not None:
                        on_log(rec)

            warm = cfg.graph_warmup
            if cfg.cuda_graph and st.x.device.type == "cuda" and cfg.iterations - first > warm:
                # the warm-up iterations are real ones: logged like the rest
                replay = self.capture(st, warmup=warm, after_warmup=lambda i: after(first + i))
                for i in range(first + warm, cfg.iterations):
                    replay()
                    after(i)
                    checkpoint(i)
            else:
                for i in range(first, cfg.iterations):
                    self.iteration(st)
                    after(i)
                    checkpoint(i)
            bar.close()
            images = st.x.detach().clone()
            masks = self.masks(images, st.y)
        return RefineResult(images=images, masks=masks, log=log,
                            seconds=spent + time.perf_counter() - start)
