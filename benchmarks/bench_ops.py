"""Per-op benchmark: each fused op against its eager composite in nrrdd_ext.reference.

Prints, per op and size, the median time of the fused op and of the composite,
the bytes the fused op must move (each input read once, each output written once),
the achieved bandwidth against a device-to-device copy measured in the same run,
and the speed-up. ``--json PATH`` writes every row.

    python benchmarks/bench_ops.py --device cuda --json ops.json
    python benchmarks/bench_ops.py --device cpu --quick      # smoke test
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nrrdd_ext  # noqa: E402
from nrrdd_ext import reference as ref  # noqa: E402
from timing import copy_bandwidth_gbs, emit, graph_ms, median_ms, profile_table, rotation_count  # noqa: E402

# The BatchNorm input shapes of ResNet-18 at 224², with how many layers see each.
RESNET18_BN_SHAPES = [((64, 112, 112), 1), ((64, 56, 56), 4), ((128, 28, 28), 5),
                      ((256, 14, 14), 5), ((512, 7, 7), 5)]


PROFILE = None  # --profile PATH: each fused op's kernel table is appended there


def _time(row, fused, composite, dev, iters):
    """Eager time per call (CUDA events around each call: what a Python loop sees,
    launch overhead included) and, on CUDA, device time from CUDA-graph replays."""
    if PROFILE:
        profile_table(fused, dev, f"{row['op']} {row['shape']} (fused)", PROFILE)
    row["fused_ms"] = median_ms(fused, dev, iters)
    row["composite_ms"] = median_ms(composite, dev, iters)
    if dev.type == "cuda":
        row["fused_gpu_ms"] = graph_ms(fused, dev, iters)
        row["composite_gpu_ms"] = graph_ms(composite, dev, iters)
    return row


def bench_masked_step(dev, batch, size, classes, iters):
    B, C, H, W = batch, 3, size, size
    K, h = 512, max(1, size // 32)
    n_sets = rotation_count(7 * B * C * H * W * 4, dev)
    sets = []
    for _ in range(n_sets):
        sets.append(dict(x=torch.randn(B, C, H, W, device=dev), g=torch.randn(B, C, H, W, device=dev),
                         m=torch.randn(B, C, H, W, device=dev) * 0.1,
                         v=torch.rand(B, C, H, W, device=dev) * 0.1,
                         f=torch.randn(B, K, h, h, device=dev)))
    fc = torch.randn(classes, K, device=dev)
    y = torch.randint(0, classes, (B,), device=dev)
    step = torch.zeros((), device=dev)
    lo, hi = torch.full((C,), -2.0, device=dev), torch.full((C,), 2.0, device=dev)

    def fused(i):
        s = sets[i % n_sets]
        nrrdd_ext.masked_refine_step(s["x"], s["g"], s["f"], fc, y, s["m"], s["v"], step, lr=0.05,
                                     clamp_min=lo, clamp_max=hi)

    def composite(i):
        s = sets[i % n_sets]
        ref.masked_refine_step(s["x"], s["g"], s["f"], fc, y, s["m"], s["v"], step, lr=0.05,
                               clamp_min=lo, clamp_max=hi)

    nbytes = 7 * B * C * H * W * 4  # read x, g, m, v; write x, m, v
    return _time(dict(op="masked_refine_step", shape=f"{B}x{C}x{H}x{W}", bytes=nbytes),
                 fused, composite, dev, iters)


def bench_bn(dev, batch, shape, iters, channels_last=False):
    C = shape[0]
    numel = batch * C * shape[1] * shape[2]
    n_sets = rotation_count(3 * numel * 4, dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [(torch.randn(batch, *shape, device=dev) * 2 + 0.5).to(memory_format=fmt).requires_grad_()
          for _ in range(n_sets)]
    rm, rv = torch.randn(C, device=dev), torch.rand(C, device=dev) + 0.5

    def fused(i):
        x = xs[i % n_sets]
        torch.autograd.grad(nrrdd_ext.bn_stat_loss(x, rm, rv), x)

    def composite(i):
        x = xs[i % n_sets]
        torch.autograd.grad(ref.bn_stat_loss_sre2l(x, rm, rv), x)

    nbytes = 3 * numel * 4  # forward reads x; backward reads x, writes dL/dx
    name = "bn_stat_loss fwd+bwd" + (" (channels_last)" if channels_last else "")
    return _time(dict(op=name, shape=f"{batch}x{C}x{shape[1]}x{shape[2]}", bytes=nbytes),
                 fused, composite, dev, iters)


def bench_dbr(dev, rows, classes, iters):
    n_sets = rotation_count(2 * rows * classes * 4, dev)
    ls = [(torch.randn(rows, classes, device=dev) * 3).requires_grad_() for _ in range(n_sets)]
    yo = torch.randint(0, classes, (rows,), device=dev)
    ya = torch.randint(0, classes, (rows,), device=dev)
    to, ta = torch.rand(rows, device=dev) * 5, torch.rand(rows, device=dev) * 5

    def fused(i):
        l = ls[i % n_sets]
        torch.autograd.grad(nrrdd_ext.dbr_loss(l, yo, ya, to, ta), l)

    def composite(i):
        l = ls[i % n_sets]
        torch.autograd.grad(ref.dbr_loss(l, yo, ya, to, ta), l)

    nbytes = 3 * rows * classes * 4  # forward reads logits; backward reads them, writes the grad
    return _time(dict(op="dbr_loss fwd+bwd", shape=f"{rows}x{classes}", bytes=nbytes),
                 fused, composite, dev, iters)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--profile", metavar="PATH",
                   help="append a torch.profiler kernel table of each fused op to PATH (where the "
                        "device time of a multi-kernel op such as the masked step goes)")
    args = p.parse_args(argv)
    global PROFILE
    PROFILE = args.profile
    dev = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    if args.quick:
        rows.append(bench_masked_step(dev, 4, 32, 10, args.iters))
        rows.append(bench_bn(dev, 4, (16, 8, 8), args.iters))
        rows.append(bench_dbr(dev, 64, 10, args.iters))
        copy_gbs = copy_bandwidth_gbs(dev, 64 << 20, args.iters)
    else:
        copy_gbs = copy_bandwidth_gbs(dev, (2 << 30) if dev.type == "cuda" else (256 << 20), args.iters)
        rows.append(bench_masked_step(dev, 100, 224, 1000, args.iters))
        for shape, _layers in RESNET18_BN_SHAPES:
            rows.append(bench_bn(dev, 100, shape, args.iters))
        rows.append(bench_bn(dev, 100, (64, 56, 56), args.iters, channels_last=True))
        rows.append(bench_dbr(dev, 100, 1000, args.iters))
        rows.append(bench_dbr(dev, 4096, 1000, args.iters))
    for r in rows:
        t = r.get("fused_gpu_ms", r["fused_ms"])  # bandwidth from device time where measured
        r["fused_GBps"] = round(r["bytes"] / (t * 1e-3) / 1e9, 1)
        r["pct_of_copy"] = round(100 * r["fused_GBps"] / copy_gbs, 1)
        r["speedup"] = round(r["composite_ms"] / r["fused_ms"], 2)
        if "fused_gpu_ms" in r:
            r["gpu_speedup"] = round(r["composite_gpu_ms"] / r["fused_gpu_ms"], 2)
        for k in ("fused_ms", "composite_ms", "fused_gpu_ms", "composite_gpu_ms"):
            if k in r:
                r[k] = round(r[k], 4)
    meta = dict(device=str(dev), gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                torch=torch.__version__, copy_GBps=round(copy_gbs, 1), iters=args.iters)
    cols = ["op", "shape", "fused_ms", "composite_ms", "speedup"]
    if dev.type == "cuda":
        cols += ["fused_gpu_ms", "composite_gpu_ms", "gpu_speedup"]
    emit(f"# bench_ops on {meta['gpu']}, torch {meta['torch']}, copy {meta['copy_GBps']} GB/s (read+write)",
         rows, cols + ["fused_GBps", "pct_of_copy"], meta, args.json,
         "fused_ms / composite_ms: eager, per call, launch overhead included; *_gpu_ms: device "
         "time from CUDA-graph replays; GB/s and % of copy from the device time.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
