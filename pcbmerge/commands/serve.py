"""`pcbmerge serve [--config CONFIG.yml] [--watch-source SRC --every 1h | --cron EXPR]`: serve the deployments."""

from __future__ import annotations

import argparse
import os
import sys

from pcbcore.errors import MergeInputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the merge, search and watch deployments (run them from the Prefect UI, CLI or a schedule)")
    p.add_argument("--config", default=None, help="pipeline YAML whose values become the merge form's defaults (and the watch's pipeline)")
    p.add_argument("--watch-source", default=None, help="also serve watch-flow/watch on this source (folder, org/name or models:/NAME); needs --config")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--every", default=None, help="the watch's interval: 30s, 10m, 1h, 1d")
    when.add_argument("--cron", default=None, help="the watch's cron schedule, e.g. '0 * * * *'")
    p.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once in this process")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pcbmerge.commands.run import prepare_home, quiet_libraries
    from pcbmerge.commands.watch import parse_interval
    from pipeline.config import load_pipeline_config
    from pipeline.watch_config import load_watch_config

    quiet_libraries(args.verbose)
    if args.watch_source and not args.config:
        raise MergeInputError("--watch-source needs --config: the pipeline YAML the watch runs on the source's checkpoints")
    if (args.every or args.cron) and not args.watch_source:
        raise MergeInputError("--every and --cron schedule the watch; give --watch-source too")
    interval = parse_interval(args.every) if args.every else None
    prepare_home()
    watch = load_watch_config(args.config, args.watch_source) if args.watch_source else None
    defaults = None
    if args.config:
        defaults = watch.pipeline if watch is not None else load_pipeline_config(args.config)

    from flows.watch import check_watch_config
    from infra.deploy import build_deployments, serve_deployments

    if watch is not None:
        check_watch_config(watch)
    if not os.environ.get("PREFECT_API_URL"):
        print("note: PREFECT_API_URL is not set, so these deployments live on a temporary server that ends with this process; "
              "start servers with `pcbmerge up` and export the settings it prints", file=sys.stderr)  # fmt: skip
    serve_deployments(build_deployments(defaults, watch, interval, args.cron), limit=args.limit)
    return 0
