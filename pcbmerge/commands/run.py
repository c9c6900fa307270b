"""`pcbmerge run CONFIG.yml [--out DIR]`: the merge pipeline (Prefect flow) with tracking and lineage."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_pipeline_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="fetch, validate, merge, evaluate, track and register, as CONFIG says")
    p.add_argument("config", type=Path, help="pipeline YAML: a merge config plus evaluation: and register_as:")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the config's output, else a cache folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder made by another merge")
    p.set_defaults(func=run)


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the console to our progress and Prefect's run log: HTTP calls and lm-eval details at -v only."""
    import logging

    for name in ("httpx", "lm_eval", "mlflow", "alembic", "datasets", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def prepare_home() -> None:
    """Create the working folder (MLflow's SQLite file and the caches live there)."""
    from pcbcore.scratch import remove_leftovers
    from pipeline.settings import load_settings

    settings = load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    # Temporary folders that killed runs left in the cache (merges, components, registry downloads): cheap,
    # a listing of a few folders, and never a live writer's.
    registry = settings.cache_dir / "registry"
    for folder in [settings.cache_dir / "merges", settings.cache_dir / "components", *(registry.iterdir() if registry.is_dir() else [])]:
        remove_leftovers(folder)


def run(args: argparse.Namespace) -> int:
    from pipeline import tables

    quiet_libraries(args.verbose)
    prepare_home()

    config = load_pipeline_config(args.config)  # bad keys fail here, before Prefect or MLflow start
    updates = {}
    if args.out is not None:
        updates["output"] = str(args.out.expanduser().resolve())
    if args.overwrite:
        updates["overwrite"] = True
    config = config.model_copy(update=updates)

    from flows.merge import merge_flow

    outcome = merge_flow(config)
    if outcome.scores:
        print(tables.format_text(outcome.scores))
    print(f"merged model: {outcome.folder}{' (reused)' if outcome.reused else ''}")
    print(f"MLflow run: {outcome.run_id}")
    if outcome.model_uri:
        print(f"registered: {outcome.model_uri}  (pcbmerge lineage {outcome.model_uri})")
    return 0
