"""Tiny made-up datasets, teachers and distilled folders for the part-2 driver tests.

Everything is drawn fresh from a random seed per call, small enough that a test
runs in seconds on a CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch


def fresh_seed() -> int:
    """A new seed per call, from torch's global RNG (which tests/conftest.py seeds per test
    from a per-session random base, so NRRDD_TEST_SEED replays a failing session)."""
    return int(torch.randint(1, 2**31 - 1, ()))


def make_imagefolder(root: Path, classes: int = 3, train_per_class: int = 10,
                     val_per_class: int = 6, size: int = 16, seed: int | None = None) -> Path:
    """``root/train/class<c>/*.png`` and ``root/val/class<c>/*.png`` (grayscale, a bright
    band per class), drawn from a fresh seed unless one is given."""
    from nrrdd_tiny import make_imagefolder as make

    return make(root, classes, train_per_class, val_per_class, size,
                seed=fresh_seed() if seed is None else seed, class_prefix="class")


def make_teacher(path: Path, num_classes: int = 3, in_channels: int = 1, image_size: int = 16,
                 arch: str = "convnet3", seed: int | None = None, dataset: str = "imagefolder"):
    """An untrained (random) teacher checkpoint in part 1's format; returns (model, meta)."""
    from nrrdd.data import NORMALIZATION
    from nrrdd.models import build_model
    from nrrdd.teacher import CHECKPOINT_FORMAT, save_teacher

    torch.manual_seed(fresh_seed() if seed is None else seed)
    model = build_model(arch, num_classes, in_channels, image_size).eval()
    mean, std = NORMALIZATION["imagefolder-gray" if in_channels == 1 else "imagefolder"]
    meta = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes,
            "in_channels": in_channels, "image_size": image_size, "dataset": dataset,
            "mean": list(mean), "std": list(std), "classes": [f"class{c}" for c in range(num_classes)],
            "test_accuracy": None}
    # give BatchNorm non-trivial running stats so eval-mode outputs are not degenerate
    with torch.no_grad():
        model.train()
        model(torch.randn(32, in_channels, image_size, image_size))
        model.eval()
    save_teacher(model, meta, path)
    meta["path"] = str(Path(path).resolve())
    return model, meta


def make_distilled(folder: Path, teacher_path: Path, data_dir: Path | None = None, ipc: int = 4,
                   num_classes: int = 3, in_channels: int = 1, image_size: int = 16,
                   seed: int | None = None, factor: int | None = 2) -> Path:
    """A distilled folder of random normalised images, ``ipc`` per class."""
    from nrrdd.data import NORMALIZATION
    from nrrdd.distilled_set import save_distilled

    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    n = ipc * num_classes
    images = torch.randn(n, in_channels, image_size, image_size, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    mean, std = NORMALIZATION["imagefolder-gray" if in_channels == 1 else "imagefolder"]
    config = {"dataset": "imagefolder", "data_dir": None if data_dir is None else str(data_dir),
              "teacher": str(teacher_path), "mean": list(mean), "std": list(std), "ipc": ipc,
              "num_classes": num_classes, "seed": 0}
    if factor is not None:
        config["factor"] = factor
    save_distilled(folder, images, labels, config)
    return folder
