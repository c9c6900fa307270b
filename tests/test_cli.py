"""The command line itself: every subcommand registers, and starting it stays light."""

from __future__ import annotations

import subprocess
import sys

from pcbmerge.cli import COMMANDS, build_parser


def test_every_command_module_registers_a_subcommand():
    parser = build_parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert len(names) >= len(COMMANDS)


def test_building_the_parser_imports_no_heavy_library():
    """`pcbmerge --help` and bad-input errors must answer in about a second, not after importing
    transformers, lm-eval, Prefect or MLflow (seconds each); command handlers import them when run."""
    code = (
        "import sys; from pcbmerge.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('transformers', 'lm_eval', 'prefect', 'mlflow', 'dask', 'cma') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert out == "", f"imported at parser build: {out}"
