"""`pcbmerge eval MODEL --tasks ...`: score a checkpoint folder with lm-eval-harness (cached)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pcbcore.errors import MergeInputError
from pipeline.evaluation import SPLITS, evaluate_path
from pipeline.settings import load_settings


def _positive_int(text: str) -> int:
    """argparse type for --limit: a whole number above zero (else exit 2 with the reason)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit must be a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model folder on lm-eval tasks")
    parser.add_argument("model", help="a transformers checkpoint folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. zoo_reverse,zoo_sort")
    parser.add_argument("--include-path", help="folder of extra task YAMLs (a zoo's tasks/ folder)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="which split to score (default: test)")
    parser.add_argument("--limit", type=_positive_int, help="at most N examples per task")
    parser.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: PCBMERGE_DEVICE, else auto)")
    parser.add_argument("--cache-dir", type=Path, help="result cache (default: $PCBMERGE_CACHE_DIR/eval)")
    parser.add_argument("--json", action="store_true", help='print {"<task>": {"metric", "value", "stderr"}} only')
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    settings = load_settings()
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise MergeInputError("--tasks is empty; give at least one task name.")
    result = evaluate_path(
        args.model,
        tasks,
        include_path=args.include_path,
        split=args.split,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device or settings.device,
        cache_dir=args.cache_dir or settings.cache_dir / "eval",
    )
    print(json.dumps(result.to_json()) if args.json else result.format_table())
    return 0
