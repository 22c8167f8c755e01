"""``nrrdd status DIR...``: where each run under DIR stands, and each teacher training
under way (``nrrdd.progress``)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="DIR",
                   help="a distilled folder, a `nrrdd run` output, or a folder above several")
    p.add_argument("--json", action="store_true",
                   help='print the progress as JSON: {"runs": [one object per distilled set], '
                        '"teacher_trainings": [one per teacher training under way]}')


def run(args: argparse.Namespace) -> int:
    import json

    from nrrdd.progress import find_runs, format_progress, format_teacher_progress, progress, teacher_progress

    distilled, trainings = find_runs(args.paths)
    runs = [progress(d) for d in distilled]
    teachers = [teacher_progress(t) for t in trainings]
    if args.json:
        print(json.dumps({"runs": runs, "teacher_trainings": teachers}, indent=2, sort_keys=True))
    else:
        print("\n".join([format_teacher_progress(t) for t in teachers] + [format_progress(p) for p in runs]))
    return 0
