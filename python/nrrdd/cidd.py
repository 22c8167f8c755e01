"""CIDD: critical-based initial data discovery (paper Sec. 3.2, Alg. 1 lines 2-11).

For class y, with the teacher T:

1. draw ``mipc`` real images of class y (all of them when ``mipc`` is None or
   at least the class size);
2. draw ``num_crop`` random resized crops per image (torchvision's
   RandomResizedCrop sampling, ratio (3/4, 4/3), area fraction ``crop_scale``,
   default (0.08, 1), torchvision's);
3. score each crop by the mean, over the crop region, of the image's CAM
   (Eq. 1: C_y = sum_k w_{y,k} f_k, min-max normalised, upsampled bilinearly to
   the image size); keep the ``top_t`` best crops per image, resized to the full
   image size, as the patch pool;
4. score every pooled patch by the teacher's confidence p(y | patch) =
   softmax(T(patch))_y and keep the beta * IPC patches with the LOWEST
   confidence (``select='lowest'``, NRR-DD's choice; ``'highest'`` is RDED's,
   ``'random'`` a control), beta = factor^2;
5. stitch beta patches, each resized to (H/factor, W/factor), into each of the
   IPC synthetic images, row-major, in selection order.

Everything after loading the images is batched tensor work on the device (the
only Python loops run over teacher mini-batches and the factor^2 grid cells).
Every random draw of class y comes, in a fixed order, from one CPU
``torch.Generator`` seeded from ``derive_seed(seed, 'cidd', y)``, so a class's
result does not depend on which other classes run, in what order, or on the
device.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

SELECT_MODES = ("lowest", "highest", "random")
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed that depends only on (seed, *keys): independent streams per
    stage, class and batch."""
    text = ":".join(str(k) for k in (int(seed),) + keys)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2 ** 63 - 1)


