"""Prefect tasks around `pipeline.tracking` and `pipeline.registry`: every MLflow call of a flow, retried
on transient errors (a tracking server restarting, a locked SQLite store) and never cached."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound

from pipeline import registry, tracking
from pipeline.lineage import LINEAGE_ARTIFACT
from pipeline.retry import is_transient_tracking_error, retry_when

# Every MLflow call: retried on a transient error (a tracking server restarting, a locked SQLite store), never cached.
TRACKING = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_when(is_transient_tracking_error), cache_policy=NO_CACHE)


@task(name="track-start", **TRACKING)
def start_tracking(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Open the flow's MLflow run; log the flattened config as params. Returns the run id."""
    return tracking.start_run(experiment, run_name, params, tags)


@task(name="track-finish", **TRACKING)
def finish_tracking(run_id: str, status: str) -> None:
    tracking.finish_run(run_id, status)


@task(name="track-results", **TRACKING)
def track_results(run_id: str, config_yaml: str, scores: dict[str, dict[str, float]], tags: dict[str, str]) -> None:
    """Metrics `<model label>.<task>` (and `.mean`); artifacts: the config YAML, the result table (markdown
    and CSV) and a bar chart of per-task scores; tags."""
    tracking.log_results(run_id, config_yaml, scores, tags)


@task(name="track-register", **TRACKING)
def register_model(run_id: str, experiment: str, folder: str, name: str, lineage: dict[str, Any]) -> dict[str, str]:
    """Log the merged folder as an MLflow LoggedModel and register it under `name`; attach the lineage.

    Returns `{"name", "version", "uri"}`. If anything fails after the version exists, the version is
    deleted: a failed flow leaves no registry version behind.
    """
    return registry.register_model(run_id, experiment, folder, name, lineage)


@task(name="track-lineage", **TRACKING)
def log_lineage(run_id: str, lineage: dict[str, Any]) -> None:
    """`lineage.json` for a merge that is not registered (its `model` is the output folder)."""
    tracking.log_json(tracking.client(), run_id, lineage, LINEAGE_ARTIFACT)


@task(name="track-lineage-views", **TRACKING)
def log_lineage_views(run_id: str, lineage: dict[str, Any]) -> None:
    """`lineage.png` and `lineage.md` (a mermaid graph) on the run: the lineage to look at in the MLflow UI."""
    tracking.log_lineage_views(run_id, lineage)


@task(name="track-reopen", **TRACKING)
def reopen_tracking(run_id: str) -> None:
    """A resumed search goes on logging into the run it started."""
    tracking.reopen_run(run_id)


@task(name="track-search-round", **TRACKING)
def track_search_round(run_id: str, record: dict[str, Any], state_blob: bytes, history: dict[str, Any], artifact_path: str) -> None:
    """One finished round: a nested run per candidate (λ, per-task validation scores, fitness); metrics
    `best_fitness`, `mean_fitness`, `build_seconds`, `eval_seconds` on the parent at step = round; the
    pickled CMA-ES state and every evaluation so far as artifacts under `artifact_path`."""
    tracking.log_search_round(run_id, record, state_blob, history, artifact_path)


@task(name="track-search-summary", **TRACKING)
def track_search_summary(run_id: str, plot_png: bytes, final: dict[str, Any], tags: dict[str, str]) -> None:
    """The search's end: the convergence plot, the final λ (and why each ratio stopped), summary tags."""
    tracking.log_search_summary(run_id, plot_png, final, tags)


@task(name="track-search-version-tags", **TRACKING)
def tag_model_version(name: str, version: str, tags: dict[str, str]) -> None:
    """Extra tags on a registered version (a searched merge: its search settings and evaluation count)."""
    registry.tag_model_version(name, version, tags)


@task(name="track-reap", **TRACKING)
def reap_dead_runs(experiment: str) -> list[str]:
    """Runs left RUNNING by a killed process: their MLflow run is marked KILLED, the logged models it never
    registered FAILED (files deleted), and the Prefect flow run that owned it Crashed (a flow run whose
    process died keeps its last state, Running, forever otherwise)."""
    from prefect import get_client, get_run_logger
    from prefect.states import Crashed

    reaped = tracking.reap_dead_runs(experiment)
    with get_client(sync_client=True) as prefect_client:
        for item in reaped:
            get_run_logger().warning("MLflow run %s was left RUNNING by a process that is gone: marked KILLED", item["run_id"])
            for model_id in item["logged_models"]:
                get_run_logger().warning("logged model %s of that run was never registered: marked FAILED, its files deleted", model_id)
            if item["flow_run_id"]:
                try:
                    flow_run = prefect_client.read_flow_run(item["flow_run_id"])
                except ObjectNotFound:  # another Prefect server, or a temporary one that ended with the process
                    continue
                if flow_run.state is not None and not flow_run.state.is_final():
                    prefect_client.set_flow_run_state(flow_run.id, Crashed(message="its process was killed; found by a later run"), force=True)
    return [item["run_id"] for item in reaped]
