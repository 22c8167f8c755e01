"""PNG output of a distilled set: one file per image, a class grid, the masks.

Images are de-normalised (x * std + mean), clamped to [0, 1] and written as
8-bit lossless PNG (``torchvision.utils.save_image``). PNG writes go through a
temp file and a rename (``nrrdd.storage.write_bytes``).
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import List, Sequence

import torch

from nrrdd import storage
from nrrdd.data import denormalize

GRID_MAX_COLUMNS = 10
GRID_MAX_ROWS = 100


def safe_name(name: str) -> str:
    """A class name usable as one folder name ('T-shirt/top' -> 'T-shirt_top')."""
    s = re.sub(r"[^\w.\- ]+", "_", str(name)).strip(" .")
    return s or "_"


def class_folders(classes: Sequence[str]) -> List[str]:
    """Distinct folder names for ``classes`` (a suffix _<index> resolves clashes)."""
    names = [safe_name(c) for c in classes]
    seen: dict = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n}_{i}" if seen[n] > 1 else n for i, n in enumerate(names)]


def _png_bytes(x01: torch.Tensor, nrow: int = 8, padding: int = 0) -> bytes:
    from torchvision.utils import save_image

    buf = io.BytesIO()
    save_image(x01, buf, format="png", nrow=nrow, padding=padding)
    return buf.getvalue()


def to_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images -> float [0, 1] on the CPU."""
    return denormalize(images.detach().float().cpu(), mean, std).clamp_(0, 1)


def save_image_files(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                     mean: Sequence[float], std: Sequence[float], folder: Path) -> int:
    """``folder/<class>/<i>.png`` for every image, ``i`` counting within its class
    in the order of ``images``. Returns the number of files written."""
    pixels = to_pixels(images, mean, std)
    names = class_folders(classes)
    count: dict = {}
    for img, y in zip(pixels, labels.tolist()):
        i = count.get(y, 0)
        count[y] = i + 1
        storage.write_bytes(_png_bytes(img), Path(folder) / names[y] / f"{i}.png")
    return len(pixels)


def _rows(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Tiles for a grid with one row per class (at most GRID_MAX_ROWS classes and
    GRID_MAX_COLUMNS images per row); empty cells stay black."""
    classes = list(range(min(num_classes, GRID_MAX_ROWS)))
    per = [torch.nonzero(labels == c).flatten()[:GRID_MAX_COLUMNS] for c in classes]
    cols = max([p.numel() for p in per] + [1])
    tiles = pixels.new_zeros((len(classes) * cols,) + tuple(pixels.shape[1:]))
    for r, idx in enumerate(per):
        tiles[r * cols:r * cols + idx.numel()] = pixels[idx]
    return tiles, cols


def save_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
              mean: Sequence[float], std: Sequence[float], path: Path) -> None:
    """``grid.png``: one row per class (see :func:`_rows`), 2 px gaps."""
    tiles, cols = _rows(to_pixels(images, mean, std), labels.cpu(), num_classes)
    storage.write_bytes(_png_bytes(tiles, nrow=cols, padding=2), Path(path))


def overlay_masks(pixels: torch.Tensor, masks: torch.Tensor, cam_eps: float) -> torch.Tensor:
    """Images (N,C,H,W in [0,1]) with the non-critical mask M (N,1,H,W, values in
    [0, eps]) drawn in red: out = (1 - a) * gray_or_rgb + a * red, a = 0.6 M / eps."""
    rgb = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels[:, :3]
    a = (0.6 * masks.float().cpu() / max(cam_eps, 1e-12)).clamp(0, 1)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    return (1 - a) * rgb + a * red


def save_mask_grid(images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                   num_classes: int, mean: Sequence[float], std: Sequence[float],
                   cam_eps: float, path: Path) -> None:
    """``masks.png``: the grid of :func:`save_grid` with each image's
    non-critical region (where refinement may change pixels) overlaid in red."""
    over = overlay_masks(to_pixels(images, mean, std), masks, cam_eps)
    tiles, cols = _rows(over, labels.cpu(), num_classes)
    storage.write_bytes(_png_bytes(tiles, nrow=cols, padding=2), Path(path))
