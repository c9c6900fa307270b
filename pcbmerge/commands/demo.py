"""`pcbmerge demo`: the README's main job.

Builds the demo zoo (a small base LM trained here and one expert per task) if it is missing, then runs the
tuner (`tune_flow`: Prefect tasks, MLflow tracking, Model Registry) over task arithmetic, TIES, DARE-TIES and
PCB-Merging (paper and release variants) with the same budget each, and prints per method its default
setting's test score beside its tuned one, the winner (chosen on validation data) marked. The numbers are
printed as they come: the zoo is not shaped to favour any method. Everything is in MLflow afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the demo zoo, tune five merge methods with one budget each, compare default and tuned on test splits")
    p.add_argument("--size", choices=["demo", "micro"], default="demo", help="zoo size (micro: a fast run)")
    p.add_argument("--workdir", type=Path, default=None, help="working folder (default: $PCBMERGE_HOME/demo)")
    p.add_argument("--limit", type=int, default=None, help="at most N test examples per task (default: all)")
    p.add_argument("--budget", type=int, default=None, help="evaluations per method on the search slice (default: 36)")
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from pcbmerge.commands.run import prepare_home, quiet_libraries
    from pipeline import tables
    from pipeline.demo_configs import demo_tune_config
    from pipeline.zoo import build_zoo, load_zoo

    started = time.perf_counter()
    quiet_libraries(args.verbose)
    prepare_home()
    if not args.verbose:  # our own stage lines instead of Prefect's per-task log
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        for name in ("pipeline", "pcbcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    settings = load_settings()
    work = (args.workdir or settings.home / "demo").expanduser().resolve()
    zoo_dir = work / f"zoo-{args.size}"
    if not (zoo_dir / "zoo.json").is_file():
        _say(f"building the {args.size} zoo in {zoo_dir} (trains a base model and one expert per task; once)")
        build_zoo(zoo_dir, size=args.size, seed=0, overwrite=zoo_dir.exists())
    zoo = load_zoo(zoo_dir)
    _say(f"zoo: base + {len(zoo.experts)} experts ({', '.join(zoo.tasks)}) in {zoo.root}")

    config = demo_tune_config(zoo, work, args.size, args.limit, args.budget)
    tune = config.tune
    _say(
        f"[tune] {len(tune.methods)} methods, {tune.budget} evaluations each on the first {tune.limit} validation examples a task "
        f"(grid, then CMA-ES on per-model λ), the top {tune.top_k} re-scored on the whole validation split; only the choices "
        f"see the test split (elapsed {time.perf_counter() - started:.0f}s)"
    )
    from pcbmerge.commands.tune import run_tune

    outcome = run_tune(config)
    for k, row in enumerate(outcome.leaderboard, 1):
        from pipeline.tuning import describe_method

        _say(f"[{k}/{len(outcome.leaderboard)}] {describe_method(row)}")

    print(f"\nTest-split scores ({'all' if args.limit is None else args.limit} examples per task); validation chooses, * marks the winner:\n")
    print(format_comparison(outcome.leaderboard))
    if outcome.baselines:
        print("\nBase and experts (expert rows are named by their task):\n")
        print(tables.format_text(outcome.baselines))
    print(f"\nfinished in {time.perf_counter() - started:.0f}s")
    print(f"winner: {outcome.winner}; merged model: {outcome.folder}")
    print(f"registered: {outcome.model_uri}")
    print(f"browse: .venv/bin/mlflow ui --backend-store-uri {settings.tracking_uri}")
    print(f"lineage: .venv/bin/pcbmerge lineage {outcome.model_uri}")
    return 0


def format_comparison(rows) -> str:
    """Per method: the default setting and its test score, the tuned setting, its validation and test scores."""
    from pipeline.tables import render_text
    from pipeline.tuning import format_setting

    header = ["method", "default setting", "default test", "tuned setting", "validation", "tuned test"]
    table = []
    for row in rows:
        default = dict(row.default_setting)
        lam = default.pop("lambda")
        stderr = "" if row.test_stderr is None else f" ± {row.test_stderr:.3f}"
        table.append(
            [
                row.method + (" *" if row.winner else ""),
                format_setting(default, [lam]),
                "-" if row.default_test is None else f"{row.default_test:.3f}",
                format_setting(row.parameters, row.lambdas),
                f"{row.validation:.3f}",
                f"{row.test:.3f}{stderr}",
            ]
        )
    return render_text(header, table, left={0, 1, 3})
