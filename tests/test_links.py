"""What a run shows in the two UIs, through the real Prefect engine (test harness) and a real SQLite MLflow
store: Prefect artifacts (results, links, output folder, lineage graph), MLflow experiments that open on the
runs table, a version whose description and tags carry only the parameters that apply, a lineage picture,
a watch run named by what it did, and identical reruns that store the weights once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import parse_pipeline_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _artifacts(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect_client:
        return prefect_client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _flow_run(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as prefect_client:
        return prefect_client.read_flow_run(flow_run_id)


@pytest.fixture(scope="module")
def pcb_merge(micro_zoo):
    """A PCB merge (the paper's variant) with an evaluation, registered."""
    from flows.merge import merge_flow

    config = parse_pipeline_config(
        {
            "merge_method": "pcb",
            "base_model": str(micro_zoo.base),
            "models": [{"model": str(micro_zoo.experts[t])} for t in micro_zoo.tasks[:2]],
            "parameters": {"ratio": 0.2},
            "evaluation": {"tasks": micro_zoo.tasks[:1], "include_path": str(micro_zoo.task_dir), "limit": 4},
            "register_as": "links-pcb",
            "experiment": "links",
        }
    )
    state = merge_flow(config, return_state=True)
    return state.state_details.flow_run_id, state.result()


def test_flow_run_publishes_results_links_folder_and_lineage(pcb_merge, micro_zoo):
    flow_run_id, outcome = pcb_merge
    artifacts = _artifacts(flow_run_id)
    kinds = {a.type for a in artifacts}
    assert {"markdown", "table"} <= kinds, kinds
    [summary] = [a for a in artifacts if a.type == "markdown"]
    assert outcome.run_id in summary.data and outcome.model_uri in summary.data and outcome.folder in summary.data
    assert "| merged |" in summary.data  # the result table
    assert "```mermaid" in summary.data and "graph LR" in summary.data and "λ=" in summary.data
    assert micro_zoo.tasks[0] in str([a.data for a in artifacts if a.type == "table"])


def test_mlflow_opens_on_runs_and_the_version_says_only_what_applies(pcb_merge):
    from pipeline.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, client

    _, outcome = pcb_merge
    mlflow_client = client()
    assert mlflow_client.get_experiment_by_name("links").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    version = mlflow_client.get_model_version("links-pcb", "1")
    assert "None" not in version.description and "None" not in str(version.tags)
    assert "clip_quantile" not in version.description and "clip_quantile" not in str(version.tags)  # the paper's variant has none
    assert "ratio = 0.2" in version.description and "λ = [1, 1]" in version.description
    assert version.tags["pcbmerge.param.ratio"] == "0.2" and version.tags["pcbmerge.param.variant"] == '"paper"'
    assert "pcbmerge.input.0.revision" not in version.tags  # a local folder has no revision to show
    artifacts = {a.path for a in mlflow_client.list_artifacts(outcome.run_id)}
    assert {"lineage.png", "lineage.md", "lineage.json", "scores.png"} <= artifacts
    local = Path(mlflow_client.download_artifacts(outcome.run_id, "lineage.png"))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eight_identical_reruns_store_the_weights_once(micro_zoo):
    """The same merge run 8 times: one registered version and one stored copy of the weights (counted as
    LoggedModels and as safetensors bytes under the experiment's artifact folder)."""
    from flows.merge import merge_flow
    from pipeline.settings import load_settings
    from pipeline.tracking import client, experiment_id

    config = parse_pipeline_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(micro_zoo.base),
            "models": [{"model": str(micro_zoo.experts[t])} for t in micro_zoo.tasks[:2]],
            "register_as": "reruns",
            "experiment": "reruns",
        }
    )
    outcomes = [merge_flow(config) for _ in range(8)]
    assert {o.model_uri for o in outcomes} == {"models:/reruns/1"}
    mlflow_client = client()
    logged = mlflow_client.search_logged_models(experiment_ids=[experiment_id("reruns")])
    stored = sorted((load_settings().artifact_dir / "reruns").rglob("*.safetensors"))
    one_copy = sum(f.stat().st_size for f in Path(outcomes[0].folder).glob("*.safetensors"))
    stored_bytes = sum(f.stat().st_size for f in stored)
    print(f"8 identical reruns: {len(logged)} LoggedModel(s), {stored_bytes} bytes of weights stored (one copy: {one_copy} bytes)")
    assert len(logged) == 1 and stored_bytes == one_copy > 0
    assert len(mlflow_client.search_model_versions("name = 'reruns'")) == 1


def test_a_watch_run_says_whether_it_merged(micro_zoo, tmp_path):
    from flows.watch import watch_flow
    from pipeline.config import PipelineConfig
    from pipeline.watch_config import WatchConfig

    source = tmp_path / "incoming"
    for task in micro_zoo.tasks[:2]:
        shutil.copytree(micro_zoo.experts[task], source / task)
    config = WatchConfig(source=str(source), pipeline=PipelineConfig(merge_method="linear", base_model=str(micro_zoo.base), register_as="links-watch"))
    merged = watch_flow(config, return_state=True)
    again = watch_flow(config, return_state=True)
    assert merged.result().merged and not again.result().merged
    first, second = _flow_run(merged.state_details.flow_run_id), _flow_run(again.state_details.flow_run_id)
    assert first.name == "watch: merged 2 into models:/links-watch/1" and "merged" in first.tags
    assert second.name == "watch: no change" and "no-change" in second.tags
    [note] = [a for a in _artifacts(again.state_details.flow_run_id) if a.type == "markdown"]
    assert "no change" in note.data and "Same checkpoints as models:/links-watch/1" in note.data
