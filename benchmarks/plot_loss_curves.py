"""Overlay the refinement loss curves of distill runs (their log.jsonl) in one PNG.

Each run's logged terms are averaged over its batches at each logged iteration;
one line per run for the chosen term (``total`` by default). Used to compare
``nrrdd distill --fast`` with ``--no-fast`` (issue 8).

    python benchmarks/plot_loss_curves.py runs/fast runs/no-fast --term total --out curves.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def curve(path: Path, term: str):
    """[(iteration, mean of term over batches)] from a log.jsonl (or a folder holding one)."""
    log = path / "log.jsonl" if path.is_dir() else path
    if not log.is_file():
        raise SystemExit(f"no log.jsonl at {path}")
    by = defaultdict(list)
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if term not in rec:
            raise SystemExit(f"{log} has no term {term!r} (has {', '.join(sorted(rec))})")
        by[int(rec["iteration"])].append(float(rec[term]))
    return [(it, statistics.fmean(v)) for it, v in sorted(by.items())]


def main(argv=None) -> int:
    from nrrdd.charts import line_chart

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="distill output folders or log.jsonl files")
    p.add_argument("--term", default="total", help="ce, bn, lr or total")
    p.add_argument("--label", action="append", help="series names (default: the folder names)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    labels = args.label or [r.name if r.is_dir() else r.parent.name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error("give one --label per run")
    series = {name: curve(r, args.term) for name, r in zip(labels, args.runs)}
    line_chart(series, args.out, title=f"refinement loss ({args.term}), mean over batches",
               xlabel="iteration", ylabel=args.term)
    for name, pts in series.items():
        print(f"{name}: first {pts[0][1]:.4f}, last {pts[-1][1]:.4f} ({len(pts)} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
