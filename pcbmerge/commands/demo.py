"""`pcbmerge demo`: the README's main job.

Builds the demo zoo (a small base LM trained here and one expert per task) if it is missing, runs the
merge pipeline (`merge_flow`: Prefect tasks, MLflow tracking, Model Registry) for task arithmetic, TIES
and PCB-Merging (paper and release variants), evaluates base, experts and merges on the test splits,
and prints one comparison table. Everything is in MLflow afterwards (`mlflow ui`, see the README).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.demo_configs import DEMO_MERGES, demo_merge_config
from pipeline.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the demo zoo, merge it four ways through the pipeline, compare on test splits")
    p.add_argument("--size", choices=["demo", "micro"], default="demo", help="zoo size (micro: a fast run, ~1 min)")
    p.add_argument("--workdir", type=Path, default=None, help="working folder (default: $PCBMERGE_HOME/demo)")
    p.add_argument("--limit", type=int, default=None, help="at most N test examples per task (default: all)")
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from pcbmerge.commands.run import prepare_home, quiet_libraries
    from pipeline import tables
    from pipeline.zoo import build_zoo, load_zoo

    started = time.perf_counter()
    quiet_libraries(args.verbose)
    prepare_home()
    if not args.verbose:  # our own progress lines instead of Prefect's per-task log
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        logging.getLogger("pipeline.evaluation").setLevel(logging.WARNING)
    settings = load_settings()
    work = (args.workdir or settings.home / "demo").expanduser().resolve()
    zoo_dir = work / f"zoo-{args.size}"
    if not (zoo_dir / "zoo.json").is_file():
        _say(f"building the {args.size} zoo in {zoo_dir} (trains a base model and one expert per task; once)")
        build_zoo(zoo_dir, size=args.size, seed=0, overwrite=zoo_dir.exists())
    zoo = load_zoo(zoo_dir)
    _say(f"zoo: base + {len(zoo.experts)} experts ({', '.join(zoo.tasks)}) in {zoo.root}")

    from flows.merge import merge_flow

    table: dict[str, dict[str, float]] = {}
    registered = []
    for k, (label, method, params) in enumerate(DEMO_MERGES, 1):
        _say(f"[{k}/{len(DEMO_MERGES)}] {label}: fetch → validate → merge → evaluate → track (elapsed {time.perf_counter() - started:.0f}s)")
        config = demo_merge_config(zoo, work, args.size, label, method, params, args.limit)
        outcome = merge_flow(config)
        if not table:
            table.update({name: row for name, row in outcome.scores.items() if name != "merged"})
        table[f"merge: {label}"] = outcome.scores["merged"]
        registered.append(outcome.model_uri)
        mean = sum(outcome.scores["merged"].values()) / len(outcome.scores["merged"])
        _say(f"      mean test score {mean:.3f}{' (merge reused from cache)' if outcome.reused else ''}")

    # PCB + CMA-ES (`pcbmerge search`): per-model λ searched on the validation split.
    from pcbmerge.commands.search import demo_search

    _say(f"[search] pcb (release) + CMA-ES: λ searched on the validation split (elapsed {time.perf_counter() - started:.0f}s)")
    label, scores, uri, summary = demo_search(zoo, work, args.size, args.limit)
    table[label] = scores
    registered.append(uri)
    _say(f"      {summary}; mean test score {sum(scores.values()) / len(scores):.3f}")

    print(f"\nTest-split scores ({'all' if args.limit is None else args.limit} examples per task; expert rows are named by their task):\n")
    print(tables.format_text(table))
    print(f"\nfinished in {time.perf_counter() - started:.0f}s")
    print(f"merged models: {work / f'merged-{args.size}'}")
    print(f"registered: {', '.join(registered)}")
    print(f"browse: .venv/bin/mlflow ui --backend-store-uri {settings.tracking_uri}")
    print(f"lineage: .venv/bin/pcbmerge lineage {registered[0]}")
    return 0
