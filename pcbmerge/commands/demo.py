"""`pcbmerge demo`: the README's main job.

Builds a small zoo of tiny Llama checkpoints (a base and three fine-tunes) in a working folder, merges
them with every method, and prints one table: time, and how far each merge moved from the base.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from pcbcore.checkpoint import CheckpointReader
from pcbcore.config import parse_merge_config
from pcbcore.executor import merge_to_folder
from pcbmerge.settings import load_settings

DEMO_METHODS = {
    "linear": {},
    "task_arithmetic": {"lambda": 1.0},
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.5},
    "pcb (paper)": {"ratio": 0.1, "variant": "paper"},
    "pcb (release)": {"ratio": 0.1, "variant": "release", "clip_quantile": 0.01},
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a tiny zoo and merge it with every method")
    p.add_argument("--workdir", type=Path, default=None, help="working folder (default: $PCBMERGE_HOME/demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pcbmerge.tinymodels import build_tiny_zoo

    work = (args.workdir or load_settings().home / "demo").resolve()
    zoo = work / "zoo"
    if not (zoo / "base").is_dir():
        print(f"building a tiny zoo in {zoo}")
        build_tiny_zoo(zoo)
    base, models = zoo / "base", sorted(p for p in zoo.iterdir() if p.name.startswith("ft"))
    rows = []
    for label, params in DEMO_METHODS.items():
        method = label.split(" ")[0]
        data = {"merge_method": method, "base_model": str(base), "models": [{"model": str(m)} for m in models], "parameters": params}
        config = parse_merge_config(data, source=f"demo:{label}")
        out = work / "merged" / label.replace(" ", "-").replace("(", "").replace(")", "")
        report = merge_to_folder(config, out, overwrite=True, config_text=yaml.safe_dump(data, sort_keys=False))
        rows.append((label, report.seconds, _distance(base, out)))
    print(f"\n{'method':<16} {'seconds':>8} {'‖θ_m − θ_pre‖':>14}")
    for label, seconds, dist in rows:
        print(f"{label:<16} {seconds:>8.2f} {dist:>14.4f}")
    print(f"\nmerged models are in {work / 'merged'}")
    return 0


def _distance(base: Path, merged: Path) -> float:
    a, b = CheckpointReader(base), CheckpointReader(merged)
    return sum(float((b.read(n).float() - a.read(n).float()).norm() ** 2) for n in a.tensors) ** 0.5
