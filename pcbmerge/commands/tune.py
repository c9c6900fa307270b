"""`pcbmerge tune CONFIG.yml [--resume] [--stop-after-rounds N] [--json]`: tune every method of the config's
`tune:` block with the same budget (`flows.tune.tune_flow`), test each choice, register the winner."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pcbcore.errors import MergeInputError
from pipeline.tune_config import load_tune_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="tune each method (grid, CMA-ES, re-scoring on validation data), test the choices, register the winner")
    p.add_argument("config", type=Path, help="YAML with base_model, models, evaluation: and a tune: block")
    p.add_argument("--resume", action="store_true", help="go on from the last finished stage or round of the same tuning run")
    p.add_argument("--stop-after-rounds", type=int, default=None, metavar="N", help="pause once N stages or rounds are finished in all (resume later)")
    p.add_argument("--json", action="store_true", help='print {"finished", "winner", "model", "leaderboard": [...]} as JSON')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pcbmerge.commands.run import prepare_home, quiet_libraries

    config = load_tune_config(args.config)  # bad keys fail here, before Prefect or MLflow start
    if args.stop_after_rounds is not None and args.stop_after_rounds < 1:
        raise MergeInputError(f"--stop-after-rounds must be 1 or more, got {args.stop_after_rounds}")
    quiet_libraries(getattr(args, "verbose", False))
    prepare_home()
    outcome = run_tune(config, resume=args.resume, stop_after_rounds=args.stop_after_rounds)
    if args.json:
        print(json.dumps(outcome.summary()))
        return 0
    if not outcome.finished:
        print(f"tuning paused after {outcome.rounds} stages and rounds (resume with --resume)")
        print(f"MLflow run: {outcome.run_id}")
        return 0
    from pipeline.tuning import format_leaderboard

    print(f"validation chooses, {config.evaluation.split} split reports; * marks the winner:\n")
    print(format_leaderboard(outcome.leaderboard))
    print(f"\nwinner: {outcome.winner}; merged model: {outcome.folder}")
    print(f"MLflow run: {outcome.run_id}")
    if outcome.model_uri:
        print(f"registered: {outcome.model_uri}  (pcbmerge lineage {outcome.model_uri})")
    return 0


def run_tune(config, resume: bool = False, stop_after_rounds: int | None = None):
    """`tune_flow` on `tune.workers` local threads."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.tune import tune_flow

    return tune_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=config.tune.workers))(config, resume=resume, stop_after_rounds=stop_after_rounds)
