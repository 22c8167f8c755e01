"""``nrrdd status DIR...``: where each run under DIR stands (``nrrdd.progress``)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="DIR",
                   help="a distilled folder, a `nrrdd run` output, or a folder above several")
    p.add_argument("--json", action="store_true", help="print the progress as JSON, one object per run")


def run(args: argparse.Namespace) -> int:
    import json

    from nrrdd.progress import find_distilled, format_progress, progress

    runs = [progress(d) for d in find_distilled(args.paths)]
    if args.json:
        print(json.dumps(runs, indent=2, sort_keys=True))
    else:
        print("\n".join(format_progress(p) for p in runs))
    return 0
