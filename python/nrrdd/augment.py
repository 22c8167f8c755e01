"""Replayable augmentation: the student's view x_mix as a pure function of (seed, epoch, batch).

The DBR labels of the paper (Sec. 3.4, Eqs. 8-10) are the teacher's two distances
(d_org^T, d_aug^T) *on the exact mixed image the student will see*. Storing two
numbers instead of the image means the relabel step and the student step must build
the same x_mix independently. Everything random here therefore comes from a CPU
``torch.Generator`` seeded from (seed, epoch, batch) — drawn on the CPU, so a CUDA
run draws the same numbers as a CPU run — and is then applied on the images'
device with batched tensor ops:

1. batch order: ``epoch_order(n, seed, e)`` is a permutation seeded from (seed, e);
   batch b is the slice ``[b * batch_size, (b + 1) * batch_size)`` of it;
2. RandomResizedCrop + horizontal flip per image (torchvision's parameterisation:
   area fraction U(min_scale, max_scale), log-aspect U(log 3/4, log 4/3)) as one
   ``affine_grid`` + ``grid_sample`` over the batch. Unlike torchvision's 10-try
   rejection loop, an out-of-range box is clamped to the image, so every batch
   draws a fixed number of values. Boxes are continuous (bilinear resampling of
   the whole image at the box's sample points, so the last row/column of the box
   blends with the pixel beyond it, where torchvision's crop-then-resize clamps);
3. CutMix (or Mixup) with a partner permutation inside the batch and
   λ ~ Beta(α, α) (α = 1 for CutMix as in SRe2L/RDED); CutMix's box follows
   RDED's ``rand_bbox`` (one box per batch) and the returned λ is the fraction of
   the image that is still the original (area-corrected), which is what the
   one-hot baseline's λ·CE(y_org) + (1-λ)·CE(y_aug) needs.

y_org are the images' own labels and y_aug = y_org[perm], the labels the DBR
distances are measured to (Eq. 8).

Not replayed: RandAugment (Appendix A names it for some settings) and RDED's
patch shuffling; the crop+flip+mix pipeline above is applied identically at
relabel and at training time.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

MIX_TYPES = ("cutmix", "mixup", "none")

# stream tags mixed into the seed so the order and the per-batch draws never share a stream
_ORDER_STREAM = 1
_BATCH_STREAM = 2


@dataclass(frozen=True)
class AugmentConfig:
    """Everything that decides x_mix besides (seed, epoch, batch) and the images.

    Stored in the labels manifest, so evaluation replays exactly what relabel saw.
    """

    batch_size: int = 100
    min_scale: float = 0.08
    max_scale: float = 1.0
    min_ratio: float = 3.0 / 4.0
    max_ratio: float = 4.0 / 3.0
    flip: bool = True
    mix: str = "cutmix"
    mix_alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")
        if not 0 < self.min_ratio <= self.max_ratio:
            raise ValueError(f"need 0 < min_ratio <= max_ratio, got {self.min_ratio}, {self.max_ratio}")
        if self.mix not in MIX_TYPES:
            raise ValueError(f"mix must be one of {MIX_TYPES}, got {self.mix!r}")
        if self.mix_alpha <= 0:
            raise ValueError(f"mix_alpha must be > 0, got {self.mix_alpha}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence hash: well mixed, stable)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*keys))
    return g


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch (the last one may be smaller; nothing is dropped)."""
    return (n + batch_size - 1) // batch_size


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the ``n`` images (CPU int64)."""
    return torch.randperm(n, generator=generator(seed, _ORDER_STREAM, epoch))


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, batch: int) -> torch.Tensor:
    """Image indices of batch ``batch`` of epoch ``epoch`` (CPU int64)."""
    if not 0 <= batch < num_batches(n, batch_size):
        raise IndexError(f"batch {batch} out of range for {n} images at batch size {batch_size}")
    return epoch_order(n, seed, epoch)[batch * batch_size:(batch + 1) * batch_size]


def sample_beta(alpha: float, g: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from uniforms of ``g`` (Jöhnk's method, in log space).

    torch's Beta/Gamma samplers take no generator; Jöhnk's rejection sampler needs
    only uniforms, so the draw is reproducible from the generator alone.
    """
    inv = 1.0 / alpha
    for _ in range(10_000):
        u = torch.rand(16, 2, generator=g, dtype=torch.float64).clamp_min(1e-300)
        log_xy = u.log() * inv  # log X, log Y
        log_s = torch.logsumexp(log_xy, dim=1)
        ok = (log_s <= 0).nonzero()
        if len(ok):
            i = int(ok[0, 0])
            return float((log_xy[i, 0] - log_s[i]).exp())
    return 0.5  # unreachable in practice: acceptance is >= 1/2 for alpha <= 1


@dataclass
class BatchDraws:
    """Every random number of one batch (CPU tensors / Python numbers)."""

    crop: torch.Tensor  # (B, 4) float64: x0, y0, w, h in pixels
    flip: torch.Tensor  # (B,) bool
    perm: torch.Tensor  # (B,) int64 partner permutation
    lam: float  # fraction of the mixed image that is the original image
    box: tuple[int, int, int, int] | None  # CutMix box x1, y1, x2, y2 (pixels), else None


