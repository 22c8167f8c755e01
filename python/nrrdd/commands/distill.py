"""``nrrdd distill``: CIDD + NRR on a real dataset, written to an output folder.

See :mod:`nrrdd.distill` for the files written, resume and the work units.
"""
from __future__ import annotations

import argparse
import sys

from nrrdd.errors import UsageError


def _mipc(value: str):
    if value.lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mipc takes a count or 'all', got {value!r}") from None
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data and teacher")
    d.add_argument("--dataset", required=True, help="fashion-mnist, cifar10, cifar100 or imagefolder")
    d.add_argument("--data-dir", default=None)
    d.add_argument("--image-size", type=int, default=None, help="default: the teacher's")
    d.add_argument("--teacher", required=True, help="checkpoint from `nrrdd train-teacher`, or a "
                   "timm/torchvision state dict (then give --teacher-arch)")
    d.add_argument("--teacher-arch", default=None, help="arch of a plain state-dict teacher")
    d.add_argument("--holdout-per-class", type=int, default=0,
                   help="keep this many training images per class out of distillation, for "
                        "`nrrdd evaluate --eval-split holdout` (nrrdd.data.holdout_split; default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--ipc", type=int, required=True, help="images per class")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--resume", action="store_true", help="continue the run in --out")
    o.add_argument("--force", action="store_true", help="overwrite a run in --out")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    c = p.add_argument_group("CIDD (Sec. 3.2)")
    c.add_argument("--mipc", type=_mipc, default=300, help="real images per class, or 'all' (300)")
    c.add_argument("--num-crop", type=int, default=5, help="random resized crops per image (5)")
    c.add_argument("--top-t", type=int, default=1, help="crops kept per image by CAM score (1)")
    # the default is nrrdd.cidd.CROP_SCALE, written out: building the parser imports no torch
    c.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="area fraction of the random resized crops (%(default)s, torchvision's default)")
    c.add_argument("--factor", type=int, default=2, help="patches per side of a synthetic image (2)")
    c.add_argument("--select", choices=("lowest", "highest", "random"), default="lowest",
                   help="teacher-confidence selection (lowest: NRR-DD; highest: RDED)")
    r = p.add_argument_group("NRR (Sec. 3.3)")
    r.add_argument("--iterations", type=int, default=2000, help="0: CIDD images, no refinement")
    r.add_argument("--batch-size", type=int, default=100)
    r.add_argument("--mask", choices=("cam", "none"), default="cam",
                   help="cam: non-critical mask; none: all-pixel update (SRe2L)")
    r.add_argument("--label-refine", action=argparse.BooleanOptionalAction, default=True,
                   help="the CutMix label-refinement loss L_lr (Eq. 12)")
    r.add_argument("--lr", type=float, default=0.05)
    r.add_argument("--cam-eps", type=float, default=0.5, help="epsilon of the mask (Eq. 4)")
    r.add_argument("--r", type=float, default=0.4, help="margin r of L_lr (Eq. 12)")
    r.add_argument("--alpha-lr", type=float, default=1.0)
    r.add_argument("--alpha-bn", type=float, default=0.01)
    r.add_argument("--first-bn-multiplier", type=float, default=10.0)
    r.add_argument("--log-every", type=int, default=100)
    r.add_argument("--cuda-graph", action="store_true", help="capture each iteration in a CUDA graph")
    r.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the fast refine path: BatchNorm folded into the teacher's convs and channels_last "
                        "activations, and on CUDA bf16 autocast and a CUDA graph (default: on for CUDA, off "
                        "on the CPU, where it is float32 and takes about 0.66x the plain step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch

    from nrrdd import distributed as D
    from nrrdd.distill import DistillSettings, distill

    if args.resume and args.force:
        raise UsageError("--resume and --force exclude each other")
    device = D.local_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = DistillSettings(
        dataset=args.dataset, teacher=args.teacher, ipc=args.ipc, out=args.out,
        data_dir=args.data_dir, image_size=args.image_size, teacher_arch=args.teacher_arch,
        iterations=args.iterations, factor=args.factor, mipc=args.mipc, num_crop=args.num_crop,
        top_t=args.top_t, crop_min_scale=args.crop_scale[0], crop_max_scale=args.crop_scale[1],
        select=args.select, mask=args.mask, label_refine=args.label_refine,
        batch_size=args.batch_size, seed=args.seed, device=device, cuda_graph=args.cuda_graph,
        fast=args.fast, holdout_per_class=args.holdout_per_class,
        lr=args.lr, cam_eps=args.cam_eps, r=args.r, alpha_lr=args.alpha_lr,
        alpha_bn=args.alpha_bn, first_bn_multiplier=args.first_bn_multiplier,
        log_every=args.log_every, quiet=args.quiet)
    try:
        res = distill(settings, resume=args.resume, force=args.force)
    except KeyboardInterrupt:
        if D.is_main():
            print(f"nrrdd distill: interrupted; finished work is saved in {args.out}: rerun with "
                  "--resume to continue", file=sys.stderr)
        return 130
    t = res.timings
    if not args.quiet and D.is_main():
        stages = ", ".join(f"{k} {t[k]:.1f}s" for k in ("load", "cidd", "refine", "write", "total") if k in t)
        print(f"wrote {res.images.shape[0]} images ({tuple(res.images.shape[1:])}) to {res.out}"
              + (f" [{stages}]" if stages else ""))
    return 0
