"""Student training speed: one epoch of ``nrrdd.student.train_student`` (the code
``nrrdd evaluate`` runs) per layout and precision.

Modes (``nrrdd evaluate`` flags):

- ``fp32``: the default, NCHW float32;
- ``channels_last``: ``--channels-last`` (the same training to float32 rounding);
- ``bf16``: ``--bf16`` (bfloat16 autocast; fp32 weights and optimizer);
- ``bf16+channels_last``: both.

The set is random images (IPC x classes of them; the cost does not depend on the
pixels) with one-hot labels, replayed with the protocol's augmentation (CutMix,
random resized crops, flips), batch 100. The time per epoch is the median over
``--repeats`` runs of ``--epochs`` epochs, after one warm-up run; the test set
is 10 images, so scoring it costs nothing. ``s_per_student``: the 300 epochs of
the paper's protocol.

    python benchmarks/bench_student.py --device cpu --config convnet3-28 --ipc 10
    python benchmarks/bench_student.py --device cuda --json student.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import emit  # noqa: E402

# name -> (arch, image size, channels, classes)
CONFIGS = {
    "convnet3-28": ("convnet3", 28, 1, 10),
    "resnet18-32": ("resnet18", 32, 3, 10),
    "resnet18-224": ("resnet18", 224, 3, 100),
}
MODES = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True),
         "bf16+channels_last": (True, True)}
PAPER_EPOCHS = 300


def _sets(size, channels, classes, ipc, seed=0):
    from nrrdd.data import TensorImageSet
    from nrrdd.distilled_set import DistilledSet

    g = torch.Generator().manual_seed(seed)
    n = ipc * classes
    images = torch.randn(n, channels, size, size, generator=g)
    labels = torch.arange(n) % classes
    mean, std = [0.5] * channels, [0.25] * channels
    ds = DistilledSet(Path("."), images, labels, {"mean": mean, "std": std, "num_classes": classes})
    pixels = torch.randint(0, 256, (10, channels, size, size), generator=g, dtype=torch.uint8)
    test = TensorImageSet("random", [str(c) for c in range(classes)], torch.arange(10) % classes, pixels,
                          None, mean, std)
    return ds, test


def measure(config: str, mode: str, ipc: int, epochs: int, repeats: int, device: torch.device) -> dict:
    from nrrdd.augment import AugmentConfig
    from nrrdd.student import no_labels, train_student

    arch, size, channels, classes = CONFIGS[config]
    channels_last, bf16 = MODES[mode]
    ds, test = _sets(size, channels, classes, ipc)
    augment = AugmentConfig(batch_size=100, min_scale=0.5)

    def run(n_epochs: int) -> float:
        t = time.perf_counter()
        train_student(ds, arch, "onehot", no_labels, augment, 0, n_epochs, 0, classes, test,
                      ds.config["mean"], ds.config["std"], device=device, quiet=True,
                      channels_last=channels_last, bf16=bf16)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    run(1)  # warm-up: allocator, cuDNN's algorithm choice, first-call costs
    per_epoch = statistics.median(run(epochs) / epochs for _ in range(repeats))
    return {"config": config, "mode": mode, "ipc": ipc, "images": len(ds),
            "ms_per_epoch": round(per_epoch * 1e3, 1),
            "s_per_student": round(per_epoch * PAPER_EPOCHS, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", action="append", choices=sorted(CONFIGS),
                   help="network and image size (repeatable; default convnet3-28)")
    p.add_argument("--mode", action="append", choices=list(MODES), help="repeatable; default: all")
    p.add_argument("--ipc", type=int, default=10, help="images per class of the set")
    p.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (the median is kept)")
    p.add_argument("--json", default=None, help="write the rows and the setting here")
    args = p.parse_args(argv)
    if args.ipc < 1 or args.epochs < 1 or args.repeats < 1:
        p.error("--ipc, --epochs and --repeats must be at least 1")
    device = torch.device(args.device)
    rows = [measure(c, m, args.ipc, args.epochs, args.repeats, device)
            for c in args.config or ["convnet3-28"] for m in args.mode or list(MODES)]
    base = {r["config"]: r["ms_per_epoch"] for r in rows if r["mode"] == "fp32"}
    for r in rows:
        if r["config"] in base:
            r["x_fp32"] = round(r["ms_per_epoch"] / base[r["config"]], 2)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "epochs": args.epochs,
            "repeats": args.repeats, "batch": 100}
    emit(f"student training, one epoch ({meta['device']}, {meta['threads']} threads, torch {meta['torch']})",
         rows, ["config", "mode", "ipc", "images", "ms_per_epoch", "x_fp32", "s_per_student"], meta, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
