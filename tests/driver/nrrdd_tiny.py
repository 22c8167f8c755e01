"""Helpers for the part-1 driver tests: tiny made-up datasets and teachers.

Everything is small enough that each test file runs in seconds on a CPU.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TINY = 8  # side of the made-up image-folder images and of the teacher for them


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (gzipped): 0x0000, type 0x08 (uint8), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped IDX folder: 10 classes, 4 train / 2 test images each, 12x12."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, per in (("train", 4), ("t10k", 2)):
        labels = np.repeat(np.arange(10), per)
        rng.shuffle(labels)
        images = rng.integers(0, 256, (labels.size, 12, 12))
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def make_imagefolder(root: Path, classes: int = 3, train_per_class: int = 6, val_per_class: int = 2,
                     size: int = 16, mode: str = "L", seed: int = 0, class_prefix: str = "c") -> Path:
    """``root/train/<prefix><k>/*.png`` and ``root/val/<prefix><k>/*.png``; class k has a
    bright horizontal band over noise (learnable in a few epochs)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    band = max(1, size // classes)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"{class_prefix}{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 90, (size, size)).astype(np.uint8)
                a[c * band:(c + 1) * band] = rng.integers(170, 256, (band, size))
                img = Image.fromarray(a, mode="L")
                (img if mode == "L" else img.convert(mode)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("folder"), size=TINY)


def make_teacher(path: Path, *, num_classes: int = 3, in_channels: int = 1, image_size: int = 16,
                 arch: str = "convnet3", dataset: str = "imagefolder", seed: int = 0):
    """An untrained teacher checkpoint in nrrdd's format, with non-trivial BN running stats."""
    from nrrdd.data import NORMALIZATION
    from nrrdd.models import build_model
    from nrrdd.teacher import CHECKPOINT_FORMAT, save_teacher

    torch.manual_seed(seed)
    model = build_model(arch, num_classes, in_channels, image_size)
    with torch.no_grad():
        model.train()
        model(torch.randn(32, in_channels, image_size, image_size))
    model.eval()
    mean, std = NORMALIZATION["imagefolder-gray" if in_channels == 1 else "imagefolder"]
    meta = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes,
            "in_channels": in_channels, "image_size": image_size, "dataset": dataset,
            "mean": list(mean), "std": list(std), "classes": [f"c{k}" for k in range(num_classes)],
            "test_accuracy": 0.5, "seed": seed, "epochs": 0}
    save_teacher(model, meta, path)
    return path


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", image_size=TINY)


def small_convnet(num_classes: int = 4, in_channels: int = 1, image_size: int = 12,
                  width: int = 8, dtype=torch.float32, seed: int = 0):
    """A narrow ConvNet-3 (the real class, width ``width``) in eval mode with BN stats."""
    from nrrdd.models import ConvNet

    torch.manual_seed(seed)
    m = ConvNet(3, num_classes, in_channels, image_size, width=width).to(dtype)
    with torch.no_grad():
        m.train()
        m(torch.randn(16, in_channels, image_size, image_size, dtype=dtype) * 1.5 + 0.2)
    return m.eval()
