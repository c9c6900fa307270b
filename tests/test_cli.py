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


def test_merge_command_ends_with_its_output_whole(tiny_zoo, tmp_path):
    """`pcbmerge merge` ends with os._exit once done: stdout must still be flushed, the folder complete,
    and bad input must still exit 2 with its sentence."""
    import json

    from pcbcore.checkpoint import CheckpointReader

    base, models = tiny_zoo
    config = tmp_path / "ties.yml"
    lines = ["merge_method: ties", f"base_model: {base}", "models:"] + [f"  - model: {m}\n    parameters: {{density: 0.5}}" for m in models]
    config.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pcbmerge", "merge", str(config), str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["method"] == "ties" and report["tensors_merged"] > 0
    merged = CheckpointReader(tmp_path / "out")
    assert len(merged.tensors) == report["tensors_merged"] + report["tensors_copied"]
    assert (tmp_path / "out" / "README.md").is_file()

    again = subprocess.run([sys.executable, "-m", "pcbmerge", "merge", str(config), str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr
