"""``nrrdd report DIR...``: eval_*.json files into a markdown table (``nrrdd.report``)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="DIR", help="folders (searched recursively) or eval files")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")


def run(args: argparse.Namespace) -> int:
    from nrrdd import storage
    from nrrdd.report import report

    table = report(args.paths)
    print(table, end="")
    if args.out:
        storage.write_bytes(table.encode(), Path(args.out))
    return 0
