"""The ``nrrdd`` command line: a thin dispatcher over the library's commands.

Each command lives in its own module and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so
``nrrdd --help`` is instant. A :class:`nrrdd.errors.UsageError` becomes a
one-line ``nrrdd: error: ...`` and exit code 2. Under ``torchrun``, ``distill``,
``relabel`` and ``evaluate`` join the process group first (``nrrdd.distributed``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS = {
    "train-teacher": ("nrrdd.commands.train_teacher", "train a teacher on a real dataset"),
    "distill": ("nrrdd.commands.distill", "CIDD + NRR: write a distilled dataset"),
    "relabel": ("nrrdd.commands.relabel", "store DBR / soft / compact labels for a distilled set"),
    "evaluate": ("nrrdd.commands.evaluate", "train fresh students on a distilled set, report test top-1"),
    "run": ("nrrdd.commands.run", "the whole pipeline: teacher, distill, relabel, evaluate"),
    "report": ("nrrdd.commands.report", "collect eval_*.json files into a markdown table"),
    "status": ("nrrdd.commands.status", "where each run under a folder stands: stage, step, time left"),
}


# commands that run under ``torchrun`` (``nrrdd.distributed``)
DISTRIBUTED = ("distill", "relabel", "evaluate")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nrrdd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from nrrdd import distributed
    from nrrdd.errors import UsageError

    multi, where = False, ""
    try:
        if args.command in DISTRIBUTED:
            multi = distributed.init_from_env(getattr(args, "device", None))
            where = f" (rank {distributed.rank()} of {distributed.world()})" if multi else ""
        elif distributed.env_world() > 1 and args.command in ("train-teacher", "run"):
            raise UsageError(f"{args.command} is a single-process command; under torchrun, start "
                             f"{', '.join(DISTRIBUTED)}")
        run = importlib.import_module(COMMANDS[args.command][0]).run
        if multi:  # torchrun's failure summary then names the failing rank and its traceback
            from torch.distributed.elastic.multiprocessing.errors import record

            run = record(run)
        code = int(run(args) or 0)
    except UsageError as e:
        print(f"nrrdd {args.command}{where}: error: {e}", file=sys.stderr)
        return 2
    except distributed.PeerFailed as e:
        print(f"nrrdd {args.command}{where}: error: {e}", file=sys.stderr)
        return 1
    if multi:
        distributed.destroy()
    return code
