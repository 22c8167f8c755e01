"""Real image datasets for teachers, CIDD and evaluation.

``load_split(name, data_dir, split)`` returns an :class:`ImageSet`: the images of
one split with their labels, class names and the per-dataset normalisation
constants. Pixels come back as float tensors in [0, 1] (``get``) or normalised,
``(x - mean) / std`` per channel (``normalize``, ``batches``).

Datasets:

- ``fashion-mnist``: the IDX files (``*-idx3-ubyte[.gz]``) from ``data_dir``
  (or its torchvision layout ``FashionMNIST/raw``), else from Debian's
  ``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist), else
  torchvision's download into the cache folder ($NRRDD_CACHE, default
  ~/.cache/nrrdd). Held in memory as uint8 (47 MB).
- ``cifar10`` / ``cifar100``: torchvision's python-pickle folders under
  ``data_dir`` (``cifar-10-batches-py`` / ``cifar-100-python``); in memory.
- ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``,
  classes sorted as torchvision's ImageFolder sorts them, loaded lazily with PIL,
  resized (shorter side) and centre-cropped to ``image_size`` (default 224).
  Grayscale folders (the first training image is single-band) give 1 channel.

The valid pixel range [0, 1] in normalised space is ``pixel_bounds(mean, std)``:
per channel ``((0 - mean) / std, (1 - mean) / std)``, what the refinement step
clamps to.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nrrdd.errors import UsageError

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Per-dataset normalisation constants (training-set channel mean / std).
NORMALIZATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # ImageNet's constants, the convention of every ImageNet-subset paper.
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Grayscale image folders: the luminance of ImageNet's constants.
    "imagefolder-gray": ((0.449,), (0.226,)),
}

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_FOLDER_SIZE = 224


def pixel_bounds(mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (clamp_min, clamp_max) = ((0 - mean)/std, (1 - mean)/std), float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=device)
    s = torch.tensor(std, dtype=torch.float32, device=device)
    return (0 - m) / s, (1 - m) / s


def normalize(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of an (N,C,H,W) tensor."""
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """x * std + mean per channel: back to [0, 1] pixels (not clamped)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * s + m


class ImageSet:
    """One split of a dataset: labels in memory, pixels from ``_load``.

    Attributes: ``name``, ``classes`` (names, index = label), ``num_classes``,
    ``labels`` (int64, N), ``in_channels``, ``image_size`` (square side),
    ``mean`` / ``std`` (tuples, one per channel; settable, e.g. to a teacher's).
    """

    def __init__(self, name: str, classes: Sequence[str], labels: torch.Tensor,
                 in_channels: int, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.name = name
        self.classes: List[str] = list(classes)
        self.labels = labels.to(torch.int64)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _load(self, indices: torch.Tensor) -> torch.Tensor:
        """Float (N,C,image_size,image_size) in [0, 1]."""
        raise NotImplementedError

    def get(self, indices) -> torch.Tensor:
        """Images at ``indices`` as float32 (N,C,H,W) in [0, 1], on the CPU."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return self._load(idx)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return normalize(x01, self.mean, self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return denormalize(x, self.mean, self.std)

    def pixel_bounds(self, device: torch.device | str = "cpu"):
        return pixel_bounds(self.mean, self.std, device)

    def class_indices(self, c: int) -> torch.Tensor:
        """Indices (int64, ascending) of the images of class ``c``."""
        return torch.nonzero(self.labels == int(c)).flatten()

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    # indices of these images in the full split when this set is a subset (see subset)
    origin: Optional[torch.Tensor] = None

    def subset(self, indices) -> "ImageSet":
        """The images at ``indices`` (int64), in that order, as an ImageSet of the same
        kind; its ``origin`` maps its indices to the full split's."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        sub = self._subset(idx)
        sub.origin = idx if self.origin is None else self.origin[idx]
        return sub

    def _subset(self, idx: torch.Tensor) -> "ImageSet":
        raise NotImplementedError

    def split_index(self, indices) -> torch.Tensor:
        """Indices of this set's images in the full split."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return idx if self.origin is None else self.origin[idx]

    def batches(self, batch_size: int, device: torch.device | str = "cpu",
                normalized: bool = True, indices: Optional[torch.Tensor] = None
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches in index order (or in the order of ``indices``), on ``device``."""
        order = torch.arange(len(self)) if indices is None else torch.as_tensor(indices)
        for start in range(0, order.numel(), batch_size):
            idx = order[start:start + batch_size]
            x = self.get(idx).to(device, non_blocking=True)
            if normalized:
                x = self.normalize(x)
            yield x, self.labels[idx].to(device, non_blocking=True)


class TensorImageSet(ImageSet):
    """Images held in memory as uint8 (N,C,h,w), resized on access when asked."""

    def __init__(self, name, classes, labels, pixels_u8: torch.Tensor, image_size: Optional[int],
                 mean, std):
        native = pixels_u8.shape[-1]
        super().__init__(name, classes, labels, pixels_u8.shape[1], image_size or native, mean, std)
        self.pixels = pixels_u8

    def _subset(self, idx: torch.Tensor) -> "TensorImageSet":
        return TensorImageSet(self.name, self.classes, self.labels[idx], self.pixels[idx], self.image_size,
                              self.mean, self.std)

    def _load(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.pixels[indices].to(torch.float32).div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True).clamp_(0, 1)
        return x


# image files decoded in parallel per call (NRRDD_LOAD_THREADS; 1 = serial)
LOAD_THREADS = max(1, int(os.environ.get("NRRDD_LOAD_THREADS", min(8, os.cpu_count() or 1))))


class FolderImageSet(ImageSet):
    """``root/<class>/*`` image files, opened with PIL only when asked for."""

    def __init__(self, name, classes, labels, paths: List[Path], in_channels: int,
                 image_size: int, mean, std):
        super().__init__(name, classes, labels, in_channels, image_size, mean, std)
        self.paths = paths

    def _subset(self, idx: torch.Tensor) -> "FolderImageSet":
        return FolderImageSet(self.name, self.classes, self.labels[idx], [self.paths[i] for i in idx.tolist()],
                              self.in_channels, self.image_size, self.mean, self.std)

    def _load(self, indices: torch.Tensor) -> torch.Tensor:
        out = torch.empty((indices.numel(), self.in_channels, self.image_size, self.image_size))
        paths = [self.paths[i] for i in indices.tolist()]
        workers = min(LOAD_THREADS, len(paths))
        if workers > 1 and len(paths) >= 4 * workers:
            # PIL releases the GIL while decoding and resizing: threads read files in parallel
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                for k, t in enumerate(pool.map(self._read, paths, chunksize=16)):
                    out[k] = t
        else:
            for k, p in enumerate(paths):
                out[k] = self._read(p)
        return out

    def _read(self, path: Path) -> torch.Tensor:
        """One file: shorter side resized to image_size (bilinear), centre-cropped, in [0, 1]."""
        from PIL import Image

        mode = "L" if self.in_channels == 1 else "RGB"
        with Image.open(path) as im:
            im = im.convert(mode)
            w, h = im.size
            s = self.image_size / min(w, h)
            nw, nh = max(self.image_size, round(w * s)), max(self.image_size, round(h * s))
            im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
            left, top = (nw - self.image_size) // 2, (nh - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            a = np.asarray(im, dtype=np.uint8)
        t = torch.from_numpy(a.copy())
        return (t[None] if t.dim() == 2 else t.permute(2, 0, 1)).to(torch.float32) / 255.0


# ------------------------------------------------------------------ IDX files
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic 0x0000 <type> <ndim>, big-endian dims."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UsageError(f"{path} is not an IDX file")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise UsageError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise UsageError(f"{path}: IDX header says {dims}, file holds {arr.size} elements")
    return arr.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for sub in (folder, folder / "FashionMNIST" / "raw", folder / "raw"):
        for suffix in (".gz", ""):
            p = sub / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("NRRDD_CACHE", Path.home() / ".cache" / "nrrdd"))


def fashion_mnist_folder(data_dir: Optional[str | Path]) -> Path:
    """The folder holding the Fashion-MNIST IDX files (see the module docstring)."""
    stem = "train-images-idx3-ubyte"
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise UsageError(f"data folder {folder} does not exist")
        if _find_idx(folder, stem) is None:
            raise UsageError(f"no Fashion-MNIST IDX files ({stem}[.gz]) in {folder}")
        return folder
    if _find_idx(DEBIAN_FASHION_MNIST, stem) is not None:
        return DEBIAN_FASHION_MNIST
    cache = cache_dir() / "fashion-mnist"
    if _find_idx(cache, stem) is None:
        try:
            import torchvision

            torchvision.datasets.FashionMNIST(str(cache), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(cache), train=False, download=True)
        except Exception as e:  # offline, or a broken mirror
            raise UsageError(f"Fashion-MNIST not found (no --data-dir, no {DEBIAN_FASHION_MNIST}) "
                             f"and the download into {cache} failed: {e}") from None
    return cache


def _fashion_mnist(data_dir, split: str, image_size: Optional[int]) -> ImageSet:
    folder = fashion_mnist_folder(data_dir)
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise UsageError(f"Fashion-MNIST {split} split missing in {folder}")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UsageError(f"Fashion-MNIST files in {folder} have shapes {images.shape} and {labels.shape}")
    pixels = torch.from_numpy(images.copy()).unsqueeze(1)
    mean, std = NORMALIZATION["fashion-mnist"]
    return TensorImageSet("fashion-mnist", FASHION_MNIST_CLASSES,
                          torch.from_numpy(labels.astype(np.int64)), pixels, image_size, mean, std)


def _cifar(name: str, data_dir, split: str, image_size: Optional[int]) -> ImageSet:
    import torchvision

    if data_dir is None:
        raise UsageError(f"--data-dir is required for {name} (torchvision's folder)")
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist")
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if root.name == folder:
        root = root.parent
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(str(root), train=(split == "train"), download=False)
    except RuntimeError as e:
        raise UsageError(f"{name} not found under {root} (expected {root / folder}): {e}") from None
    pixels = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    mean, std = NORMALIZATION[name]
    return TensorImageSet(name, ds.classes, torch.tensor(ds.targets, dtype=torch.int64), pixels,
                          image_size, mean, std)


def _image_folder(data_dir, split: str, image_size: Optional[int]) -> ImageSet:
    if data_dir is None:
        raise UsageError("--data-dir is required for imagefolder")
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist")
    sub = root / ("train" if split == "train" else "val")
    if not sub.is_dir():
        raise UsageError(f"imagefolder needs {sub} (train/<class>/* and val/<class>/*)")
    train_root = root / "train"
    if not train_root.is_dir():
        raise UsageError(f"imagefolder needs {train_root}")
    # Classes come from train/ so both splits share label indices.
    classes = sorted(d.name for d in os.scandir(train_root) if d.is_dir())
    if not classes:
        raise UsageError(f"no class folders in {train_root}")
    paths: List[Path] = []
    labels: List[int] = []
    for c, name in enumerate(classes):
        folder = sub / name
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise UsageError(f"no images found under {sub}")
    extra = sorted(d.name for d in os.scandir(sub) if d.is_dir() and d.name not in classes)
    if extra:
        raise UsageError(f"{sub} has classes not in train/: {', '.join(extra[:5])}")
    from PIL import Image

    first = next((p for p in sorted(train_root.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS), None)
    if first is None:
        raise UsageError(f"no images found under {train_root}")
    with Image.open(first) as im:
        gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
    mean, std = NORMALIZATION["imagefolder-gray" if gray else "imagefolder"]
    return FolderImageSet("imagefolder", classes, torch.tensor(labels, dtype=torch.int64), paths,
                          1 if gray else 3, image_size or DEFAULT_FOLDER_SIZE, mean, std)


HOLDOUT_SEED = 20261129  # fixed: every run holds out the same images
HOLDOUT_PER_CLASS = 500  # default size of the holdout (of Fashion-MNIST's 6000 per class)


def holdout_split(ds: ImageSet, per_class: int) -> Tuple[ImageSet, ImageSet]:
    """(rest, held): ``per_class`` images of each class held out of ``ds`` (a fixed
    random choice, the same for every run and seed), for choosing settings on the
    training data instead of the test set. Both keep ``ds``'s index order."""
    counts = ds.class_counts()
    if per_class < 1 or int(counts.min()) <= per_class:
        raise UsageError(f"cannot hold out {per_class} images per class: the smallest class has "
                         f"{int(counts.min())}")
    g = torch.Generator().manual_seed(HOLDOUT_SEED)
    held = torch.cat([c[torch.randperm(c.numel(), generator=g)[:per_class]]
                      for c in (ds.class_indices(k) for k in range(ds.num_classes))]).sort().values
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[held] = False
    return ds.subset(torch.nonzero(keep).flatten()), ds.subset(held)


def load_split(name: str, data_dir: Optional[str | Path], split: str = "train",
               image_size: Optional[int] = None) -> ImageSet:
    """The ``split`` ('train' or 'test'; 'val' is an alias) of dataset ``name``.

    ``image_size`` resizes every image to a square of that side (default: the
    dataset's own, 224 for imagefolder). Raises :class:`UsageError` for an
    unknown dataset or a missing data folder.
    """
    if split == "val":
        split = "test"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and int(image_size) < 1:
        raise UsageError(f"--image-size must be positive, got {image_size}")
    if name == "fashion-mnist":
        return _fashion_mnist(data_dir, split, image_size)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir, split, image_size)
    if name == "imagefolder":
        return _image_folder(data_dir, split, image_size)
    raise UsageError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
