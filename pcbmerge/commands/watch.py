"""`pcbmerge watch CONFIG.yml --source DIR_OR_REF [--every 1h | --cron EXPR] [--json]`: merge when the source changes."""

from __future__ import annotations

import argparse
import json
import re

from pcbcore.errors import MergeInputError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="merge the checkpoints of a folder, Hub repo or registered model whenever they change")
    p.add_argument("config", help="pipeline YAML (as for `pcbmerge run`, or `pcbmerge search` with a search: block); needs register_as")
    p.add_argument("--source", required=True, help="folder of checkpoint folders | Hub repo id org/name (its branches) | models:/NAME (its versions)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--every", default=None, help="serve a deployment that runs on this interval (30s, 10m, 1h, 1d); without it, run once")
    when.add_argument("--cron", default=None, help="serve a deployment that runs on this cron schedule, e.g. '0 * * * *'")
    p.add_argument("--name", default="watch", help="deployment name when serving (default 'watch')")
    p.add_argument("--min-models", type=int, default=2, help="merge only when the source holds at least this many checkpoints")
    p.add_argument("--json", action="store_true", help='print {"merged": ..., "model": ..., "inputs": [...]}')
    p.set_defaults(func=run)


def parse_interval(text: str) -> int:
    """`90`, `30s`, `10m`, `1h`, `1d` -> seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not match or int(match.group(1)) == 0:
        raise MergeInputError(f"--every '{text}' is not an interval; use a positive number with s, m, h or d, e.g. 30s, 10m, 1h")
    return int(match.group(1)) * UNITS[match.group(2) or "s"]


def run(args: argparse.Namespace) -> int:
    from pcbmerge.commands.run import prepare_home, quiet_libraries
    from pipeline.watch_config import load_watch_config

    quiet_libraries(args.verbose)
    prepare_home()
    config = load_watch_config(args.config, args.source)
    if args.min_models < 1:
        raise MergeInputError(f"--min-models must be at least 1 (got {args.min_models})")
    config = config.model_copy(update={"min_models": args.min_models})
    interval = parse_interval(args.every) if args.every else None

    from flows.watch import check_watch_config, watch_flow

    check_watch_config(config)  # a bad source fails here, before Prefect starts
    if interval is None and args.cron is None:
        outcome = watch_flow(config)
        if args.json:
            print(json.dumps({"merged": outcome.merged, "model": outcome.model, "inputs": outcome.inputs}))
        else:
            print(f"{'merged: ' + str(outcome.model) if outcome.merged else 'no merge'} ({outcome.reason})")
        return 0
    from infra.deploy import serve_deployments, watch_deployment

    serve_deployments([watch_deployment(config, interval, args.cron, name=args.name)], limit=1)
    return 0
