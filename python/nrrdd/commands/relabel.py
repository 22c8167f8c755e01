"""``nrrdd relabel``: store DBR / soft / compact labels for a distilled set (``nrrdd.relabel``)."""
from __future__ import annotations

import argparse

from nrrdd.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distilled", required=True, help="distilled folder (images.pt, labels.pt, config.json)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the one config.json names)")
    p.add_argument("--mode", required=True, choices=("dbr", "soft", "onehot", "compact"))
    p.add_argument("--epochs", type=int, required=True, help="student epochs to label (300 in the paper)")
    p.add_argument("--seed", type=int, default=0, help="augmentation replay seed")
    p.add_argument("--batch-size", type=int, default=100, help="student batch size (100 in the paper)")
    p.add_argument("--mix", choices=("cutmix", "mixup", "none"), default="cutmix")
    p.add_argument("--min-scale", type=float, default=None,
                   help="RandomResizedCrop's smallest area fraction (default 1/factor, RDED)")
    p.add_argument("--temperature", type=float, default=None,
                   help="compact mode's softmax temperature (default 20 with CutMix, 4 with Mixup)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue after the last finished epoch")
    p.add_argument("--force", action="store_true", help="discard existing labels of this mode")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from nrrdd import distributed as D
    from nrrdd.devices import resolve_device
    from nrrdd.distilled_set import load_distilled
    from nrrdd.relabel import default_augment, relabel, resolve_teacher_path
    from nrrdd.teacher import load_teacher

    if args.batch_size < 1:
        raise UsageError("--batch-size must be positive")
    if args.min_scale is not None and not 0 < args.min_scale <= 1:
        raise UsageError("--min-scale must be in (0, 1]")
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError("--temperature must be positive")
    device = resolve_device(D.local_device(args.device))
    ds = load_distilled(args.distilled)
    augment = default_augment(ds, args.batch_size, args.mix, args.min_scale)
    model, meta = load_teacher(resolve_teacher_path(ds, args.teacher), device)
    m = relabel(ds, model, meta, args.mode, args.epochs, seed=args.seed, augment=augment,
                temperature=args.temperature, device=device, resume=args.resume, force=args.force,
                quiet=args.quiet)
    ratio = m["ratio_to_soft"]
    if D.is_main():
        print(f"{args.mode} labels for {m['num_images']} images x {m['epochs']} epochs: "
              f"{m['bytes_stored']} bytes ({m['bytes_per_image_per_epoch']} per image per epoch, "
              f"{ratio:.4f} of soft labels) in {m['seconds']:.1f}s -> {ds.path / ('labels_' + args.mode)}")
    return 0
