"""The study's committed record: one CSV row per (IPC, method, label mode, distillation).

A study's run folders (run.json, the evaluation files) live outside the repository and
are lost with the machine; ``docs/results/fashion_mnist_students.csv`` keeps what the
tables and figures of docs/RESULTS.md are made of, so they can be checked and redrawn.
Columns:

- ``ipc``, ``method`` (the study's method names: nrr-nolr, sre2l-nolr and settings such as
  ``nrr@cam_eps=0.3`` included),
  ``labels`` (soft, onehot, compact, dbr), ``distillation`` (the ``nrrdd run --seed``);
- ``students``, ``mean``, ``std``: the top-1 (%) of the set's students at their last epoch
  on the full test set, population std (ddof 0);
- ``top1``: the students' values, space-separated, when they are known (rows written by
  ``fashion_mnist_study.py --record``); empty for rows transcribed from an earlier
  session's table, whose run folders are gone;
- ``measured``: the day (ISO, UTC) the last of the students finished (its evaluation file);
- ``teacher``: the teacher that distilled and labelled the set, as ``arch accuracy``
  (``convnet3 0.9224``).

One record holds one study: one teacher, one protocol (ConvNet-3 students and the
paper's protocol for docs/RESULTS.md). Writing merges: a row replaces the row of the
same (ipc, method, labels, distillation) and every other row stays; rows of another
teacher are refused (write them to a record of their own), so a study with another
teacher never replaces this one's numbers.

    python benchmarks/results_record.py docs/results/fashion_mnist_students.csv \\
        --figure docs/figures/fashion_mnist_accuracy_ipc.png
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from pathlib import Path

FIELDS = ("ipc", "method", "labels", "distillation", "students", "mean", "std", "top1", "measured", "teacher")
KEY = ("ipc", "method", "labels", "distillation")
# the order of the paper's ablation, then the study's extra methods; others after them by name
METHOD_ORDER = ("random", "rded", "cidd", "sre2l", "nrr", "nrr-nolr", "sre2l-nolr")


def _parse(raw: dict, where: str) -> dict:
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise ValueError(f"{where}: no column {', '.join(missing)}")
    try:
        row = {"ipc": int(raw["ipc"]), "method": raw["method"], "labels": raw["labels"],
               "distillation": int(raw["distillation"]), "students": int(raw["students"]),
               "mean": float(raw["mean"]), "std": float(raw["std"]),
               "top1": [float(v) for v in raw["top1"].split()], "measured": raw["measured"],
               "teacher": raw["teacher"]}
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    check(row, where)
    return row


def check(row: dict, where: str = "row") -> None:
    """A row's numbers agree with each other: students > 0, std >= 0, and when the
    students' values are given, their count, mean and population std."""
    if row["ipc"] < 1 or row["students"] < 1 or row["distillation"] < 0:
        raise ValueError(f"{where}: ipc, students must be >= 1 and distillation >= 0")
    if not (math.isfinite(row["mean"]) and math.isfinite(row["std"]) and row["std"] >= 0):
        raise ValueError(f"{where}: mean and std must be finite, std >= 0")
    v = row["top1"]
    if v:
        if len(v) != row["students"]:
            raise ValueError(f"{where}: {len(v)} values in top1 but students = {row['students']}")
        if abs(statistics.fmean(v) - row["mean"]) > 0.006 or abs(statistics.pstdev(v) - row["std"]) > 0.006:
            raise ValueError(f"{where}: top1 {v} has mean {statistics.fmean(v):.3f} and std "
                             f"{statistics.pstdev(v):.3f}, the row says {row['mean']} and {row['std']}")


def read(path: Path) -> list:
    with open(path, newline="") as f:
        return [_parse(raw, f"{path}:{k + 2}") for k, raw in enumerate(csv.DictReader(f))]


def teacher_name(arch: str, test_accuracy) -> str:
    """How the record names a teacher: its arch and test accuracy (run.json's ``teacher``)."""
    return f"{arch} {float(test_accuracy):.4f}" if test_accuracy is not None else f"{arch} unknown"


