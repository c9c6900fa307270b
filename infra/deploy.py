"""Deployments of the three flows, served from one process (`pcbmerge serve`) or deployed to a work pool
(`infra/prefect.yaml`, `prefect deploy --all`).

| deployment | flow | parameter model (the UI's form) | schedule |
|---|---|---|---|
| `merge-flow/merge` | `merge_flow` | `config: PipelineConfig` | none: run from the UI, the CLI or the API |
| `search-flow/search` | `search_flow` | `config: SearchPipelineConfig`, `resume`, `stop_after_rounds` | none |
| `tune-flow/tune` | `tune_flow` | `config: TunePipelineConfig`, `resume`, `stop_after_rounds` | none |
| `watch-flow/watch` | `watch_flow` | `config: WatchConfig` | `--every` interval or `--cron`, one run at a time |

Every parameter is a pydantic model, so Prefect publishes its JSON schema (titles, defaults, descriptions)
and the UI renders a form; values are validated before a run starts (`enforce_parameter_schema`). Defaults
for the forms come from a pipeline YAML (`pcbmerge serve --config CONFIG.yml`). A Hub token is never a
parameter: the serving process (or worker) reads `HF_TOKEN` from its environment.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import PipelineConfig
from pipeline.forms import form_parameters
from pipeline.watch_config import WatchConfig

TAGS = ["pcbmerge"]


def watch_deployment(watch: WatchConfig, interval: int | None = None, cron: str | None = None, name: str = "watch") -> Any:
    """The watch deployment (`pcbmerge serve --watch-source`, `pcbmerge watch --every`): the watch config as
    its parameters, an interval or cron schedule, and one run at a time."""
    from flows.watch import watch_flow

    return watch_flow.to_deployment(
        name=name,
        parameters={"config": watch.model_dump(mode="json")},
        interval=interval,
        cron=cron,
        # One run at a time: a slow merge must not overlap the next tick and merge the same set twice.
        concurrency_limit=1,
        description=f"Merge the checkpoints of {watch.source} into {watch.pipeline.register_as} whenever they change.",
        tags=[*TAGS, "watch"],
    )


def build_deployments(
    merge_defaults: PipelineConfig | None = None,
    watch: WatchConfig | None = None,
    interval: int | None = None,
    cron: str | None = None,
) -> list[Any]:
    """RunnerDeployments for `prefect.serve`: merge and search always; watch when there is a source to watch.
    The search runs its candidates on the task runner the serving process's settings give (`infra/task_runners.py`)."""
    from flows.merge import merge_flow
    from flows.tune import tune_flow
    from infra.entrypoints import search_flow

    merge_params = None
    if merge_defaults is not None:
        form = merge_defaults.model_dump(mode="json")
        merge_params = {"config": {**form, "parameters": form_parameters(form["merge_method"], form["parameters"])}}
    deployments = [
        merge_flow.to_deployment(
            name="merge",
            parameters=merge_params,
            description="Fetch, validate, merge, evaluate, track and register the checkpoints the config names.",
            tags=TAGS,
        ),
        search_flow.to_deployment(
            name="search",
            description="Search the per-model coefficients with CMA-ES on the validation split, then merge, evaluate and register the best.",
            tags=TAGS,
        ),
        tune_flow.to_deployment(
            name="tune",
            description="Tune every listed method with the same budget (grid, CMA-ES, re-scoring on validation), test each choice, register the winner.",
            tags=TAGS,
        ),
    ]
    if watch is not None:
        deployments.append(watch_deployment(watch, interval, cron))
    return deployments


def serve_deployments(deployments: list[Any], limit: int | None = None) -> None:
    """Serve until interrupted: poll the Prefect API for scheduled or triggered runs and run them here."""
    from prefect import serve

    serve(*deployments, limit=limit, print_starting_message=True)
