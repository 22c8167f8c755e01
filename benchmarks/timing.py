"""Timing and memory measurement shared by the benchmarks.

CUDA: median of CUDA-event times after warm-up; inputs rotated over several
copies so that a small working set is not served from L2. CPU: median wall time.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, List, Sequence

import torch


def rotation_count(bytes_per_set: int, device: torch.device, floor_bytes: int = 256 << 20) -> int:
    """How many input copies to cycle through so the working set exceeds L2."""
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    return int(max(1, min(16, -(-floor_bytes // bytes_per_set))))


def median_ms(fn: Callable[[int], None], device: torch.device, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of fn(i), i = 0, 1, ... (i selects the rotated input)."""
    for i in range(warmup):
        fn(i)
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for i in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[int], None], device: torch.device, iters: int, reps: int = 10) -> float:
    """Median GPU milliseconds of one fn(i) call, from replays of a CUDA graph that
    holds ``reps`` calls (i = 0 .. reps-1): the device time without launch overhead."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    return median_ms(lambda i: graph.replay(), device, iters, warmup=2) / reps


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), device, iters)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def emit(title: str, rows: Sequence[dict], columns: Sequence[str], meta: dict,
         json_path: str = None, note: str = None) -> None:
    """Print the title line and the table (and a note); write meta + rows as JSON."""
    print(title)
    print(format_table(rows, columns))
    if note:
        print(note)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=list(rows)), f, indent=2)


def profile_table(fn: Callable[[int], None], device: torch.device, title: str, path: str,
                  iters: int = 5) -> None:
    """Where the time of fn(0..iters-1) goes: torch.profiler's op and kernel table, by
    device time (on CUDA) and by CPU time, appended to ``path`` under ``title``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(iters):
            fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    avg = prof.key_averages()
    with open(path, "a") as f:
        f.write(f"\n## {title} ({iters} iterations)\n")
        if device.type == "cuda":
            f.write(avg.table(sort_by="self_cuda_time_total", row_limit=25) + "\n")
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=25) + "\n")