def from_values(ipc: int, method: str, labels: str, distillation: int, values, measured: str,
                teacher: str) -> dict:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"ipc {ipc} {method} {labels} distillation {distillation}: no students")
    return {"ipc": ipc, "method": method, "labels": labels, "distillation": distillation,
            "students": len(values), "mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "top1": values, "measured": measured, "teacher": teacher}


def _method_key(method: str):
    """The paper's order, then the extra methods; a method at a setting (``nrr@cam_eps=0.3``,
    the study's test-set cell of a swept value) under its method."""
    base = method.partition("@")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)), method != base, method


def _sort_key(row: dict):
    return row["ipc"], _method_key(row["method"]), row["labels"], row["distillation"]


def merge(path: Path, rows) -> tuple:
    """Write ``rows`` into the CSV at ``path``: each replaces the row with its key, the
    others stay. Returns (added, replaced). Written to a temporary file, then renamed.
    Rows of a teacher other than the record's are refused before anything is written."""
    rows = list(rows)
    for r in rows:
        check(r, f"{r['ipc']}/{r['method']}/{r['labels']}/{r['distillation']}")
    old = read(path) if path.is_file() else []
    teachers = {r["teacher"] for r in old} | {r["teacher"] for r in rows}
    if len(teachers) > 1:
        raise ValueError(f"{path}: one record holds one teacher's students, these rows would mix "
                         f"{', '.join(sorted(teachers))}; write the other teacher's rows to a record of their own")
    by_key = {tuple(r[k] for k in KEY): r for r in old}
    new = {tuple(r[k] for k in KEY): r for r in rows}
    replaced = sum(k in by_key for k in new)
    by_key.update(new)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        for r in sorted(by_key.values(), key=_sort_key):
            w.writerow({**r, "mean": f"{r['mean']:.2f}", "std": f"{r['std']:.2f}",
                        "top1": " ".join(f"{v:g}" for v in r["top1"])})
    os.replace(tmp, path)
    return len(new) - replaced, replaced


def pooled(rows, labels: str = "soft") -> dict:
    """(ipc, method) -> every student of every distillation of that cell pooled, from the
    rows' counts, means and stds: {"mean", "std" (population), "students", "distillations"}."""
    cells = {}
    for r in rows:
        if r["labels"] == labels:
            cells.setdefault((r["ipc"], r["method"]), []).append(r)
    out = {}
    for key, rs in cells.items():
        n = sum(r["students"] for r in rs)
        mean = sum(r["students"] * r["mean"] for r in rs) / n
        second = sum(r["students"] * (r["std"] ** 2 + r["mean"] ** 2) for r in rs) / n
        out[key] = {"mean": mean, "std": math.sqrt(max(second - mean * mean, 0.0)), "students": n,
                    "distillations": len(rs)}
    return out


def accuracy_figure(rows, path: Path, labels: str = "soft") -> Path:
    """Top-1 against IPC (log scale), a line per method, every distillation pooled."""
    from nrrdd.charts import line_chart

    by_method = {}
    for (ipc, method), c in sorted(pooled(rows, labels).items(), key=lambda kv: (_method_key(kv[0][1]), kv[0][0])):
        by_method.setdefault(method, []).append((ipc, c["mean"]))
    return line_chart(by_method, path, title=f"Fashion-MNIST, ConvNet-3, {labels} labels",
                      xlabel="images per class (log scale)", ylabel="top-1 %", log_x=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("record", type=Path, help="the CSV (docs/results/fashion_mnist_students.csv)")
    p.add_argument("--labels", default="soft", help="the label mode to pool and draw (soft)")
    p.add_argument("--figure", type=Path, default=None, help="write top-1 against IPC here (PNG)")
    args = p.parse_args(argv)
    if not args.record.is_file():
        p.error(f"{args.record} does not exist")
    try:
        rows = read(args.record)
    except ValueError as e:
        p.error(str(e))
    cells = pooled(rows, args.labels)
    if not cells:
        p.error(f"{args.record} has no rows with labels {args.labels!r}")
    print(f"| IPC | method | {args.labels} top-1, all students | students | distillations |")
    print("| --- | --- | --- | --- | --- |")
    for (ipc, method), c in sorted(cells.items(), key=lambda kv: (kv[0][0], _method_key(kv[0][1]))):
        print(f"| {ipc} | {method} | {c['mean']:.2f} ± {c['std']:.2f} | {c['students']} | {c['distillations']} |")
    if args.figure:
        print(f"wrote {accuracy_figure(rows, args.figure, args.labels)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # a checkout's nrrdd first
    raise SystemExit(main())
