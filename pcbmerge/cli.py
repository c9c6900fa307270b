"""`pcbmerge` command line.

Each subcommand lives in its own module under `pcbmerge/commands/` and exposes `register(subparsers)`,
which adds its parser and sets `func` to a handler `(args) -> int`. Bad input (`MergeInputError`) is printed
as one sentence on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pcbcore.errors import MergeInputError
from pcbcore.memory import restart_with_malloc_settings

# One line per subcommand module, in the order `--help` lists them.
COMMANDS = [
    "pcbmerge.commands.merge",
    "pcbmerge.commands.eval",
    "pcbmerge.commands.zoo",
    "pcbmerge.commands.demo",
    "pcbmerge.commands.run",
    "pcbmerge.commands.lineage",
    "pcbmerge.commands.search",
    "pcbmerge.commands.up",
    "pcbmerge.commands.watch",
    "pcbmerge.commands.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcbmerge", description="Merge fine-tuned checkpoints of one base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


# Subcommands that merge: run as the `pcbmerge` command, they restart once with glibc's malloc tuned for
# block-sized temporaries (`pcbcore.memory`).
MERGING = {"merge", "run", "search", "demo", "watch"}
# Subcommands whose work is done when their handler returns (no background threads, servers or atexit
# duties): run as the `pcbmerge` command, they end with os._exit once their output is flushed, skipping
# the interpreter's teardown of torch's modules (~0.25 s of a 2 s merge of a small model).
QUICK_EXIT = {"merge"}


def main(argv: list[str] | None = None) -> int:
    from pipeline.environment import quiet_defaults

    if argv is None:  # the command line, not a caller's list
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if command in MERGING:
            restart_with_malloc_settings("pcbmerge", sys.argv[1:])

    quiet_defaults()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = int(args.func(args) or 0)
    except MergeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    if argv is None and args.command in QUICK_EXIT:
        end_now(code)
    return code


def end_now(code: int) -> None:
    """Flush what is buffered and end the process without the interpreter's teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
