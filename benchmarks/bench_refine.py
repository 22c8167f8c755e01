"""One NRR refinement iteration: the SRe2L-style eager reference against this package.

Modes (each the real code path):

- ``reference``: ``nrrdd_ext.reference.refine_iteration``: a forward hook per
  BatchNorm (mean + ``permute(1,0,2,3).contiguous().view(C,-1).var()``), the
  composite full-resolution CAM mask multiplied into the gradient,
  ``torch.optim.Adam``, both losses in one backward.
- ``fused``: ``nrrdd.refine.Refiner.iteration``, the code ``nrrdd distill`` runs:
  ``BNStatHooks``, ``label_refine_loss``, ``masked_refine_step``, the two
  backward passes one after the other.
- ``fused+graph``: the same iteration captured in one CUDA graph and replayed.
- ``fast``: the fast path, ``Refiner`` with ``nrrdd.refine.fast_config`` (what
  ``nrrdd distill --fast`` runs): BatchNorm folded into the convs and
  channels_last activations, and on CUDA bf16 autocast and the whole iteration
  as one CUDA graph (float32 on the CPU).
- ``fast-floor``: the network's own cost on the fast path: two CE-only passes
  through the folded teacher in channels_last (bf16 and one CUDA graph on CUDA).
- ``floor``: two plain forward/backward passes w.r.t. the input with CE only
  (no BN loss, mask or optimizer): the network's own cost. ``floor+graph``: the
  same as a CUDA graph.

CUDA: median of CUDA-event times over ``--iters`` iterations after warm-up;
peak memory is ``torch.cuda.max_memory_allocated`` after a reset made before
the mode's first allocation (for graphs, before capture, so the graph's private
pool is counted). CPU: wall time, and the peak RSS of a fresh process per mode.

``s_per_image``: ms x 2000 iterations / batch, the refinement cost of one
image at the paper's iteration count.

    python benchmarks/bench_refine.py --device cuda --json refine.json
    python benchmarks/bench_refine.py --device cpu --config convnet3-28 --iters 3
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import emit, median_ms, profile_table  # noqa: E402

# name -> (arch, image size, channels, classes)
CONFIGS = {
    "resnet18-224": ("resnet18", 224, 3, 1000),
    "resnet18-32": ("resnet18", 32, 3, 10),
    "resnet50-224": ("resnet50", 224, 3, 1000),
    "convnet3-28": ("convnet3", 28, 1, 10),
}
MODES = ("reference", "fused", "fused+graph", "fast", "floor", "floor+graph", "fast-floor")
# refinement iterations per image in the paper (Appendix A), for the per-image cost
PAPER_ITERATIONS = 2000


def _teacher(arch, size, channels, classes, dev):
    """A randomly initialised teacher whose BN running statistics come from a few
    train-mode passes over random data (as a trained teacher's would be non-trivial)."""
    from nrrdd.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, classes, channels, size).to(dev)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, channels, size, size, device=dev))
    return model.eval().requires_grad_(False)


def _inputs(batch, channels, size, classes, dev):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, channels, size, size, generator=g).to(dev)
    y = (torch.arange(batch) % classes).to(dev)
    return x0, y, g


