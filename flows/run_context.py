"""What a flow records about itself in MLflow: the Prefect run it is (tags that link the MLflow run back to
the Prefect flow run), and the effective config it ran with (logged as the run's params)."""

import os

from prefect.runtime import flow_run

from pipeline.config import PipelineConfig


def prefect_tags(flow_name: str) -> dict[str, str]:
    """The Prefect flow run's id, name and flow, and its UI page when there is a real server to link to."""
    tags = {"prefect.flow_run_id": flow_run.get_id() or "", "prefect.flow_run_name": flow_run.get_name() or "", "prefect.flow_name": flow_name}
    if os.environ.get("PREFECT_API_URL"):  # a real server: the run has a page worth linking
        tags["prefect.flow_run_url"] = flow_run.get_flow_run_ui_url() or ""
    return tags


def tracked_params(config: PipelineConfig) -> dict:
    """The effective merge config (every parameter with its default), the evaluation block, the search
    settings of a search, and the registry target."""
    data = config.merge_config().describe()
    data["evaluation"] = config.evaluation.model_dump() if config.evaluation else None
    search = getattr(config, "search", None)
    if search is not None:
        data["search"] = search.model_dump(mode="json")
    data["register_as"] = config.register_as
    return data
