"""`pcbmerge search CONFIG.yml [--resume] [--stop-after-rounds N] [--json] [--dask-address ADDR] [--out DIR]`:
search λ with CMA-ES (`flows.search.search_flow`), then merge, test, track and register the best."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pcbcore.errors import MergeInputError
from pipeline.search_config import load_search_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search the merge coefficients λ with CMA-ES on validation scores, then merge the best")
    p.add_argument("config", type=Path, help="pipeline YAML with evaluation: and a search: block")
    p.add_argument("--resume", action="store_true", help="go on from the last finished round of the same search")
    p.add_argument("--stop-after-rounds", type=int, default=None, metavar="N", help="pause once N rounds are finished in all (resume later)")
    p.add_argument("--json", action="store_true", help='print {"lambdas", "best_fitness", "evaluations", "rounds", "stopped", "model"} as JSON')
    p.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT", help="evaluate candidates on this Dask scheduler")
    p.add_argument("--dask-workers", type=int, default=None, metavar="N", help="evaluate candidates on a local Dask cluster of N processes")
    p.add_argument("--out", type=Path, default=None, help="output folder of the final merge (default: the config's output, else a cache folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder made by another merge")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pcbmerge.commands.run import prepare_home, quiet_libraries

    config = load_search_config(args.config)  # bad keys fail here, before Prefect or MLflow start
    quiet_libraries(getattr(args, "verbose", False))
    prepare_home()
    if args.stop_after_rounds is not None and args.stop_after_rounds < 1:
        raise MergeInputError(f"--stop-after-rounds must be 1 or more, got {args.stop_after_rounds}")
    if args.dask_address and args.dask_workers:
        raise MergeInputError("give --dask-address (an existing cluster) or --dask-workers (a local one), not both")
    search = {}
    if args.dask_address:
        search = {"dask_address": args.dask_address, "dask_workers": None}
    elif args.dask_workers:
        if args.dask_workers < 1:
            raise MergeInputError(f"--dask-workers must be 1 or more, got {args.dask_workers}")
        search = {"dask_workers": args.dask_workers, "dask_address": None}
    updates = {"search": config.search.model_copy(update=search)} if search else {}
    if args.out is not None:
        updates["output"] = str(args.out.expanduser().resolve())
    if args.overwrite:
        updates["overwrite"] = True
    config = config.model_copy(update=updates)

    from infra.task_runners import run_search

    outcome = run_search(config, resume=args.resume, stop_after_rounds=args.stop_after_rounds)
    if args.json:
        print(json.dumps(outcome.summary()))
        return 0
    state = "finished" if outcome.finished else "paused (resume with --resume)"
    print(f"search {state}: {outcome.rounds} rounds, {outcome.evaluations} evaluations")
    for ratio, reason in outcome.stop_reasons.items():
        if reason is not None:
            print(f"stopped{'' if ratio == 'None' else f' (ratio {ratio})'}: {reason}")
    ratio = "" if outcome.ratio is None else f" at ratio {outcome.ratio}"
    print(
        f"best λ = [{', '.join(f'{x:.4f}' for x in outcome.lambdas)}]{ratio}: validation fitness {outcome.best_fitness:.4f} (start {outcome.start_fitness:.4f})"
    )
    share = outcome.build_seconds / max(outcome.build_seconds + outcome.eval_seconds, 1e-9)
    print(f"time: building candidates {outcome.build_seconds:.2f}s, evaluating {outcome.eval_seconds:.2f}s ({100 * share:.1f}% building)")
    if outcome.test_scores:
        mean = sum(outcome.test_scores.values()) / len(outcome.test_scores)
        print(f"{config.evaluation.split} scores: " + ", ".join(f"{t} {v:.4f}" for t, v in outcome.test_scores.items()) + f" (mean {mean:.4f})")
    if outcome.folder:
        print(f"merged model: {outcome.folder}")
    print(f"MLflow run: {outcome.run_id}")
    if outcome.model_uri:
        print(f"registered: {outcome.model_uri}  (pcbmerge lineage {outcome.model_uri})")
    return 0


def demo_search(zoo, work: Path, size: str, limit: int | None) -> tuple[str, dict[str, float], str | None, str]:
    """(table label, test scores, registered model URI, a one-line summary) of the demo's search."""
    from infra.task_runners import run_search
    from pipeline.demo_configs import demo_search_config

    config = demo_search_config(zoo, work, size, limit)
    outcome = run_search(config)
    lambdas = ", ".join(f"{x:.2f}" for x in outcome.lambdas)
    share = 100 * outcome.build_seconds / max(outcome.eval_seconds, 1e-9)
    line = (
        f"{outcome.evaluations} candidates in {outcome.rounds} rounds, λ = [{lambdas}], validation fitness "
        f"{outcome.start_fitness:.3f} → {outcome.best_fitness:.3f}; building took {share:.1f}% of evaluating"
    )
    return "merge: pcb (release) + CMA-ES", outcome.test_scores, outcome.model_uri, line