def generator_for(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


# -------------------------------------------------------------- crop geometry
def random_resized_boxes(n: int, height: int, width: int, generator: torch.Generator,
                         scale: Sequence[float] = CROP_SCALE, ratio: Sequence[float] = CROP_RATIO,
                         attempts: int = 10) -> torch.Tensor:
    """``n`` boxes (x0, y0, w, h), int64 (n,4), drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws them, vectorised: ``attempts`` tries
    of (area, log-ratio); the first that fits wins, else the central crop with
    the ratio clamped to ``ratio``."""
    area = height * width
    log_r = torch.log(torch.tensor(ratio, dtype=torch.float64))
    target = area * torch.empty(n, attempts, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    ar = torch.exp(torch.empty(n, attempts, dtype=torch.float64).uniform_(float(log_r[0]), float(log_r[1]),
                                                                          generator=generator))
    w = torch.round(torch.sqrt(target * ar)).to(torch.int64)
    h = torch.round(torch.sqrt(target / ar)).to(torch.int64)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    # Offsets: uniform in [0, W - w] and [0, H - h], drawn for every attempt.
    ux = torch.rand(n, attempts, generator=generator, dtype=torch.float64)
    uy = torch.rand(n, attempts, generator=generator, dtype=torch.float64)
    x0 = torch.floor(ux * (width - w + 1).clamp_min(1)).to(torch.int64)
    y0 = torch.floor(uy * (height - h + 1).clamp_min(1)).to(torch.int64)
    first = torch.argmax(fits.to(torch.int8), dim=1)
    ok = fits.any(1)
    pick = lambda t: t.gather(1, first[:, None]).squeeze(1)  # noqa: E731
    # Fallback: the central crop.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    fb = torch.tensor([(width - fw) // 2, (height - fh) // 2, fw, fh], dtype=torch.int64)
    boxes = torch.stack([pick(x0), pick(y0), pick(w), pick(h)], 1)
    return torch.where(ok[:, None], boxes, fb[None])


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Crop box i (x0, y0, w, h in pixels) of image i and resize it to ``size``,
    bilinearly (pixel centres mapped as ``F.interpolate(align_corners=False)``
    maps them), in one ``grid_sample`` over the batch."""
    n, _, H, W = x.shape
    b = boxes.to(device=x.device, dtype=x.dtype)
    x0, y0, w, h = b.unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = w / W
    theta[:, 0, 2] = (2 * x0 + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size[0], size[1]], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def box_means(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean of ``maps[i]`` (N,H,W) over each of its boxes ``boxes[i, j]`` (N,k,4:
    x0, y0, w, h), exactly, from a summed-area table: (N,k)."""
    N, H, W = maps.shape
    sat = F.pad(maps.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))  # (N,H+1,W+1)
    b = boxes.to(maps.device)
    x0, y0, w, h = b.unbind(-1)
    x1, y1 = x0 + w, y0 + h
    flat = sat.flatten(1)
    at = lambda yy, xx: flat.gather(1, yy * (W + 1) + xx)  # noqa: E731
    s = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    return (s / (w * h).to(torch.float64)).to(maps.dtype)


def stitch(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """(k * factor^2, C, H, W) patches -> (k, C, H, W) images: image j holds
    patches j*factor^2 ... (j+1)*factor^2 - 1, row-major, each resized
    (bilinear, antialiased) to its cell of a factor x factor grid."""
    beta = factor * factor
    if patches.shape[0] % beta:
        raise ValueError(f"{patches.shape[0]} patches do not fill images of {beta} patches")
    if factor == 1:
        return patches.clone()
    n, C, H, W = patches.shape
    k = n // beta
    grouped = patches.view(k, beta, C, H, W)
    rows = [round(i * H / factor) for i in range(factor + 1)]
    cols = [round(i * W / factor) for i in range(factor + 1)]
    out = patches.new_empty(k, C, H, W)
    for r in range(factor):
        for c in range(factor):
            cell = (rows[r + 1] - rows[r], cols[c + 1] - cols[c])
            out[:, :, rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = F.interpolate(
                grouped[:, r * factor + c], size=cell, mode="bilinear", align_corners=False,
                antialias=True)
    return out


# ---------------------------------------------------------------- the method
@dataclass
class CiddResult:
    """One class's CIDD output (tensors on the device unless noted)."""
    images: torch.Tensor        # (ipc, C, H, W), normalised, stitched
    patch_confidence: torch.Tensor  # (ipc * beta,), p(y | patch) of the chosen patches, in order
    patch_source: torch.Tensor  # (ipc * beta,), dataset index of each chosen patch's image (CPU)
    patch_box: torch.Tensor     # (ipc * beta, 4), (x0, y0, w, h) of each chosen patch (CPU)
    pool_confidence: torch.Tensor  # (pool,), confidence of every pooled patch
    pool_source: torch.Tensor   # (pool,), dataset index per pooled patch (CPU)
    pool_box: torch.Tensor      # (pool, 4) (CPU)


def _full(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@torch.no_grad()
def teacher_outputs(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    cam_size: Optional[Tuple[int, int]] = None):
    """(softmax probabilities (N,classes), CAM upsampled to ``cam_size`` (N,H,W)
    or None) of the eval-mode teacher, ``batch_size`` images per forward."""
    import nrrdd_ext
    from nrrdd.models import cam_interface

    cam = cam_interface(model)
    weight = cam.classifier_weight().detach()
    probs, maps = [], []
    for s in range(0, x.shape[0], batch_size):
        f = cam.forward_features(x[s:s + batch_size])
        probs.append(torch.softmax(_full(cam.forward_head(f)), 1))
        if cam_size is not None:
            m = nrrdd_ext.class_activation_map(f, weight.to(f.dtype), labels[s:s + batch_size])
            maps.append(F.interpolate(_full(m.unsqueeze(1)), size=cam_size, mode="bilinear",
                                      align_corners=False).squeeze(1))
    return torch.cat(probs), (torch.cat(maps) if cam_size is not None else None)


@torch.no_grad()
def discover(model: nn.Module, images: torch.Tensor, sources: torch.Tensor, label: int, ipc: int,
             generator: torch.Generator, *, factor: int = 2, num_crop: int = 5, top_t: int = 1,
             select: str = "lowest", batch_size: int = 100,
             crop_scale: Sequence[float] = CROP_SCALE) -> CiddResult:
    """Steps 2-5 of the module docstring on ``images`` (N,C,H,W, normalised, on
    the teacher's device), all of class ``label``; ``sources`` (N,) are their
    dataset indices. ``model`` must be in eval mode."""
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    N, C, H, W = images.shape
    beta = factor * factor
    need = ipc * beta
    top_t = min(top_t, num_crop)
    if N * top_t < need:
        raise ValueError(f"the patch pool holds {N * top_t} patches, {need} needed")
    device = images.device
    y = torch.full((N,), int(label), dtype=torch.int64, device=device)
    _, cams = teacher_outputs(model, images, y, batch_size, cam_size=(H, W))
    boxes = random_resized_boxes(N * num_crop, H, W, generator, scale=crop_scale).view(N, num_crop, 4)
    scores = box_means(cams, boxes)                                         # (N, num_crop)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_t].cpu()
    pool_box = boxes.gather(1, order[:, :, None].expand(-1, -1, 4)).reshape(-1, 4)  # (N*top_t, 4)
    pool_img = torch.arange(N).repeat_interleave(top_t)
    pool_source = sources.cpu()[pool_img]
    # Confidences of the pooled patches, resized to full size, one teacher batch at a time.
    conf = []
    for s in range(0, pool_img.numel(), batch_size):
        idx = pool_img[s:s + batch_size]
        patches = crop_resize(images[idx.to(device)], pool_box[s:s + batch_size], (H, W))
        p, _ = teacher_outputs(model, patches, y[:idx.numel()], batch_size)
        conf.append(p[:, label])
    pool_conf = torch.cat(conf)
    if select == "random":
        chosen = torch.randperm(pool_conf.numel(), generator=generator)[:need]
    else:
        chosen = torch.sort(pool_conf.cpu(), descending=(select == "highest"), stable=True).indices[:need]
    patches = crop_resize(images[pool_img[chosen].to(device)], pool_box[chosen], (H, W))
    return CiddResult(images=stitch(patches, factor), patch_confidence=pool_conf[chosen.to(device)],
                      patch_source=pool_source[chosen], patch_box=pool_box[chosen],
                      pool_confidence=pool_conf, pool_source=pool_source, pool_box=pool_box)


def class_candidates(labels: torch.Tensor, label: int, mipc: Optional[int],
                     generator: torch.Generator) -> torch.Tensor:
    """Step 1: dataset indices of ``mipc`` images of class ``label`` drawn without
    replacement (all of the class, in index order, when ``mipc`` is None or >= its size)."""
    idx = torch.nonzero(labels == int(label)).flatten()
    if mipc is None or mipc >= idx.numel():
        return idx
    return idx[torch.randperm(idx.numel(), generator=generator)[:mipc]]


def cidd_class(model: nn.Module, dataset, label: int, ipc: int, seed: int,
               device: torch.device | str, *, mipc: Optional[int] = 300, factor: int = 2,
               num_crop: int = 5, top_t: int = 1, select: str = "lowest",
               batch_size: int = 100, crop_scale: Sequence[float] = CROP_SCALE) -> CiddResult:
    """CIDD for one class of an :class:`nrrdd.data.ImageSet` (already normalised as
    the teacher expects), seeded from (seed, label) only."""
    g = generator_for(seed, "cidd", label)
    src = class_candidates(dataset.labels, label, mipc, g)
    images = dataset.normalize(dataset.get(src).to(device))
    return discover(model, images, src, label, ipc, g, factor=factor, num_crop=num_crop,
                    top_t=top_t, select=select, batch_size=batch_size, crop_scale=crop_scale)


def pool_size(class_size: int, mipc: Optional[int], top_t: int, num_crop: int) -> int:
    """How many patches the pool of a class of ``class_size`` images holds."""
    n = class_size if mipc is None else min(mipc, class_size)
    return n * min(top_t, num_crop)


def factor_cells(size: int, factor: int) -> int:
    """The smallest cell side a factor x factor grid leaves on ``size`` pixels."""
    return min(round((i + 1) * size / factor) - round(i * size / factor) for i in range(factor)) \
        if factor > 0 else 0


__all__ = ["CROP_SCALE", "CiddResult", "box_means", "cidd_class", "class_candidates", "crop_resize",
           "derive_seed", "discover", "generator_for", "pool_size", "random_resized_boxes",
           "stitch", "teacher_outputs"]
