"""Collect ``eval_*.json`` files (``nrrdd.student.evaluate``) into one markdown table.

One row per evaluation: dataset, method, IPC, labels (``+online`` when the
teacher ran during training, the non-default student settings in parentheses,
``[holdout]`` when scored on held-out training images), student, last-epoch top-1 mean ± std over the
seeds (n), and the bytes the labels take on disk (with the ratio to float16 soft
labels). Method and IPC come from the eval file, else from the distilled
folder's ``config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Sequence

from nrrdd.errors import UsageError

COLUMNS = ("dataset", "method", "IPC", "labels", "student", "top-1 (%)", "label bytes")


def find_eval_files(paths: Iterable[str | Path]) -> List[Path]:
    """``eval_*.json`` files given directly or anywhere under the given folders, sorted."""
    found: List[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(q for q in p.rglob("eval_*.json") if not any(s.startswith(".") for s in q.parts))
        else:
            raise UsageError(f"{p} does not exist")
    return sorted(set(found))


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n} B"


def row(path: Path) -> dict:
    """One table row from one eval file."""
    try:
        e = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    if "top1" not in e or "top1_mean" not in e:
        raise UsageError(f"{path} is not an nrrdd eval file (no top1)")
    config = {}
    if (path.parent / "config.json").is_file():
        try:
            config = json.loads((path.parent / "config.json").read_text())
        except ValueError:
            pass
    labels = e.get("labels", "?") + ("+online" if e.get("online") else "")
    if e.get("variant"):  # non-default student settings (nrrdd.student.eval_variant)
        labels += f" ({e['variant']})"
    if e.get("eval_split", "test") != "test":
        labels += f" [{e['eval_split']}]"
    ratio = e.get("label_ratio_to_soft")
    size = human_bytes(e.get("label_bytes"))
    if ratio is not None and e.get("label_bytes"):
        size += f" ({ratio:.3g}× soft)"
    n = len(e["top1"])
    return {
        "dataset": e.get("dataset") or config.get("dataset") or "?",
        "method": e.get("method") or config.get("method") or "?",
        "IPC": e.get("ipc") or config.get("ipc") or "?",
        "labels": labels,
        "student": e.get("student", "?"),
        "top-1 (%)": f"{e['top1_mean']:.2f} ± {e.get('top1_std', 0.0):.2f} (n={n})",
        "label bytes": size,
        "_file": str(path),
    }


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def report(paths: Iterable[str | Path]) -> str:
    """The markdown table for every eval file under ``paths``."""
    files = find_eval_files(paths)
    if not files:
        raise UsageError("no eval_*.json files found (run `nrrdd evaluate` first)")
    rows = sorted((row(f) for f in files),
                  key=lambda r: (str(r["dataset"]), str(r["method"]), str(r["IPC"]), r["labels"],
                                 r["student"]))
    return markdown_table(rows)
