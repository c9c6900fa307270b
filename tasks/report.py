"""What a flow run publishes on its Prefect page (`pipeline.report` renders it): artifacts with the result
table, links to the MLflow run and the registered version, the output folder and the lineage graph; and for a
watch, a run name that says at a glance whether it merged."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline import report, tables, tracking
from pipeline.retry import is_transient_tracking_error, retry_when
from pipeline.settings import load_settings


@task(name="publish-report", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_when(is_transient_tracking_error), cache_policy=NO_CACHE)
def publish_report(
    title: str,
    run_id: str,
    model_uri: str | None,
    folder: str | None,
    scores: dict[str, dict[str, float]],
    lineage: dict[str, Any] | None,
    note: str = "",
) -> None:
    """Artifacts of the flow run: a markdown summary (links, results, lineage), the scores as a table, and a link
    artifact for the MLflow run and the registered version when the store is a server with pages to open."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    logger = get_run_logger()
    tracking_uri = load_settings().tracking_uri
    experiment_id = tracking.client().get_run(run_id).info.experiment_id
    parts = [f"# {title}", "", *([note, ""] if note else []), report.links_markdown(tracking_uri, experiment_id, run_id, model_uri, folder)]
    if scores:
        parts += ["## Results", "", tables.format_markdown(scores)]
    if lineage:
        parts += ["## Lineage", "", report.lineage_mermaid(lineage)]
    create_markdown_artifact("\n".join(parts), description=f"{title}: MLflow run, registered version, output folder, results and lineage")
    if scores:
        tasks = tables.task_names(scores)
        rows = [{"model": label, **{t: round(row[t], 4) for t in tasks if t in row}} for label, row in scores.items()]
        create_table_artifact(rows, description=f"{title}: scores per model and task")
    run_page = report.run_url(tracking_uri, experiment_id, run_id)
    if run_page:
        create_link_artifact(run_page, link_text=f"MLflow run {run_id}", description="the MLflow run of this flow run")
    version_page = report.version_url(tracking_uri, model_uri) if model_uri else None
    if version_page:
        create_link_artifact(version_page, link_text=model_uri, description="the registered model version")
    logger.info("MLflow run %s%s", run_id, f" ({run_page})" if run_page else f" in {tracking_uri}")
    if model_uri:
        logger.info("registered version %s%s", model_uri, f" ({version_page})" if version_page else "")
    if folder:
        logger.info("output folder %s", folder)


@task(name="label-flow-run", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def label_flow_run(name: str, tags: list[str], summary: str) -> None:
    """Rename the current flow run, add tags and a markdown artifact with `summary`: a watch run's page says at
    a glance whether it merged ("merged 2 into models:/x/3") or found nothing new ("no change")."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    create_markdown_artifact(summary, description=name)
    get_run_logger().info(name)
    run_id = flow_run.get_id()
    if not run_id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id)
        client.update_flow_run(run_id, name=name, tags=sorted({*(current.tags or []), *tags}))
