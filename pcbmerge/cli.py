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
from pcbmerge import console

# One line per subcommand module, in the order `--help` lists them.
COMMANDS = [
    "pcbmerge.commands.merge",
    "pcbmerge.commands.eval",
    "pcbmerge.commands.zoo",
    "pcbmerge.commands.demo",
    "pcbmerge.commands.run",
    "pcbmerge.commands.lineage",
    "pcbmerge.commands.search",
    "pcbmerge.commands.tune",
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
MERGING = {"merge", "run", "search", "tune", "demo", "watch"}
# Subcommands whose work is done when their handler returns (no background threads, servers or atexit
# duties): run as the `pcbmerge` command, they end with os._exit once their output is flushed, skipping
# the interpreter's teardown of torch's modules (~0.25 s of a 2 s merge of a small model).
QUICK_EXIT = {"merge"}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line, not a caller's list
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if command in MERGING:
            restart_with_malloc_settings("pcbmerge", sys.argv[1:])

    words = sys.argv[1:] if argv is None else argv
    console.configure(verbose=any(w in ("-v", "--verbose") for w in words))  # before the commands import their libraries
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except MergeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:  # only an unreachable service is ours to word; anything else re-raises
        from pipeline.retry import is_transient
        from pipeline.settings import load_settings

        if not is_transient(exc):
            raise
        reason = " ".join(str(exc).split())[:300]
        print(
            f"error: a service did not answer after retries ({type(exc).__name__}: {reason}); check the MLflow tracking store "
            f"{load_settings().tracking_uri} and the Prefect API, then run the same command again: finished steps are reused",
            file=sys.stderr,
        )
        code = 3
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