def run_mode(config: str, mode: str, dev: torch.device, batch: int, iters: int,
             profile: str = None) -> dict:
    import nrrdd_ext
    from nrrdd.models import cam_interface
    from nrrdd.refine import RefineConfig, Refiner, fast_config

    arch, size, channels, classes = CONFIGS[config]
    teacher = _teacher(arch, size, channels, classes, dev)
    lo = torch.full((channels,), -2.5, device=dev)
    hi = torch.full((channels,), 2.5, device=dev)
    x0, y, gen = _inputs(batch, channels, size, classes, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    cfg = RefineConfig(iterations=max(iters + 20, 50))

    if mode == "reference":
        cam = cam_interface(teacher)
        hooks = [nrrdd_ext.reference.BNFeatureHook(m) for m in teacher.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        perm = torch.randperm(batch, generator=gen).to(dev)
        box = (size // 4, size // 4 + size // 2, size // 4, size // 4 + size // 2)
        fc = cam.classifier_weight()

        def step(i):
            nrrdd_ext.reference.refine_iteration(
                x, y, opt, cam.forward_features, cam.forward_head, fc, hooks, perm=perm, box=box,
                alpha_bn=cfg.alpha_bn, first_bn_multiplier=cfg.first_bn_multiplier,
                alpha_lr=cfg.alpha_lr, r=cfg.r, cam_eps=cfg.cam_eps, clamp_min=lo, clamp_max=hi)
    elif mode in ("fused", "fused+graph"):
        refiner = Refiner(teacher, cfg, lo, hi).__enter__()
        st = refiner.prepare(x0, y, gen)
        if mode == "fused":
            step = lambda i: refiner.iteration(st)  # noqa: E731
        else:
            replay = refiner.capture(st)
            step = lambda i: replay()  # noqa: E731
    elif mode == "fast":
        refiner = Refiner(teacher, fast_config(cfg, dev), lo, hi,
                          input_shape=(channels, size, size)).__enter__()
        st = refiner.prepare(x0, y, gen)
        if refiner.config.cuda_graph:
            replay = refiner.capture(st)
            step = lambda i: replay()  # noqa: E731
        else:
            step = lambda i: refiner.iteration(st)  # noqa: E731
    else:
        x = x0.clone().requires_grad_(True)
        perm = torch.randperm(batch, generator=gen).to(dev)
        box = (size // 4, size // 4 + size // 2, size // 4, size // 4 + size // 2)

        net, cast, nhwc = teacher, False, mode == "fast-floor"
        if nhwc:  # the fast path's layout on every device; its bf16 on CUDA only
            net, _ = nrrdd_ext.fold_batchnorm(teacher, x0[:2])
            net = net.to(memory_format=torch.channels_last)
            cast = dev.type == "cuda"

        def forward(inp):
            if nhwc:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cast, cache_enabled=False):
                return net(inp).float()

        def plain(i=0):
            x.grad = None
            F.cross_entropy(forward(x), y).backward()
            F.cross_entropy(forward(nrrdd_ext.reference.cutmix(x, perm, box)), y).backward()

        step = plain
        if mode == "floor+graph" or (mode == "fast-floor" and dev.type == "cuda"):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(3):
                    plain()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            x.grad = None
            with torch.cuda.graph(graph):
                plain()
            step = lambda i: graph.replay()  # noqa: E731

    ms = median_ms(step, dev, iters, warmup=3 if dev.type == "cuda" else 1)
    row = dict(config=config, mode=mode, batch=batch, ms=round(ms, 3),
               s_per_image=round(ms * PAPER_ITERATIONS / batch / 1000, 4))
    if profile:
        profile_table(step, dev, f"{config} {mode}", profile)
    if dev.type == "cuda":
        row["peak_GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    else:
        row["peak_RSS_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return row


def _run_isolated(args):
    return run_mode(*args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", action="append", choices=sorted(CONFIGS),
                   help="repeatable; default: all on CUDA, convnet3-28 on CPU")
    p.add_argument("--mode", action="append", choices=MODES, help="repeatable; default: all that apply")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--profile", metavar="PATH",
                   help="append a torch.profiler op table of each config and mode to PATH")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    configs = args.config or (list(CONFIGS) if dev.type == "cuda" else ["convnet3-28"])
    modes = args.mode or [m for m in MODES if dev.type == "cuda" or "graph" not in m]
    if dev.type != "cuda" and any("graph" in m for m in modes):
        p.error("graph modes need --device cuda")
    rows = []
    for config in configs:
        for mode in modes:
            if dev.type == "cuda":
                row = run_mode(config, mode, dev, args.batch, args.iters, args.profile)
            else:  # a fresh process per mode, so its peak RSS is its own
                with mp.get_context("spawn").Pool(1) as pool:
                    row = pool.apply(_run_isolated,
                                     ((config, mode, dev, args.batch, args.iters, args.profile),))
            rows.append(row)
            print(row, flush=True)
    by = {(r["config"], r["mode"]): r for r in rows}
    for r in rows:
        ref = by.get((r["config"], "reference"))
        floor = by.get((r["config"], "floor"))
        if ref:
            r["x_reference"] = round(r["ms"] / ref["ms"], 3)
            mem = "peak_GiB" if "peak_GiB" in r else None
            if mem:
                r["mem_x_reference"] = round(r[mem] / ref[mem], 3)
        if floor:
            r["x_floor"] = round(r["ms"] / floor["ms"], 3)
    meta = dict(device=str(dev), gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                torch=torch.__version__, iters=args.iters, batch=args.batch, threads=torch.get_num_threads())
    cols = ["config", "mode", "ms", "x_reference", "x_floor", "s_per_image"]
    cols += ["peak_GiB", "mem_x_reference"] if dev.type == "cuda" else ["peak_RSS_GiB"]
    emit(f"# bench_refine on {meta['gpu']}, torch {meta['torch']}, batch {args.batch}", rows, cols,
         meta, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