def draw_batch(batch: int, height: int, width: int, cfg: AugmentConfig, seed: int,
               epoch: int, batch_index: int) -> BatchDraws:
    """Draw crop boxes, flips, the partner permutation and λ for one batch of ``batch`` images."""
    g = generator(seed, _BATCH_STREAM, epoch, batch_index)
    B = batch
    u = torch.rand(B, 5, generator=g, dtype=torch.float64)
    area = (cfg.min_scale + (cfg.max_scale - cfg.min_scale) * u[:, 0]) * (height * width)
    lo, hi = math.log(cfg.min_ratio), math.log(cfg.max_ratio)
    ratio = torch.exp(lo + (hi - lo) * u[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=width)
    h = torch.sqrt(area / ratio).clamp(max=height)
    x0 = u[:, 2] * (width - w)
    y0 = u[:, 3] * (height - h)
    flip = (u[:, 4] < 0.5) if cfg.flip else torch.zeros(B, dtype=torch.bool)
    crop = torch.stack([x0, y0, w, h], dim=1)

    if cfg.mix == "none":
        return BatchDraws(crop, flip, torch.arange(B), 1.0, None)
    perm = torch.randperm(B, generator=g)
    lam = sample_beta(cfg.mix_alpha, g)
    if cfg.mix == "mixup":
        return BatchDraws(crop, flip, perm, lam, None)
    # CutMix box as RDED's rand_bbox: side sqrt(1 - lam) of the image, centre uniform
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(width * cut), int(height * cut)
    cx = int(torch.randint(width, (1,), generator=g))
    cy = int(torch.randint(height, (1,), generator=g))
    x1, x2 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    y1, y2 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    lam_area = 1.0 - (x2 - x1) * (y2 - y1) / float(width * height)
    return BatchDraws(crop, flip, perm, lam_area, (x1, y1, x2, y2))


def crop_flip(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop + flip of every image of ``x`` (B, C, H, W) in one ``grid_sample``.

    Box (x0, y0, w, h) in pixels maps output normalised coordinate u in [-1, 1] to
    input coordinate c + s*u with s = w/W, c = (2*x0 + w)/W - 1 (align_corners=False,
    so -1 and 1 are the box's outer pixel edges); a flip negates s.
    """
    B, C, H, W = x.shape
    # the boxes are drawn on the CPU; theta is formed there in float64, then moved to x
    crop = crop.to(device="cpu", dtype=torch.float64)
    flip = flip.to("cpu")
    sx = crop[:, 2] / W
    sy = crop[:, 3] / H
    cx = (2 * crop[:, 0] + crop[:, 2]) / W - 1
    cy = (2 * crop[:, 1] + crop[:, 3]) / H - 1
    sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid_dtype = x.dtype if x.is_floating_point() else torch.float32
    grid = F.affine_grid(theta.to(device=x.device, dtype=grid_dtype), [B, C, H, W],
                         align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mix(x: torch.Tensor, draws: BatchDraws, cfg: AugmentConfig) -> torch.Tensor:
    """CutMix (paste the partner's box) or Mixup (λ·x + (1-λ)·x[perm]) over the batch."""
    if cfg.mix == "none":
        return x
    perm = draws.perm.to(x.device)
    if cfg.mix == "mixup":
        return draws.lam * x + (1.0 - draws.lam) * x[perm]
    x1, y1, x2, y2 = draws.box
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    return out


@dataclass
class MixedBatch:
    """One replayed batch: what the teacher labels and the student trains on."""

    epoch: int
    batch: int
    indices: torch.Tensor  # (B,) CPU int64 image indices into the distilled set
    x: torch.Tensor  # x_mix (B, C, H, W) on the images' device
    y_org: torch.Tensor  # (B,) int64 on the images' device
    y_aug: torch.Tensor  # (B,) = y_org[perm]
    lam: float  # mix weight of y_org
    perm: torch.Tensor  # (B,) CPU int64


def replay_batch(images: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig, seed: int,
                 epoch: int, batch: int) -> MixedBatch:
    """Rebuild x_mix of (seed, epoch, batch): a pure function of its arguments."""
    n = images.shape[0]
    idx = batch_indices(n, cfg.batch_size, seed, epoch, batch)
    dev_idx = idx.to(images.device)
    x = images[dev_idx]
    y = labels.to(images.device)[dev_idx]
    draws = draw_batch(len(idx), images.shape[-2], images.shape[-1], cfg, seed, epoch, batch)
    x = crop_flip(x, draws.crop, draws.flip)
    x_mix = mix(x, draws, cfg)
    return MixedBatch(epoch, batch, idx, x_mix, y, y[draws.perm.to(y.device)], draws.lam, draws.perm)


def replay_epoch(images: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig, seed: int,
                 epoch: int) -> Iterator[MixedBatch]:
    """All batches of one epoch, in order."""
    for b in range(num_batches(images.shape[0], cfg.batch_size)):
        yield replay_batch(images, labels, cfg, seed, epoch, b)
